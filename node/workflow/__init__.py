"""Workflow: when work runs and who runs it.

Owns the Celery app and its wire names (``queue``), the workers' tasks (``tasks``), the
analysis jobs they run (``jobs``) and the sweeper that moves studies along the lifecycle
and hands due work to the queue (``sweeper``). Analyses run only through here.
"""
