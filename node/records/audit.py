"""The audit trail: who signed in, read patient data, labelled, agreed, exported, uploaded or
changed an account, when, and from which client address (None: the node's command line)."""

from __future__ import annotations

import getpass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.records.db import AuditEvent

ACTIONS = (
    "login",
    "login_failed",
    "login_throttled",
    "logout",
    "study_view",
    "slice_view",
    "patient_search",
    "label_add",
    "label_remove",
    "verdict",
    "export",
    "export_preview",
    "export_denied",
    "retention",  # a study's pixel data removed (by the lifecycle, or `ainode retention`)
    "upload",
    "resend_report",
    "study_retry",
    "study_suspend",
    "study_resume",
    "study_force",
    "study_discard",
    "mapping",
    "routing_rules",
    "routing_test",
    "user_add",
    "user_password",
    "user_disable",
    "user_enable",
)
ADDRESS_MAX_LENGTH = 64


def record(
    session: Session,
    username: str,
    action: str,
    study_id: int | None = None,
    client_address: str | None = None,
    **detail,
) -> AuditEvent:
    """Add one audit event (the caller commits with the change it records)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    event = AuditEvent(
        username=username[:64],
        action=action,
        study_id=study_id,
        detail=detail,
        client_address=client_address[:ADDRESS_MAX_LENGTH] if client_address else None,
    )
    session.add(event)
    return event


def recorded_since(
    session: Session,
    username: str,
    action: str,
    since: datetime,
    study_id: int | None = None,
    **detail,
) -> bool:
    """Whether ``username`` has an event like this one (same study and detail) since
    ``since``: reads repeated while a page is open are recorded once per window."""
    query = select(AuditEvent.detail).where(
        AuditEvent.username == username, AuditEvent.action == action, AuditEvent.at >= since
    )
    if study_id is not None:
        query = query.where(AuditEvent.study_id == study_id)
    return any(found == detail for found in session.scalars(query))


def signed_in_from(session: Session, username: str, client_address: str) -> bool:
    """Whether ``username`` has signed in successfully from ``client_address`` before."""
    return (
        session.scalar(
            select(AuditEvent.id)
            .where(
                AuditEvent.username == username,
                AuditEvent.action == "login",
                AuditEvent.client_address == client_address[:ADDRESS_MAX_LENGTH],
            )
            .limit(1)
        )
        is not None
    )


def command_line_user() -> str:
    """Who ran an ``ainode`` command, as the audit trail names them."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        who = "unknown"
    return f"cli:{who}"[:64]
