"""Report delivery: the one owner of a Report's state (pending → sending → sent, retrying,
failed).

Opening a report for a result, claiming it for one delivery at a time, sending its SR,
recording the outcome with the one retry policy, and a re-send asked for by a person all go
through here; the workers' task, the sweeper and the web UI call these functions and never
change a Report row themselves.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.analysis.result import ModelIdentity, SliceResult, StudyResult
from node.records import lifecycle
from node.records.db import Analysis, Instance, Report, ReportStatus, Study, StudyStatus, utcnow
from node.settings import Settings

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
S = StudyStatus
MAX_RETRY_DELAY = 3600.0  # seconds: the back-off stops growing at an hour


class ReportRetry(RuntimeError):
    """A transient delivery failure inside the retry window: try again after ``delay`` s."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class NoDestination(ValueError):
    """No report destination is configured (no ``report_peer`` and not exactly one peer)."""


def retry_delay(settings: Settings, failures: int) -> float:
    """Seconds before the next attempt after ``failures`` failed ones (exponential, capped):
    the one retry policy, counted by ``Report.retries``, for ``report_retry_hours`` from the
    first failure."""
    return min(settings.report_retry_seconds * 2 ** max(failures - 1, 0), MAX_RETRY_DELAY)


def open_report(session: Session, analysis_id: int, settings: Settings) -> Report:
    """A new pending report of an analysis to the configured destination (its SR's UIDs are
    fixed now, so every re-send is the same instance)."""
    destination = settings.report_destination
    if destination is None:
        raise NoDestination("no report destination is configured (set report_peer, or one peer)")
    report = Report(
        analysis_id=analysis_id,
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        destination=destination.name,
        method=settings.report_method,
        status=ReportStatus.PENDING,
        retries=0,
    )
    session.add(report)
    session.flush()
    return report


def resend(session: Session, report: Report, now: datetime | None = None) -> None:
    """Make a report due again at once (a person asked): pending, its retries and error
    cleared; the dispatcher hands it to the report queue at its next pass. A report being
    sent right now is left to that delivery."""
    if report.status == ReportStatus.SENDING:
        return
    report.status = ReportStatus.PENDING
    report.retries = 0
    report.last_error = None
    report.sent_at = None
    report.next_retry_at = None
    report.failing_since = None
    report.due_at = now or utcnow()
    session.flush()


def due_reports(
    session: Session, now: datetime, stale: datetime, lost_send: datetime | None = None
) -> list[int]:
    """Reports to hand to the queue now, marked as handed out (pending or retrying ones
    that are due, and those whose queued message is older than ``stale``: lost). A report
    claimed for sending before ``lost_send`` lost its worker: it is retrying, due now."""
    if lost_send is not None:
        session.execute(
            update(Report)
            .where(Report.status == ReportStatus.SENDING, Report.claimed_at <= lost_send)
            .values(status=ReportStatus.RETRYING, claimed_at=None, due_at=now)
        )
    reports = list(
        session.scalars(
            select(Report.id).where(
                Report.status.in_([ReportStatus.PENDING, ReportStatus.RETRYING]),
                (Report.due_at <= now)
                # the task layer retries on time; this catches retries the broker lost
                | (Report.next_retry_at.is_(None) & (Report.created_at <= stale))
                | (Report.next_retry_at <= stale),
            )
        )
    )
    for report_id in reports:
        session.execute(
            update(Report)
            .where(Report.id == report_id)
            .values(next_retry_at=None, created_at=now, due_at=None)
        )
    return reports


def study_result(node: Node, analysis_id: int) -> tuple[StudyResult, list, Study, Report | None]:
    """Rebuild a stored analysis as a StudyResult, with the evaluated instance headers."""
    with node.session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        study = session.get(Study, analysis.study_id)
        rows = analysis.slices
        keys = {
            i.sop_instance_uid: (i.store_key, i.series.series_instance_uid, i.sop_class_uid)
            for i in session.scalars(
                select(Instance).where(
                    Instance.sop_instance_uid.in_({r.sop_instance_uid for r in rows})
                )
            )
        }
        classes = tuple(analysis.probabilities)
        slices = tuple(
            SliceResult(
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=keys[r.sop_instance_uid][1],
                sop_class_uid=keys[r.sop_instance_uid][2],
                frame=r.frame,
                probabilities=tuple(r.probabilities[c] for c in classes),
            )
            for r in rows
        )
        headers = [
            dcmread(node.store.path(key), stop_before_pixels=True)
            for key, _series, _cls in keys.values()
        ]
        demo = analysis.model_demo
        result = StudyResult(
            classes=classes,
            probabilities=tuple(analysis.probabilities[c] for c in classes),
            predicted_class=analysis.predicted_class,
            rule=analysis.rule,
            slices=slices,
            model=ModelIdentity(analysis.model_name, analysis.model_version, demo=demo),
        )
        return result, headers, study, None


