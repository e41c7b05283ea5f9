"""Workers seen: each worker process records a heartbeat row (host, queues, model); the
dashboard, ``/healthz`` and the metrics read them."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from node.records.db import Worker, utcnow


def beat(
    session: Session,
    name: str,
    host: str,
    pid: int,
    queues: str,
    model: tuple[str, str] | None = None,
    now: datetime | None = None,
) -> None:
    """Record that worker ``name`` is alive now (and its model, once it loaded one); caller
    commits."""
    now = now or utcnow()
    values = {"last_seen_at": now, "queues": queues}
    if model is not None:
        values["model_name"], values["model_version"] = model
    if session.execute(update(Worker).where(Worker.name == name).values(**values)).rowcount:
        return
    session.add(Worker(name=name, host=host, pid=pid, started_at=now, **values))
    session.flush()


def seen(session: Session, since: datetime | None = None) -> list[Worker]:
    """Workers that beat since ``since`` (all when None), the most recent first."""
    query = select(Worker).order_by(Worker.last_seen_at.desc())
    if since is not None:
        query = query.where(Worker.last_seen_at >= since)
    return list(session.scalars(query))


def forget(session: Session, before: datetime) -> int:
    """Drop workers silent since before ``before`` (gone); returns how many."""
    return session.execute(delete(Worker).where(Worker.last_seen_at < before)).rowcount


def silent_since(worker: Worker, now: datetime | None = None) -> timedelta:
    """How long ago the worker last beat."""
    return (now or utcnow()) - worker.last_seen_at
