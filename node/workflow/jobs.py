"""Analysis jobs against the database: claim a study, run the model, record the result.

The plain functions the workers' Celery task calls; every state change is a committed
row, so a lost message or a dead worker leaves work the sweeper hands out again, and a
repeated message finds nothing left to do. The result's report is opened here and
delivered by :mod:`node.reporting.delivery`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from node.analysis import gradcam
from node.analysis.analyze import AnalysisError, AnalysisOptions, analyze_instances
from node.analysis.imaging import ImagingError
from node.analysis.result import ModelIdentity
from node.records import lifecycle, outbox, routing
from node.records.db import (
    Analysis,
    AnalysisStatus,
    Instance,
    Series,
    SlicePrediction,
    StudyStatus,
    utcnow,
)
from node.reporting.delivery import open_report
from node.workflow import retention

if TYPE_CHECKING:
    from node.analysis.bundle import ModelBundle
    from node.runtime import Node

log = logging.getLogger(__name__)
S = StudyStatus
# The same files fail the same way every time: the study fails at once, with the reason.
UNREADABLE = (InvalidDicomError, ImagingError, ValueError, EOFError, NotImplementedError)
# The host's trouble, not the study's (a database hiccup, a full disk): the run is handed
# back without using one of the study's attempts. A stored file that is gone is not.
TRANSIENT = (OperationalError, OSError)


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


def analysis_options(node: Node) -> AnalysisOptions:
    """The settings' options, with the series rules in force choosing the series."""
    with node.session_factory() as session:
        return routing.options_with_rules(session, node.settings)


def run_analysis(
    node: Node, bundle: ModelBundle, study_id: int, worker: str = "worker"
) -> int | None:
    """Analyse one study end to end; returns the new report id (or None).

    A study that cannot be analysed (no CT, no lungs, an unreadable file) fails with its
    reason; any other error propagates, after the study is handed back to the queue, so
    the task layer can retry it; after ``analysis_max_attempts`` such runs it fails with
    the last error.
    """
    analysis_id = claim_study(node, study_id, bundle.info.identity(), worker)
    if analysis_id is None:
        log.info("study %d is not waiting for analysis; nothing to do", study_id)
        return None
    with node.session_factory() as session:
        removed_at = retention.pixels_removed_at(session, study_id)
    if removed_at is not None:  # its files keep headers only: refuse, with the reason
        _finish_failed(node, study_id, analysis_id, retention.removed_reason(removed_at))
        return None
    try:
        with heartbeat(node, analysis_id, node.settings.analysis_timeout_seconds / 6):
            options = analysis_options(node)
            outcome = analyze_instances(instance_paths(node, study_id), bundle, options)
            outcome.result = _with_heatmaps(outcome, bundle, options, study_id)
    except AnalysisError as exc:
        _finish_failed(node, study_id, analysis_id, str(exc))
        return None
    except UNREADABLE as exc:
        _finish_failed(node, study_id, analysis_id, f"unreadable: {type(exc).__name__}: {exc}")
        return None
    except Exception as exc:
        counted = not isinstance(exc, TRANSIENT) or isinstance(exc, FileNotFoundError)
        _abandon(node, study_id, analysis_id, f"{type(exc).__name__}: {exc}", counted)
        raise
    return _record(node, study_id, analysis_id, outcome)


def _with_heatmaps(outcome, bundle: ModelBundle, options: AnalysisOptions, study_id: int):
    """The result with Grad-CAM maps on its key slices; without, logged, when they cannot be
    made (the answer stands without them)."""
    try:
        return gradcam.key_slice_maps(
            outcome.result, outcome.evaluated, bundle, options.window, options.limits
        )
    except (gradcam.GradCamError, ImagingError, OSError, ValueError) as exc:
        log.warning("study %d: no heatmaps (%s: %s)", study_id, type(exc).__name__, exc)
        return outcome.result


@contextmanager
def heartbeat(node: Node, analysis_id: int, every: float) -> Iterator[None]:
    """Record that run ``analysis_id`` is alive every ``every`` s while the block runs, in its
    own session: the sweeper takes a run for lost only when its heartbeat stops."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                with node.session_factory() as session, session.begin():
                    session.execute(
                        update(Analysis)
                        .where(
                            Analysis.id == analysis_id, Analysis.status == AnalysisStatus.RUNNING
                        )
                        .values(heartbeat_at=utcnow())
                    )
            except SQLAlchemyError:  # the next beat may get through; the run goes on
                log.warning("analysis %d: heartbeat not recorded", analysis_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{analysis_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _finish_failed(node: Node, study_id: int, analysis_id: int, reason: str) -> None:
    with node.session_factory() as session, session.begin():
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, Analysis.status == AnalysisStatus.RUNNING)
            .values(status=AnalysisStatus.FAILED, error=reason[:2048], finished_at=utcnow())
        )
        failed = lifecycle.end_run(session, study_id, analysis_id, S.FAILED, reason[:1024])
        if failed:
            outbox.on_analysis_failed(session, node.settings, study_id, analysis_id)
    if failed:
        log.warning("study %d cannot be analysed: %s", study_id, reason)


def _abandon(node: Node, study_id: int, analysis_id: int, reason: str, counted: bool) -> None:
    """Hand a study back after a run that raised: to the queue, or ``failed`` when that was
    its last attempt (``counted``; an uncounted run goes back to the queue as it is)."""
    settings = node.settings
    with node.session_factory() as session, session.begin():
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, Analysis.status == AnalysisStatus.RUNNING)
            .values(status=AnalysisStatus.ABANDONED, error=reason[:2048], finished_at=utcnow())
        )
        if counted:
            status = lifecycle.abandon_run(
                session, study_id, analysis_id, reason, settings.analysis_max_attempts
            )
            if status is S.FAILED:
                outbox.on_analysis_failed(session, settings, study_id, analysis_id)
        else:
            lifecycle.end_run(session, study_id, analysis_id, S.QUEUED, reason[:1024])


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
                assessment=result.assessment(),
                outside_experience=result.outside_experience,
            )
        ).rowcount
        if done != 1:  # the sweeper gave up on this run meanwhile; another run owns the study
            log.warning("analysis %d was abandoned meanwhile; result discarded", analysis_id)
            return None
        if not lifecycle.end_run(session, study_id, analysis_id, S.ANALYZED):
            reason = "the study changed during the analysis (more instances); result discarded"
            session.execute(
                update(Analysis)
                .where(Analysis.id == analysis_id)
                .values(status=AnalysisStatus.ABANDONED, error=reason, finished_at=utcnow())
            )
            log.warning("analysis %d of study %d: %s", analysis_id, study_id, reason)
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
        outbox.on_result(  # in this commit: the event is neither lost nor doubled
            session,
            settings,
            study_id,
            analysis_id,
            result.predicted_class,
            dict(zip(result.classes, result.probabilities, strict=True)),
            (result.model.name, result.model.version),
        )
        if settings.report_destination is None:
            return None
        if result.outside_experience and settings.report_hold_outside_experience:
            log.info("analysis %d: outside the model's experience, SR held", analysis_id)
            return None
        return open_report(session, analysis_id, settings).id
