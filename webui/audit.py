"""The audit trail: who labelled, agreed, exported or re-sent what, and when."""

from __future__ import annotations

from sqlalchemy.orm import Session

from node.records.db import AuditEvent

ACTIONS = (
    "login",
    "label_add",
    "label_remove",
    "verdict",
    "export",
    "resend_report",
    "mapping",
    "user_add",
)


def record(
    session: Session, username: str, action: str, study_id: int | None = None, **detail
) -> AuditEvent:
    """Add one audit event (the caller commits with the change it records)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    event = AuditEvent(username=username, action=action, study_id=study_id, detail=detail)
    session.add(event)
    return event
