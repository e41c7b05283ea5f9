"""Report delivery: the one owner of a Report's state (pending → sent, retrying, failed).

Opening a report for a result, sending its SR, recording the outcome with the one retry
policy, and a re-send asked for by a person all go through here; the workers' task, the
sweeper and the web UI call these functions and never change a Report row themselves.
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
    """A transient delivery failure that has retries left: try again after ``delay`` s."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class NoDestination(ValueError):
    """No report destination is configured (no ``report_peer`` and not exactly one peer)."""


def retry_delay(settings: Settings, failures: int) -> float:
    """Seconds before the next attempt after ``failures`` failed ones (exponential, capped):
    the one retry policy, counted by ``Report.retries``."""
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
    cleared; the dispatcher hands it to the report queue at its next pass."""
    report.status = ReportStatus.PENDING
    report.retries = 0
    report.last_error = None
    report.sent_at = None
    report.next_retry_at = None
    report.due_at = now or utcnow()
    session.flush()


def due_reports(session: Session, now: datetime, stale: datetime) -> list[int]:
    """Reports to hand to the queue now, marked as handed out (pending or retrying ones
    that are due, and those whose queued message is older than ``stale``: lost)."""
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
    """Build the SR for a report and send it; records the outcome; returns the status.

    Raises :class:`ReportRetry` after recording a transient failure that has
    retries left, so the task layer schedules the next attempt.
    """
    from node.reporting.sr import SendError, build_sr, send_sr_dimse, send_sr_stow

    settings = node.settings
    with node.session_factory() as session:
        report = session.get(Report, report_id)
        if report is None or report.status in (ReportStatus.SENT, ReportStatus.FAILED):
            return report.status if report else "unknown"
        analysis_id, destination, method = report.analysis_id, report.destination, report.method
        sop_uid, series_uid = report.sop_instance_uid, report.series_instance_uid
    result, headers, study, _ = study_result(node, analysis_id)
    sr = build_sr(
        headers, result, observer, sop_instance_uid=sop_uid, series_instance_uid=series_uid
    )
    peer = settings.peer(destination)
    try:
        if method == "stow":
            send_sr_stow(sr, peer)
        else:
            send_sr_dimse(sr, settings, peer)
    except SendError as exc:
        return _record_send_failure(node, report_id, exc)
    with node.session_factory() as session, session.begin():
        session.execute(
            update(Report)
            .where(Report.id == report_id)
            .values(status=ReportStatus.SENT, sent_at=utcnow(), last_error=None, next_retry_at=None)
        )
        lifecycle.move_where(session, study.id, {S.ANALYZED}, S.REPORTED)
    log.info("SR %s for study %s sent to %s", sop_uid, study.study_instance_uid, destination)
    return ReportStatus.SENT


def _record_send_failure(node: Node, report_id: int, exc) -> str:
    settings = node.settings
    delay = None
    with node.session_factory() as session, session.begin():
        report = session.get(Report, report_id)
        report.retries += 1
        report.last_error = str(exc)[:1024]
        if exc.transient and report.retries <= settings.report_max_retries:
            delay = retry_delay(settings, report.retries)
            report.status = ReportStatus.RETRYING
            report.next_retry_at = utcnow() + timedelta(seconds=delay)
            status = ReportStatus.RETRYING
        else:
            report.status = ReportStatus.FAILED
            report.next_retry_at = None
            status = ReportStatus.FAILED
    log.warning("SR delivery %d: %s (%s)", report_id, exc, status)
    if delay is not None:
        raise ReportRetry(str(exc), delay)
    return status
