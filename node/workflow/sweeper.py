"""The sweeper: the node's clock-driven half of the workflow.

Each pass marks quiet studies stable, moves stable ones to the analysis queue, recovers
work a lost message or a dead worker left behind, and hands what is due to the broker
(:class:`Dispatcher`). Every decision is a committed row first, so a pass that dies
half-way leaves nothing the next pass cannot redo.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update

from node.records import lifecycle, outbox, routing
from node.records.db import Analysis, AnalysisStatus, Study, StudyStatus, utcnow
from node.reporting.delivery import due_reports
from node.workflow import exports, notifications, retention, uploads

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
S = StudyStatus
MAX_BACKOFF = 60.0  # seconds between passes while they keep failing


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
    notifications: list[int] = field(default_factory=list)


def due_work(node: Node, now: datetime | None = None) -> DueWork:
    """Studies and reports to (re-)enqueue; moves stable studies to ``queued`` and recovers
    runs whose worker died (no heartbeat for ``analysis_timeout_seconds``)."""
    settings = node.settings
    now = now or utcnow()
    stale_queue = now - timedelta(seconds=settings.requeue_after_seconds)
    dead_worker = now - timedelta(seconds=settings.analysis_timeout_seconds)
    lost_send = now - timedelta(seconds=settings.report_lease_seconds)
    analyses: list[int] = []
    with node.session_factory() as session, session.begin():
        analyses += _route_stable(session, now)
        for study_id in session.scalars(
            select(Study.id).where(Study.status == S.QUEUED, Study.status_changed_at <= stale_queue)
        ):
            # Lost message or broker outage: hand it out again (claiming is idempotent).
            lifecycle.touch(session, study_id, now)
            analyses.append(study_id)
        analyses += _recover_lost_runs(session, settings, now, dead_worker)
        reports = due_reports(session, now, stale_queue, lost_send)
        handed_out = exports.due_exports(session, now, stale_queue, dead_worker)
        exports.expire_exports(session, settings, now)  # issue 14: bundles past retention
        classify = uploads.due_uploads(session, now, stale_queue, dead_worker)
        notify = notifications.due_notifications(session, settings, now)
    return DueWork(analyses, reports, handed_out, classify, notify)


def _route_stable(session, now: datetime) -> list[int]:
    """Move stable studies to ``queued`` when the first study rule they match says analyse;
    the others to ``ignored`` with the reason (the rule, or that none matched)."""
    stable = session.scalars(select(Study.id).where(Study.status == S.STABLE)).all()
    if not stable:
        return []
    rules = routing.load_rules(session, routing.STUDY)
    looks = routing.needs_facts(rules)
    queued = []
    for study_id in stable:
        try:
            facts = routing.study_facts(session, study_id) if looks else routing.StudyFacts()
        except LookupError:  # deleted meanwhile (discarded by a person)
            continue
        decision = routing.decide_study(rules, facts)
        if not decision.analyze:
            lifecycle.move_where(session, study_id, {S.STABLE}, S.IGNORED, decision.reason, now)
        elif lifecycle.move_where(session, study_id, {S.STABLE}, S.QUEUED, now=now):
            queued.append(study_id)
    return queued


def _recover_lost_runs(session, settings, now: datetime, dead_worker: datetime) -> list[int]:
    """Abandon running analyses whose heartbeat stopped before ``dead_worker``; their studies
    go back to the queue (returned), or fail once they have used their attempts."""
    last_sign = func.coalesce(Analysis.heartbeat_at, Analysis.started_at)
    silent = [Analysis.status == AnalysisStatus.RUNNING, last_sign <= dead_worker]
    reason = f"worker lost (no heartbeat for {settings.analysis_timeout_seconds:.0f} s)"
    requeued = []
    for analysis_id, study_id in session.execute(
        select(Analysis.id, Analysis.study_id).where(*silent)
    ).all():
        lost = session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id, *silent)
            .values(status=AnalysisStatus.ABANDONED, error=reason, finished_at=now)
        ).rowcount
        if not lost:
            continue
        status = lifecycle.abandon_run(
            session, study_id, analysis_id, reason, settings.analysis_max_attempts, now
        )
        if status is S.QUEUED:
            requeued.append(study_id)
        elif status is S.FAILED:
            outbox.on_analysis_failed(session, settings, study_id, analysis_id)
    return requeued


class Dispatcher:
    """The sweeper's second half: hand due analyses and reports to the queue."""

    def __init__(self, node: Node, app) -> None:
        self.node, self.app = node, app

    def __call__(self) -> None:
        from node.workflow.queue import (
            ANALYZE_STUDY,
            CLASSIFY_UPLOAD,
            RUN_EXPORT,
            SEND_NOTIFICATION,
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
        for notification_id in work.notifications:
            enqueue(self.app, SEND_NOTIFICATION, notification_id)


def run(
    node: Node,
    stop: threading.Event,
    interval: float = 1.0,
    dispatch: Callable[[], None] | None = None,
) -> None:
    """Sweep (and ``dispatch`` after each pass) every ``interval`` s until ``stop``.

    A pass that fails, whatever the error, is logged and tried again, waiting longer after
    each failure in a row: the node's lifecycle must outlive a database hiccup or a bug in
    one pass.
    """
    failures = 0
    retention_due = time.monotonic()  # retention and the orphan sweep: now, then each interval
    while not stop.is_set():
        try:
            sweep_once(node)
            if dispatch is not None:
                dispatch()
            failures = 0
        except Exception:
            failures += 1
            wait = min(interval * 2**failures, MAX_BACKOFF)
            log.exception(
                "lifecycle sweep failed (%d in a row); retrying in %.1f s", failures, wait
            )
            stop.wait(wait)
            continue
        retention_due = _retention_pass(node, retention_due)
        stop.wait(interval)


def _retention_pass(node: Node, due: float) -> float:
    """Run retention (and the orphan sweep) once it is due; returns when it is next due.

    A few studies a pass, so the lifecycle's own work never waits long; its failure is
    logged and waits for the next interval, never slowing the lifecycle's passes (back-off)."""
    now = time.monotonic()
    if now < due:
        return due
    interval = node.settings.retention_interval_seconds
    try:
        done = retention.run_retention(node, max_studies=retention.STUDIES_PER_PASS)
    except Exception:
        log.exception("retention run failed; next try in %.0f s", interval)
        return now + interval
    return now if done.more else now + interval  # more to take: go on after the next pass
