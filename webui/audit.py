"""The audit trail as the web UI writes it: each event carries the request's client address.

The address is ``request.remote_addr``: the peer of the connection, or, only when
``web_trusted_proxy`` is set, what that proxy says in X-Forwarded-For (waitress checks it;
the header is never believed from anyone else).
"""

from __future__ import annotations

from flask import has_request_context, request
from sqlalchemy.orm import Session

from node.records import audit
from node.records.audit import ACTIONS, recorded_since, signed_in_from
from node.records.db import AuditEvent

__all__ = ["ACTIONS", "client_address", "record", "recorded_since", "signed_in_from"]


def client_address() -> str:
    """The client address of the current request ("unknown" when the server gives none)."""
    address = request.remote_addr if has_request_context() else None
    return (address or "unknown")[: audit.ADDRESS_MAX_LENGTH]


def record(
    session: Session, username: str, action: str, study_id: int | None = None, **detail
) -> AuditEvent:
    """Add one audit event from this request (the caller commits with the change)."""
    return audit.record(
        session, username, action, study_id, client_address=client_address(), **detail
    )
