"""Analysis and report jobs against the database: claim, run, record, deliver.

These are the plain functions the Celery tasks call; every state change is a
committed row, so a lost message or a dead worker leaves work the sweeper can
hand out again, and a repeated message finds nothing left to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from node import lifecycle
from node.analysis import AnalysisError, AnalysisOptions, analyze_instances
from node.db import (
    Analysis,
    AnalysisStatus,
    Instance,
    Report,
    ReportStatus,
    Series,
    SlicePrediction,
    Study,
    StudyStatus,
    utcnow,
)
from node.imaging import Window
from node.result import ModelIdentity, SliceResult, StudyResult
from node.settings import Settings

if TYPE_CHECKING:
    from node.bundle import ModelBundle
    from node.service import Node

log = logging.getLogger(__name__)
S = StudyStatus


def analysis_options(settings: Settings) -> AnalysisOptions:
    """The pipeline options the settings ask for."""
    return AnalysisOptions(
        window=Window(settings.window_center, settings.window_width),
        stride=settings.slice_stride,
        min_lung_fraction=settings.min_lung_fraction,
        rule=settings.aggregation_rule,
    )


def claim_study(node: Node, study_id: int, model: ModelIdentity, worker: str) -> int | None:
    """Move a queued study to ``analyzing`` and open an Analysis row for it.

    Returns the analysis id, or None when the study is not waiting (already taken,
    done, or unknown): a repeated message then does nothing.
    """
    now = utcnow()
    with node.session_factory() as session, session.begin():
        if not lifecycle.move_where(session, study_id, {S.QUEUED}, S.ANALYZING, now=now):
            return None
        analysis = Analysis(
            study_id=study_id,
            model_name=model.name,
            model_version=model.version,
            model_demo=model.demo,
            status=AnalysisStatus.RUNNING,
            worker=worker,
            started_at=now,
            timings={},
            instances_skipped={},
        )
        session.add(analysis)
        session.flush()
        return analysis.id


def instance_paths(node: Node, study_id: int) -> list[Path]:
    """The stored files of a study."""
    with node.session_factory() as session:
        keys = session.scalars(
            select(Instance.store_key)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .order_by(Instance.id)
        ).all()
    return [node.store.path(key) for key in keys]


def run_analysis(
    node: Node, bundle: ModelBundle, study_id: int, worker: str = "worker"
) -> int | None:
    """Analyse one study end to end; returns the new report id (or None).

    A study that cannot be analysed (no CT, no lungs) fails with its reason; any
    other error propagates, after the study is handed back to the queue, so the
    task layer can retry it.
    """
    analysis_id = claim_study(node, study_id, bundle.info.identity(), worker)
    if analysis_id is None:
        log.info("study %d is not waiting for analysis; nothing to do", study_id)
        return None
    try:
        outcome = analyze_instances(
            instance_paths(node, study_id), bundle, analysis_options(node.settings)
        )
    except AnalysisError as exc:
        _finish_failed(node, study_id, analysis_id, str(exc))
        return None
    except Exception as exc:
        _abandon(node, study_id, analysis_id, f"{type(exc).__name__}: {exc}")
        raise
    return _record(node, study_id, analysis_id, outcome)


def _finish_failed(node: Node, study_id: int, analysis_id: int, reason: str) -> None:
    with node.session_factory() as session, session.begin():
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id)
            .values(status=AnalysisStatus.FAILED, error=reason[:2048], finished_at=utcnow())
        )
        lifecycle.move_where(session, study_id, {S.ANALYZING}, S.FAILED, reason=reason[:1024])
    log.warning("study %d cannot be analysed: %s", study_id, reason)


def _abandon(node: Node, study_id: int, analysis_id: int, reason: str) -> None:
    with node.session_factory() as session, session.begin():
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, Analysis.status == AnalysisStatus.RUNNING)
            .values(status=AnalysisStatus.ABANDONED, error=reason[:2048], finished_at=utcnow())
        )
        lifecycle.move_where(session, study_id, {S.ANALYZING}, S.QUEUED, reason=reason[:1024])


def _record(node: Node, study_id: int, analysis_id: int, outcome) -> int | None:
    """Store the result, move the study to ``analyzed`` and open its report, in one commit."""
    result = outcome.result
    settings = node.settings
    with node.session_factory() as session, session.begin():
        done = session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, Analysis.status == AnalysisStatus.RUNNING)
            .values(
                status=AnalysisStatus.DONE,
                finished_at=utcnow(),
                timings=outcome.timings,
                rule=result.rule,
                predicted_class=result.predicted_class,
                probabilities=dict(zip(result.classes, result.probabilities, strict=True)),
                slices_evaluated=len(result.slices),
                instances_skipped=outcome.skipped,
            )
        ).rowcount
        if done != 1:  # the sweeper gave up on this run meanwhile; another run owns the study
            log.warning("analysis %d was abandoned meanwhile; result discarded", analysis_id)
            return None
        session.add_all(
            SlicePrediction(
                analysis_id=analysis_id,
                position=position,
                sop_instance_uid=item.sop_instance_uid,
                frame=item.frame,
                probabilities=dict(zip(result.classes, item.probabilities, strict=True)),
            )
            for position, item in enumerate(result.slices)
        )
        lifecycle.move_where(session, study_id, {S.ANALYZING}, S.ANALYZED)
        destination = settings.report_destination
        if destination is None:
            return None
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
        return report.id


@dataclass(frozen=True)
class DueWork:
    """What the sweeper found to hand out."""

    analyses: list[int]
    reports: list[int]


def due_work(node: Node, now: datetime | None = None) -> DueWork:
    """Studies and reports to (re-)enqueue; moves stable studies to ``queued`` and recovers
    studies whose worker died (``analyzing`` past the timeout)."""
    settings = node.settings
    now = now or utcnow()
    stale_queue = now - timedelta(seconds=settings.requeue_after_seconds)
    dead_worker = now - timedelta(seconds=settings.analysis_timeout_seconds)
    analyses: list[int] = []
    with node.session_factory() as session, session.begin():
        for study_id in session.scalars(select(Study.id).where(Study.status == S.STABLE)):
            if lifecycle.move_where(session, study_id, {S.STABLE}, S.QUEUED, now=now):
                analyses.append(study_id)
        for study_id in session.scalars(
            select(Study.id).where(Study.status == S.QUEUED, Study.status_changed_at <= stale_queue)
        ):
            # Lost message or broker outage: hand it out again (claiming is idempotent).
            session.execute(update(Study).where(Study.id == study_id).values(status_changed_at=now))
            analyses.append(study_id)
        for study_id in session.scalars(
            select(Study.id).where(
                Study.status == S.ANALYZING, Study.status_changed_at <= dead_worker
            )
        ):
            session.execute(
                update(Analysis)
                .where(Analysis.study_id == study_id, Analysis.status == AnalysisStatus.RUNNING)
                .values(status=AnalysisStatus.ABANDONED, error="worker lost", finished_at=now)
            )
            if lifecycle.move_where(
                session, study_id, {S.ANALYZING}, S.QUEUED, reason="worker lost", now=now
            ):
                analyses.append(study_id)
        reports = list(
            session.scalars(
                select(Report.id).where(
                    Report.status.in_([ReportStatus.PENDING, ReportStatus.RETRYING]),
                    (Report.next_retry_at.is_(None) & (Report.created_at <= stale_queue))
                    # the task layer retries on time; this catches retries the broker lost
                    | (Report.next_retry_at <= stale_queue),
                )
            )
        )
        for report_id in reports:
            session.execute(
                update(Report)
                .where(Report.id == report_id)
                .values(next_retry_at=None, created_at=now)
            )
    return DueWork(analyses, reports)


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


class ReportRetry(RuntimeError):
    """A transient delivery failure: the task layer retries it later."""


def deliver_report(node: Node, report_id: int, observer) -> str:
    """Build the SR for a report and send it; records the outcome; returns the status.

    Raises :class:`ReportRetry` after recording a transient failure that has
    retries left, so the task layer schedules the next attempt.
    """
    from node.report import SendError, build_sr, send_sr_dimse, send_sr_stow

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
    with node.session_factory() as session, session.begin():
        report = session.get(Report, report_id)
        report.retries += 1
        report.last_error = str(exc)[:1024]
        if exc.transient and report.retries <= settings.report_max_retries:
            delay = min(settings.report_retry_seconds * 2 ** (report.retries - 1), 3600)
            report.status = ReportStatus.RETRYING
            report.next_retry_at = utcnow() + timedelta(seconds=delay)
            status = ReportStatus.RETRYING
        else:
            report.status = ReportStatus.FAILED
            report.next_retry_at = None
            status = ReportStatus.FAILED
    log.warning("SR delivery %d: %s (%s)", report_id, exc, status)
    if status == ReportStatus.RETRYING:
        raise ReportRetry(str(exc))
    return status


class Dispatcher:
    """The sweeper's second half: hand due analyses and reports to the queue."""

    def __init__(self, node: Node, app) -> None:
        self.node, self.app = node, app

    def __call__(self) -> None:
        from node.queue import ANALYZE_STUDY, SEND_REPORT, enqueue

        work = due_work(self.node)
        for study_id in work.analyses:
            enqueue(self.app, ANALYZE_STUDY, study_id)
        for report_id in work.reports:
            enqueue(self.app, SEND_REPORT, report_id)
