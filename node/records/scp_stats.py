"""What the storage SCP counts that leaves no other row: instances refused and associations
rejected by reason, associations open, and that it is listening (the ``scp_stat`` table).

The SCP process tallies in memory and its watchdog writes the tallies: an association's
thread never waits on the database (a refusal is often *because* the database or the disk
is in trouble), and a tally the database could not take is kept for the next write.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.records.db import ScpStat, utcnow

log = logging.getLogger(__name__)

INSTANCE_REFUSED = "instance_refused"  # counter, by reason
ASSOCIATION_REJECTED = "association_rejected"  # counter, by reason
ASSOCIATIONS_OPEN = "associations_open"  # gauge
LISTENING = "listening"  # gauge: 1 while the SCP accepts connections, refreshed periodically

# the reasons, listed at 0 before the first one happens (node.dicom.scp, node.dicom.acceptor)
REFUSAL_REASONS = (
    "out_of_resources",  # 0xA700: the store cannot write, the dataset is too large, database
    "dataset_mismatch",  # 0xA900
    "cannot_understand",  # 0xC210
    "sop_class_not_supported",  # 0x0122
    "unrecognised_operation",  # 0x0211
)
REJECTION_REASONS = ("calling_ae", "called_ae", "disk_low", "association_limit", "other")

Key = tuple[str, str]  # (kind, reason)


class ScpStats:
    """One SCP process's tallies; :meth:`flush` writes them (the watchdog calls it)."""

    def __init__(self, session_factory: sessionmaker) -> None:
        self.session_factory = session_factory
        self._lock = threading.Lock()
        self._pending: Counter[Key] = Counter()  # counted, not yet written
        self._gauges: dict[Key, int] = {}
        self._written: dict[Key, int] = {}  # gauges as last written
        self._failing = False

    def count(self, kind: str, reason: str) -> None:
        """One more ``kind`` for ``reason`` (written by the next :meth:`flush`)."""
        with self._lock:
            self._pending[(kind, reason)] += 1

    def gauge(self, kind: str, value: int, reason: str = "") -> None:
        """Set a gauge (written by the next :meth:`flush` when it changed)."""
        with self._lock:
            self._gauges[(kind, reason)] = value

    def flush(self, refresh: bool = False) -> bool:
        """Write what changed (every gauge, with a fresh time, when ``refresh``); False, the
        tallies kept, when the database cannot take them."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
            gauges = {
                key: value
                for key, value in self._gauges.items()
                if refresh or self._written.get(key) != value
            }
        if not pending and not gauges:
            return True
        try:
            with self.session_factory() as session, session.begin():
                now = utcnow()
                for (kind, reason), step in pending.items():
                    _add(session, kind, reason, step, now)
                for (kind, reason), value in gauges.items():
                    _set(session, kind, reason, value, now)
        except SQLAlchemyError as exc:
            with self._lock:
                self._pending.update(pending)
            if not self._failing:
                log.warning("SCP counts not written (kept for the next try): %s", exc)
            self._failing = True
            return False
        self._failing = False
        with self._lock:
            self._written.update(gauges)
        return True


def _add(session: Session, kind: str, reason: str, step: int, now: datetime) -> None:
    _upsert(session, kind, reason, {"value": ScpStat.value + step, "updated_at": now}, step, now)


def _set(session: Session, kind: str, reason: str, value: int, now: datetime) -> None:
    _upsert(session, kind, reason, {"value": value, "updated_at": now}, value, now)


def _upsert(session: Session, kind: str, reason: str, values: dict, first: int, now) -> None:
    """UPDATE the row, or INSERT it with ``first`` when there is none yet."""
    where = (ScpStat.kind == kind) & (ScpStat.reason == reason)
    if session.execute(update(ScpStat).where(where).values(**values)).rowcount:
        return
    try:
        with session.begin_nested():
            session.add(ScpStat(kind=kind, reason=reason, value=first, updated_at=now))
    except IntegrityError:  # another SCP process on this database inserted it meanwhile
        session.execute(update(ScpStat).where(where).values(**values))


def read(session: Session) -> dict[Key, ScpStat]:
    """Every row, by (kind, reason)."""
    return {(row.kind, row.reason): row for row in session.scalars(select(ScpStat))}
