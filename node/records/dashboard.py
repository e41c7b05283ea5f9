"""What the queue dashboard shows: studies per status with the age of the oldest, the work
that needs a person (failed analyses, reports failing or retrying, ignored and suspended
studies) and the workers seen. Reads only; a person's moves are :mod:`node.records.lifecycle`
and :mod:`node.reporting.delivery`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.records import workers
from node.records.db import (
    Analysis,
    AuditEvent,
    Report,
    ReportStatus,
    Study,
    StudyStatus,
    Worker,
    utcnow,
)

S = StudyStatus
WORKER_STALE_AFTER = timedelta(minutes=2)  # a worker silent longer is shown as stale
LIST_LIMIT = 100  # rows per list: the oldest problems first would hide the newest
WAITING = (S.RECEIVING, S.STABLE, S.QUEUED, S.ANALYZING)
# reports a person may need to act on (``sending`` shows one stuck with its worker)
REPORT_PROBLEMS = (ReportStatus.FAILED, ReportStatus.RETRYING, ReportStatus.SENDING)


@dataclass(frozen=True)
class StatusCount:
    """How many studies have one status, and since when the oldest of them has it."""

    status: StudyStatus
    count: int
    oldest_since: datetime | None

    def oldest_age(self, now: datetime) -> timedelta | None:
        return None if self.oldest_since is None else max(now - self.oldest_since, timedelta())


@dataclass(frozen=True)
class StudyRow:
    """One study in a dashboard list (no patient name or ID: the study page shows those)."""

    id: int
    study_instance_uid: str
    accession_number: str | None
    study_description: str | None
    modalities: str
    status: str
    since: datetime
    reason: str | None
    retries: int
    suspended_from: str | None = None
    suspended_by: str | None = None


@dataclass(frozen=True)
class ReportRow:
    """One report that failed, is retrying or is being sent."""

    id: int
    study_id: int
    accession_number: str | None
    destination: str
    status: str
    retries: int
    last_error: str | None
    next_retry_at: datetime | None
    failing_since: datetime | None


@dataclass(frozen=True)
class WorkerRow:
    """One worker as last seen."""

    name: str
    host: str
    queues: str
    model: str | None
    last_seen_at: datetime
    silent_for: timedelta
    stale: bool


def status_counts(session: Session) -> list[StatusCount]:
    """Every status in lifecycle order, with its count and its oldest study's status time."""
    found = {
        status: (count, oldest)
        for status, count, oldest in session.execute(
            select(Study.status, func.count(), func.min(Study.status_changed_at)).group_by(
                Study.status
            )
        )
    }
    return [StatusCount(s, *found.get(s.value, (0, None))) for s in S]


def _study_rows(session: Session, statuses, oldest_first: bool) -> list[StudyRow]:
    since = Study.status_changed_at.asc() if oldest_first else Study.status_changed_at.desc()
    latest_error = (
        select(Analysis.error)
        .where(Analysis.study_id == Study.id, Analysis.error.is_not(None))
        .order_by(Analysis.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    suspended_by = (
        select(AuditEvent.username)
        .where(AuditEvent.study_id == Study.id, AuditEvent.action == "study_suspend")
        .order_by(AuditEvent.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Study, latest_error, suspended_by)
        .where(Study.status.in_([str(s) for s in statuses]))
        .order_by(since, Study.id)
        .limit(LIST_LIMIT)
    )
    return [
        StudyRow(
            id=study.id,
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number,
            study_description=study.study_description,
            modalities=study.modalities,
            status=study.status,
            since=study.status_changed_at,
            reason=study.status_reason or error,
            retries=study.retries,
            suspended_from=study.suspended_from,
            suspended_by=by if study.status == S.SUSPENDED else None,
        )
        for study, error, by in rows
    ]


def failed_analyses(session: Session) -> list[StudyRow]:
    """Failed studies, the most recent failure first, with the reason (the study's, else its
    last run's error)."""
    return _study_rows(session, [S.FAILED], oldest_first=False)


def waiting_studies(session: Session) -> list[StudyRow]:
    """Studies on their way to a result (receiving to analyzing), the longest waiting first."""
    return _study_rows(session, WAITING, oldest_first=True)


def ignored_studies(session: Session) -> list[StudyRow]:
    """Studies no routing rule sent to the model, the most recent first."""
    return _study_rows(session, [S.IGNORED], oldest_first=False)


def suspended_studies(session: Session) -> list[StudyRow]:
    """Studies a person paused, the longest paused first, with who paused them."""
    return _study_rows(session, [S.SUSPENDED], oldest_first=True)


def report_problems(session: Session) -> list[ReportRow]:
    """Reports failed, retrying or being sent, the most recently created first."""
    rows = session.execute(
        select(Report, Analysis.study_id, Study.accession_number)
        .join(Analysis, Report.analysis_id == Analysis.id)
        .join(Study, Analysis.study_id == Study.id)
        .where(Report.status.in_([str(s) for s in REPORT_PROBLEMS]))
        .order_by(Report.id.desc())
        .limit(LIST_LIMIT)
    )
    return [
        ReportRow(
            id=report.id,
            study_id=study_id,
            accession_number=accession,
            destination=report.destination,
            status=report.status,
            retries=report.retries,
            last_error=report.last_error,
            next_retry_at=report.next_retry_at,
            failing_since=report.failing_since,
        )
        for report, study_id, accession in rows
    ]


def workers_seen(session: Session, now: datetime | None = None) -> list[WorkerRow]:
    """Workers by their last heartbeat, the most recent first; one silent for longer than
    :data:`WORKER_STALE_AFTER` is stale (stopped, or its host is gone)."""
    now = now or utcnow()
    return [_worker_row(worker, now) for worker in workers.seen(session)]


def _worker_row(worker: Worker, now: datetime) -> WorkerRow:
    silent = max(workers.silent_since(worker, now), timedelta())
    model = None
    if worker.model_name:
        model = f"{worker.model_name} {worker.model_version or ''}".strip()
    return WorkerRow(
        name=worker.name,
        host=worker.host,
        queues=worker.queues,
        model=model,
        last_seen_at=worker.last_seen_at,
        silent_for=silent,
        stale=silent > WORKER_STALE_AFTER,
    )
