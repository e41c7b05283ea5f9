"""Reporting: the DICOM SR of a result and its delivery.

Owns building and sending the SR (``sr``) and the state of every Report (``delivery``:
opened, sent, retried with the one back-off policy, re-sent on request).
"""
