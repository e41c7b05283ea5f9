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

from sqlalchemy import case, delete, exists, literal, select, type_coerce, update
from sqlalchemy.orm import Session

from node.records.db import (
    Analysis,
    Instance,
    Report,
    ReportStatus,
    Series,
    Study,
    StudyStatus,
    UTCDateTime,
    utcnow,
)

log = logging.getLogger(__name__)

S = StudyStatus
INITIAL = S.RECEIVING  # a study's status when its first instance is stored
# Every status goes back to ``receiving`` when an instance arrives (status_on_arrival):
# a result, a report or a failure is about the instances the study had then.
ALLOWED: dict[StudyStatus, frozenset[StudyStatus]] = {
    S.RECEIVING: frozenset({S.STABLE, S.FAILED, S.SUSPENDED}),
    S.STABLE: frozenset({S.RECEIVING, S.QUEUED, S.FAILED, S.IGNORED, S.SUSPENDED}),
    S.QUEUED: frozenset({S.RECEIVING, S.ANALYZING, S.STABLE, S.FAILED, S.SUSPENDED}),
    S.ANALYZING: frozenset({S.RECEIVING, S.ANALYZED, S.QUEUED, S.FAILED}),
    S.ANALYZED: frozenset({S.RECEIVING, S.REPORTED, S.QUEUED, S.FAILED}),
    S.REPORTED: frozenset({S.RECEIVING, S.QUEUED}),
    S.FAILED: frozenset({S.RECEIVING, S.QUEUED, S.STABLE, S.SUSPENDED}),
    # no routing rule matched: kept, visible, and analysed only when a person forces it
    S.IGNORED: frozenset({S.RECEIVING, S.QUEUED, S.SUSPENDED}),
    # paused by a person; resumed to the status it had (``Study.suspended_from``)
    S.SUSPENDED: frozenset({S.RECEIVING, S.STABLE, S.QUEUED, S.FAILED, S.IGNORED}),
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
        extra={"study_instance_uid": study.study_instance_uid, "study_id": study.id},
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
                extra={"study_instance_uid": study.study_instance_uid, "study_id": study.id},
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
        _moved(study_id, to, reason)
        return True
    return False


def _moved(study_id: int, to: StudyStatus, reason: str | None) -> None:
    log.info(
        "study %d -> %s%s", study_id, to, f" ({reason})" if reason else "",
        extra={"study_id": study_id},
    )  # fmt: skip


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
    _moved(study_id, to, reason)
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
    log.info("study %d -> %s (%s)", study_id, status, reason, extra={"study_id": study_id})
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
    it, so receiving costs no extra query. A ``suspended`` study stays suspended: what
    arrives changes the status it resumes to (:func:`suspended_from_on_arrival`)."""
    return case((Study.status == S.SUSPENDED, Study.status), else_=_arriving(Study.status, reopens))


def suspended_from_on_arrival(reopens):
    """The SQL value of ``Study.suspended_from`` when one more instance arrives: what
    :func:`status_on_arrival` would have made of it (a suspended stable study resumes as
    ``receiving`` once an image arrived)."""
    return case(
        (Study.status == S.SUSPENDED, _arriving(Study.suspended_from, reopens)),
        else_=Study.suspended_from,
    )


def changed_at_on_arrival(reopens, at):
    """The SQL value of ``Study.status_changed_at`` when one more instance arrives at ``at``:
    ``at`` when the arrival changes the status (a finished study reopened), else as it was,
    so the age of a ``receiving`` study is how long it has been receiving."""
    reopened = Study.status.not_in([S.RECEIVING.value, S.SUSPENDED.value]) & (
        reopens | (Study.status == S.STABLE)
    )
    return case((reopened, type_coerce(at, UTCDateTime())), else_=Study.status_changed_at)


def _arriving(status, reopens):
    return case((reopens | (status == S.STABLE), literal(S.RECEIVING.value)), else_=status)


# --------------------------------------------------------------------------- a person's moves

# What a person may pause: work not yet started, failed or ignored (never a running
# analysis, whose worker would not know; never a finished result).
SUSPENDABLE = frozenset({S.RECEIVING, S.STABLE, S.QUEUED, S.FAILED, S.IGNORED})


def queue_now(
    session: Session,
    study_id: int,
    allowed_from: set[StudyStatus],
    requeue_after_seconds: float,
    reason: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Queue a study at a person's request (a failed one retried, an ignored one forced) with
    its attempts reset, if it is in ``allowed_from``; caller commits.

    The dispatcher hands a ``queued`` study out again once its status is older than
    ``requeue_after_seconds`` (its message was lost). A study queued here has had no message
    at all, so its clock is set back by that much: the dispatcher's next pass hands it out
    and restarts the clock (:func:`touch`).
    """
    due = (now or utcnow()) - timedelta(seconds=requeue_after_seconds)
    return move_where(session, study_id, set(allowed_from), S.QUEUED, reason, now=due)


def suspend(session: Session, study_id: int, now: datetime | None = None) -> StudyStatus | None:
    """Pause a study (a person asked): ``suspended``, with the status it had kept in
    ``suspended_from``; only from :data:`SUSPENDABLE`, in one conditional UPDATE. Returns the
    status it had, or None when it was in none of them (caller commits)."""
    resumes_to = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.status.in_([str(s) for s in SUSPENDABLE]))
        .values(status=S.SUSPENDED, suspended_from=Study.status, status_changed_at=now or utcnow())
        .returning(Study.suspended_from)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if resumes_to is None:
        return None
    log.info("study %d: %s -> suspended", study_id, resumes_to)
    return S(resumes_to)


