"""Radiologist web UI (Flask), built in its own issue."""