def deliver_report(node: Node, report_id: int, observer) -> str:
    """Claim a report, build its SR and send it; records the outcome; returns the status.

    One delivery of a report at a time: the claim moves it to ``sending`` with a conditional
    UPDATE, so a second call meanwhile (a repeated message, the sweeper) does nothing.
    Raises :class:`ReportRetry` after recording a transient failure inside the retry
    window, so the task layer schedules the next attempt.
    """
    from node.reporting.sr import ReportError, SendError, build_sr, send_sr_dimse, send_sr_stow

    report = _claim(node, report_id)
    if report is None:
        with node.session_factory() as session:
            current = session.get(Report, report_id)
            return current.status if current else "unknown"
    claim = report.claimed_at, report.id
    try:
        peer = node.settings.peer(report.destination)
    except ValueError as exc:
        return _record_failure(node, claim, False, f"report peer no longer configured: {exc}")
    if _superseded(node, report.analysis_id):
        reason = "superseded: the study is analysed again (more images arrived, or a re-analysis)"
        return _record_failure(node, claim, False, reason)
    try:
        result, headers, study, _ = study_result(node, report.analysis_id)
        sr = build_sr(
            headers,
            result,
            observer,
            sop_instance_uid=report.sop_instance_uid,
            series_instance_uid=report.series_instance_uid,
        )
        if report.method == "stow":
            send_sr_stow(sr, peer)
        else:
            send_sr_dimse(sr, node.settings, peer)
    except ReportError as exc:
        return _record_failure(node, claim, False, f"the SR cannot be built: {exc}")
    except SendError as exc:
        return _record_failure(node, claim, exc.transient, str(exc))
    except Exception as exc:  # a stored file gone, a database hiccup: retried in the window
        log.exception("SR delivery %d failed unexpectedly", report_id)
        return _record_failure(node, claim, True, f"{type(exc).__name__}: {exc}")
    with node.session_factory() as session, session.begin():
        _finish(
            session,
            claim,
            status=ReportStatus.SENT,
            sent_at=utcnow(),
            last_error=None,
            next_retry_at=None,
            failing_since=None,
        )
        lifecycle.move_where(session, study.id, {S.ANALYZED}, S.REPORTED)
    log.info(
        "SR %s for study %s sent to %s",
        report.sop_instance_uid,
        study.study_instance_uid,
        report.destination,
    )
    return ReportStatus.SENT


def _claim(node: Node, report_id: int) -> Report | None:
    """Move a pending or retrying report to ``sending`` (atomic); None when it is not."""
    with node.session_factory() as session, session.begin():
        claimed = session.execute(
            update(Report)
            .where(
                Report.id == report_id,
                Report.status.in_([ReportStatus.PENDING, ReportStatus.RETRYING]),
            )
            .values(status=ReportStatus.SENDING, claimed_at=utcnow())
        ).rowcount
        return session.get(Report, report_id) if claimed == 1 else None


def _finish(session: Session, claim: tuple[datetime, int], **values) -> bool:
    """Record the outcome of the delivery that holds ``claim`` (its claim time and the
    report's id); False when the sweeper took the report back meanwhile."""
    claimed_at, report_id = claim
    done = session.execute(
        update(Report)
        .where(
            Report.id == report_id,
            Report.status == ReportStatus.SENDING,
            Report.claimed_at == claimed_at,
        )
        .values(claimed_at=None, **values)
    ).rowcount
    if done != 1:
        log.warning("SR delivery %d: taken back meanwhile; outcome not recorded", report_id)
    return done == 1


def _superseded(node: Node, analysis_id: int) -> bool:
    """Whether the study is analysed again after this analysis (more images arrived, or a
    person asked): this SR would describe what the study was, and the new run reports."""
    with node.session_factory() as session:
        study_id = session.scalar(select(Analysis.study_id).where(Analysis.id == analysis_id))
        newer = session.scalar(
            select(Analysis.id).where(Analysis.study_id == study_id, Analysis.id > analysis_id)
        )
        status = session.scalar(select(Study.status).where(Study.id == study_id))
        return newer is not None or status in (S.RECEIVING, S.STABLE, S.QUEUED, S.ANALYZING)


def _record_failure(node: Node, claim: tuple[datetime, int], transient: bool, error: str) -> str:
    """Record a failed delivery: retrying while transient and inside ``report_retry_hours``
    of the first failure (then :class:`ReportRetry` is raised), else failed."""
    settings = node.settings
    now = utcnow()
    report_id = claim[1]
    with node.session_factory() as session, session.begin():
        report = session.get(Report, report_id)
        retries = report.retries + 1
        failing_since = report.failing_since or now
        hours = settings.report_retry_hours
        delay = None
        if transient and now - failing_since < timedelta(hours=hours):
            delay = retry_delay(settings, retries)
            status, next_retry_at = ReportStatus.RETRYING, now + timedelta(seconds=delay)
        else:
            status, next_retry_at = ReportStatus.FAILED, None
            if transient:
                error = f"{error} (gave up after {retries} attempts over {hours:g} h)"
        recorded = _finish(
            session,
            claim,
            status=status,
            retries=retries,
            last_error=error[:1024],
            failing_since=failing_since,
            next_retry_at=next_retry_at,
        )
    if not recorded:
        return ReportStatus.SENDING
    log.warning("SR delivery %d: %s (%s)", report_id, error, status)
    if delay is not None:
        raise ReportRetry(error, delay)
    return status