def resume(
    session: Session,
    study_id: int,
    requeue_after_seconds: float,
    now: datetime | None = None,
) -> StudyStatus | None:
    """Resume a suspended study to the status it was suspended from (``receiving`` if images
    arrived meanwhile); a ``queued`` one is handed out at the dispatcher's next pass (see
    :func:`queue_now`). Returns the new status, or None when the study is not suspended or
    changed meanwhile (caller commits)."""
    now = now or utcnow()
    target = session.scalar(
        select(Study.suspended_from).where(Study.id == study_id, Study.status == S.SUSPENDED)
    )
    if target is None:
        return None
    target = S(target)
    if target not in ALLOWED[S.SUSPENDED]:
        raise TransitionError(f"study {study_id}: suspended -> {target} not allowed")
    if target is S.QUEUED:
        now -= timedelta(seconds=requeue_after_seconds)
    result = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.status == S.SUSPENDED, Study.suspended_from == target)
        .values(status=target, suspended_from=None, status_changed_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    log.info("study %d: suspended -> %s", study_id, target)
    return target


def discard(session: Session, study_id: int) -> tuple[str, list[str]] | None:
    """Delete a study's rows (series, instances, analyses, reports, labels, verdicts; the
    audit trail keeps its events, unlinked) and return its Study Instance UID and the store
    keys of its instances, for the caller to remove once this is committed; None when there
    is no such study. Refused (:class:`TransitionError`) while it is analysed or one of its
    reports is being sent.

    The study's row is locked first (a no-op UPDATE), so no worker claims it and no instance
    joins it unseen until the caller commits: an instance arriving meanwhile is refused and
    sent again by its sender, and then starts a new study.
    """
    locked = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.status != S.ANALYZING)
        .values(status_changed_at=Study.status_changed_at)
        .execution_options(synchronize_session=False)
    ).rowcount
    uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
    if uid is None:
        return None
    if not locked:
        raise TransitionError("it is being analysed; discard it once the analysis ends")
    sending = session.scalar(
        select(Report.id)
        .join(Analysis, Report.analysis_id == Analysis.id)
        .where(Analysis.study_id == study_id, Report.status == ReportStatus.SENDING)
        .limit(1)
    )
    if sending is not None:
        raise TransitionError("its report is being sent; try again shortly")
    keys = list(
        session.scalars(
            select(Instance.store_key)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
        )
    )
    session.execute(
        delete(Study).where(Study.id == study_id).execution_options(synchronize_session=False)
    )
    log.info("study %s discarded (%d instances)", uid, len(keys))
    return uid, keys
