"""The sweeper: the node's clock-driven half of the workflow.

Each pass marks quiet studies stable, moves stable ones to the analysis queue, recovers
work a lost message or a dead worker left behind, and hands what is due to the broker
(:class:`Dispatcher`). Every decision is a committed row first, so a pass that dies
half-way leaves nothing the next pass cannot redo.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from node.records import lifecycle
from node.records.db import Analysis, AnalysisStatus, Study, StudyStatus, utcnow
from node.reporting.delivery import due_reports
from node.workflow import exports, uploads

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
S = StudyStatus


def sweep_once(node: Node) -> list[str]:
    """One pass of the lifecycle sweeper: mark quiet studies stable."""
    with node.session_factory() as session:
        return lifecycle.mark_stable(session, node.settings.study_stable_seconds)


@dataclass(frozen=True)
class DueWork:
    """What the sweeper found to hand out."""

    analyses: list[int]
    reports: list[int]
    exports: list[int] = field(default_factory=list)
    uploads: list[int] = field(default_factory=list)


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
            lifecycle.touch(session, study_id, now)
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
        reports = due_reports(session, now, stale_queue)
        handed_out = exports.due_exports(session, now, stale_queue, dead_worker)
        classify = uploads.due_uploads(session, now, stale_queue, dead_worker)
    return DueWork(analyses, reports, handed_out, classify)


class Dispatcher:
    """The sweeper's second half: hand due analyses and reports to the queue."""

    def __init__(self, node: Node, app) -> None:
        self.node, self.app = node, app

    def __call__(self) -> None:
        from node.workflow.queue import (
            ANALYZE_STUDY,
            CLASSIFY_UPLOAD,
            RUN_EXPORT,
            SEND_REPORT,
            enqueue,
        )

        work = due_work(self.node)
        for study_id in work.analyses:
            enqueue(self.app, ANALYZE_STUDY, study_id)
        for report_id in work.reports:
            enqueue(self.app, SEND_REPORT, report_id)
        for job_id in work.exports:
            enqueue(self.app, RUN_EXPORT, job_id)
        for job_id in work.uploads:
            enqueue(self.app, CLASSIFY_UPLOAD, job_id)


def run(
    node: Node,
    stop: threading.Event,
    interval: float = 1.0,
    dispatch: Callable[[], None] | None = None,
) -> None:
    """Sweep (and ``dispatch`` after each pass) every ``interval`` s until ``stop``."""
    while not stop.is_set():
        try:
            sweep_once(node)
            if dispatch is not None:
                dispatch()
        except SQLAlchemyError:  # the sweeper outlives a database hiccup and retries
            log.exception("lifecycle sweep failed; retrying in %.0f s", interval)
        stop.wait(interval)
