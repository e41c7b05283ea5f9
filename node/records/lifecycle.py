"""The study lifecycle: the one place that moves ``Study.status``.

Every status a study takes is set here: its first (:data:`INITIAL`, used by the ingest's
insert), back to ``receiving`` when an instance arrives late (:func:`status_on_arrival`,
in the ingest's own statement), the sweeper's and the workers' moves (:func:`move_where`,
and :func:`end_run`/:func:`abandon_run` at the end of an analysis run), and the allowed
transitions between them (:data:`ALLOWED`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import case, exists, literal, select, update
from sqlalchemy.orm import Session

from node.records.db import Analysis, Study, StudyStatus, utcnow

log = logging.getLogger(__name__)

S = StudyStatus
INITIAL = S.RECEIVING  # a study's status when its first instance is stored
# Every status goes back to ``receiving`` when an instance arrives (status_on_arrival):
# a result, a report or a failure is about the instances the study had then.
ALLOWED: dict[StudyStatus, frozenset[StudyStatus]] = {
    S.RECEIVING: frozenset({S.STABLE, S.FAILED}),
    S.STABLE: frozenset({S.RECEIVING, S.QUEUED, S.FAILED}),
    S.QUEUED: frozenset({S.RECEIVING, S.ANALYZING, S.STABLE, S.FAILED}),
    S.ANALYZING: frozenset({S.RECEIVING, S.ANALYZED, S.QUEUED, S.FAILED}),
    S.ANALYZED: frozenset({S.RECEIVING, S.REPORTED, S.QUEUED, S.FAILED}),
    S.REPORTED: frozenset({S.RECEIVING, S.QUEUED}),
    S.FAILED: frozenset({S.RECEIVING, S.QUEUED, S.STABLE}),
}


class TransitionError(ValueError):
    """A status change the lifecycle does not allow."""


def move(
    study: Study,
    to: StudyStatus,
    reason: str | None = None,
    now: datetime | None = None,
) -> None:
    """Move ``study`` to ``to`` (caller commits); refuses transitions the lifecycle forbids."""
    current = StudyStatus(study.status)
    if to not in ALLOWED[current]:
        raise TransitionError(f"study {study.study_instance_uid}: {current} -> {to} not allowed")
    study.status = to
    study.status_reason = reason
    study.status_changed_at = now or utcnow()
    if to is S.FAILED:
        study.retries += 1
    log.info(
        "study %s: %s -> %s%s",
        study.study_instance_uid,
        current,
        to,
        f" ({reason})" if reason else "",
    )


def mark_stable(session: Session, stable_seconds: float, now: datetime | None = None) -> list[str]:
    """Mark ``receiving`` studies with no instance for ``stable_seconds`` as ``stable``.

    Works from committed ``last_received_at`` times, so it gives the same answer
    after a restart; each update re-checks its condition so an instance that
    arrives meanwhile keeps its study ``receiving``. Commits; returns the UIDs.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stable_seconds)
    candidates = session.scalars(
        select(Study).where(Study.status == S.RECEIVING, Study.last_received_at <= cutoff)
    ).all()
    marked = []
    for study in candidates:
        result = session.execute(
            update(Study)
            .where(
                Study.id == study.id,
                Study.status == S.RECEIVING,
                Study.last_received_at <= cutoff,
            )
            .values(status=S.STABLE, status_changed_at=now, status_reason=None)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            marked.append(study.study_instance_uid)
            log.info(
                "study %s: receiving -> stable (%d instances, none for %.0f s)",
                study.study_instance_uid,
                study.instance_count,
                stable_seconds,
            )
    session.commit()
    return marked


def move_where(
    session: Session,
    study_id: int,
    allowed_from: set[StudyStatus],
    to: StudyStatus,
    reason: str | None = None,
    now: datetime | None = None,
    older_than: datetime | None = None,
) -> bool:
    """Move one study to ``to`` only if it is in ``allowed_from`` (atomic; caller commits).

    The condition is checked by the database, so two workers (or a worker and the
    sweeper) can race for a study and exactly one wins. ``older_than`` further
    requires the current status to date from before that time.
    """
    for current in allowed_from:
        if to not in ALLOWED[current]:
            raise TransitionError(f"study {study_id}: {current} -> {to} not allowed")
    now = now or utcnow()
    condition = [Study.id == study_id, Study.status.in_([str(s) for s in allowed_from])]
    if older_than is not None:
        condition.append(Study.status_changed_at <= older_than)
    values = {"status": to, "status_reason": reason, "status_changed_at": now}
    if to is S.FAILED:
        values["retries"] = Study.retries + 1
    if to is S.QUEUED and S.ANALYZING not in allowed_from:
        values["analysis_attempts"] = 0  # queued afresh (stable again, or a person asked)
    result = session.execute(
        update(Study)
        .where(*condition)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        log.info("study %d -> %s%s", study_id, to, f" ({reason})" if reason else "")
        return True
    return False


def _run_owns_study(study_id: int, analysis_id: int) -> list:
    """The study is ``analyzing`` for run ``analysis_id``: no instance arrived since (that
    would have made it ``receiving``) and no newer run claimed it."""
    newer = exists().where(Analysis.study_id == study_id, Analysis.id > analysis_id)
    return [Study.id == study_id, Study.status == S.ANALYZING, ~newer]


def end_run(
    session: Session,
    study_id: int,
    analysis_id: int,
    to: StudyStatus,
    reason: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Move a study out of ``analyzing`` at the end of run ``analysis_id`` (``analyzed`` or
    ``failed``), only while that run owns it; False when it does not (caller discards the
    run's result; caller commits)."""
    if to not in ALLOWED[S.ANALYZING]:
        raise TransitionError(f"study {study_id}: {S.ANALYZING} -> {to} not allowed")
    values = {"status": to, "status_reason": reason, "status_changed_at": now or utcnow()}
    if to is S.FAILED:
        values["retries"] = Study.retries + 1
    result = session.execute(
        update(Study)
        .where(*_run_owns_study(study_id, analysis_id))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    log.info("study %d -> %s%s", study_id, to, f" ({reason})" if reason else "")
    return True


def abandon_run(
    session: Session,
    study_id: int,
    analysis_id: int,
    reason: str,
    max_attempts: int,
    now: datetime | None = None,
) -> StudyStatus | None:
    """Run ``analysis_id`` ended without a result: the study goes back to ``queued``, or to
    ``failed`` with ``reason`` once it has used ``max_attempts`` runs. Returns the new status,
    or None when the run no longer owns the study (caller commits)."""
    attempts = Study.analysis_attempts + 1
    give_up = attempts >= max_attempts
    result = session.execute(
        update(Study)
        .where(*_run_owns_study(study_id, analysis_id))
        .values(
            analysis_attempts=attempts,
            status=case((give_up, literal(S.FAILED.value)), else_=literal(S.QUEUED.value)),
            status_reason=case(
                (give_up, literal(f"gave up after {max_attempts} attempts: {reason}"[:1024])),
                else_=literal(reason[:1024]),
            ),
            retries=case((give_up, Study.retries + 1), else_=Study.retries),
            status_changed_at=now or utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    status = S(session.scalar(select(Study.status).where(Study.id == study_id)))
    log.info("study %d -> %s (%s)", study_id, status, reason)
    return status


def touch(session: Session, study_id: int, now: datetime | None = None) -> None:
    """Restart the clock of a study's current status without moving it (work handed out
    again after a lost message); caller commits."""
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(status_changed_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )


def status_on_arrival(reopens):
    """The SQL value of ``Study.status`` when one more instance arrives: ``receiving`` when
    ``reopens`` (a SQL boolean: the instance is an image the analysis reads) or the study
    is still ``stable``; any other instance (an SR, the node's own SR forwarded back by the
    PACS, a key-object note) leaves a finished study as it is, or the node would analyse
    and report it again for ever. A result made meanwhile would describe part of the
    study, so a running analysis discards its result (:func:`end_run`), and the study is
    analysed again, with a new report, once it is stable. The ingest's own statement uses
    it, so receiving costs no extra query."""
    return case(
        (reopens | (Study.status == S.STABLE), literal(S.RECEIVING.value)), else_=Study.status
    )
