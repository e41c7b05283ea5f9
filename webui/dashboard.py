"""The queue dashboard: where studies are and since when, what failed and why, the workers
seen; and the moves a person makes on stuck work (retry, re-send, suspend, resume, force,
discard), each audited with the client address.

Radiologists see it and may retry, re-send, suspend, resume and force; discarding a study
(its files and rows) is for admins. The moves only change rows: the node's dispatcher hands
queued studies and due reports to the workers at its next pass.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from node.records import dashboard, lifecycle
from node.records.db import Analysis, Report, ReportStatus, StudyStatus, utcnow
from webui import audit, node, session
from webui.auth import admin_required
from webui.review import find_study, resend_audited

log = logging.getLogger(__name__)
bp = Blueprint("dashboard", __name__)
S = StudyStatus


def now() -> datetime:
    """The dashboard's clock (tests set it)."""
    return utcnow()


@bp.app_template_filter("age")
def age_text(value: timedelta | None) -> str:
    """A duration as people read it on a dashboard: 45 s, 12 min, 3 h 5 min, 2 d 4 h."""
    if value is None:
        return "—"
    seconds = int(value.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min"
    return f"{hours // 24} d {hours % 24} h"


@bp.app_template_filter("utc")
def utc_text(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "—"


# --------------------------------------------------------------------------- pages


@bp.route("/dashboard")
@login_required
def index():
    db, at = session(), now()
    return render_template(
        "dashboard.html",
        now=at,
        counts=dashboard.status_counts(db),
        failed=dashboard.failed_analyses(db),
        reports=dashboard.report_problems(db),
        waiting=dashboard.waiting_studies(db),
        ignored=dashboard.ignored_studies(db),
        suspended=dashboard.suspended_studies(db),
        workers=dashboard.workers_seen(db, at),
        suspendable={str(s) for s in lifecycle.SUSPENDABLE},
    )


@bp.route("/dashboard.json")
@login_required
def summary():
    """The counts and ages, the workers and the size of each list, for the page's refresh."""
    db, at = session(), now()
    counts = dashboard.status_counts(db)
    return jsonify(
        now=at.isoformat(),
        statuses=[
            {
                "status": str(count.status),
                "count": count.count,
                "oldest_since": count.oldest_since.isoformat() if count.oldest_since else None,
                "oldest_age_seconds": _seconds(count.oldest_age(at)),
                "oldest_age": age_text(count.oldest_age(at)),
            }
            for count in counts
        ],
        lists={
            "failed": len(dashboard.failed_analyses(db)),
            "reports": len(dashboard.report_problems(db)),
            "ignored": len(dashboard.ignored_studies(db)),
            "suspended": len(dashboard.suspended_studies(db)),
        },
        workers=[
            {
                "name": worker.name,
                "host": worker.host,
                "queues": worker.queues,
                "model": worker.model,
                "silent_seconds": _seconds(worker.silent_for),
                "silent_for": age_text(worker.silent_for),
                "stale": worker.stale,
            }
            for worker in dashboard.workers_seen(db, at)
        ],
    )


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else round(value.total_seconds(), 1)


# --------------------------------------------------------------------------- actions


def _done(message: str, category: str = "info"):
    """Tell the user what happened: JSON (409 when nothing was done) for a JSON post, else a
    flash on the dashboard."""
    if request.is_json:
        ok = category != "error"
        return jsonify(ok=ok, message=message), 200 if ok else 409
    flash(message, category)
    return redirect(url_for("dashboard.index"), code=303)


def _study_action(study_id: int, action: str, move) -> tuple:
    """Run ``move(db, study)`` (the lifecycle's conditional move; a message when it moved,
    None when the study was not in a status it moves from), audit and commit it."""
    db = session()
    study = find_study(db, study_id)
    before = study.status
    message = move(db, study)
    if message is None:
        db.rollback()
        return _done(f"Study {study_id} is {before} now: nothing to {action}.", "error")
    audit.record(
        db,
        current_user.username,
        f"study_{action}",
        study_id,
        study_instance_uid=study.study_instance_uid,
        previous_status=before,
    )
    db.commit()
    return _done(message)


def _requeue_after() -> float:
    return node().settings.requeue_after_seconds


@bp.post("/dashboard/studies/<int:study_id>/retry")
@login_required
def retry(study_id: int):
    """A failed analysis back to the queue, its attempts reset."""

    def move(db, study):
        reason = f"retry asked by {current_user.username}"
        if lifecycle.queue_now(db, study.id, {S.FAILED}, _requeue_after(), reason, now()):
            return f"Study {study.id} is queued for analysis again."
        return None

    return _study_action(study_id, "retry", move)


@bp.post("/dashboard/studies/<int:study_id>/force")
@login_required
def force(study_id: int):
    """Analyse a study no routing rule sent to the model."""

    def move(db, study):
        reason = f"analysis forced by {current_user.username}"
        if lifecycle.queue_now(db, study.id, {S.IGNORED}, _requeue_after(), reason, now()):
            return f"Study {study.id} is queued for analysis (forced)."
        return None

    return _study_action(study_id, "force", move)


@bp.post("/dashboard/studies/<int:study_id>/suspend")
@login_required
def suspend(study_id: int):
    """Pause a study: the node leaves it alone until someone resumes it."""

    def move(db, study):
        was = lifecycle.suspend(db, study.id, now())
        return None if was is None else f"Study {study.id} is suspended (it was {was})."

    return _study_action(study_id, "suspend", move)


@bp.post("/dashboard/studies/<int:study_id>/resume")
@login_required
def resume(study_id: int):
    """A suspended study back to the status it was suspended from."""

    def move(db, study):
        to = lifecycle.resume(db, study.id, _requeue_after(), now())
        return None if to is None else f"Study {study.id} is resumed: {to}."

    return _study_action(study_id, "resume", move)


@bp.post("/dashboard/studies/<int:study_id>/discard")
@admin_required
def discard(study_id: int):
    """Delete a study's stored files and rows (admins): never while it is analysed. The
    audit event keeps its UIDs, never patient data."""
    db = session()
    try:
        found = lifecycle.discard(db, study_id)
    except lifecycle.TransitionError as exc:
        db.rollback()
        return _done(f"Study {study_id} is not discarded: {exc}.", "error")
    if found is None:
        db.rollback()
        abort(404, f"Study {study_id} doesn't exist.")
    uid, keys = found
    audit.record(
        db,
        current_user.username,
        "study_discard",
        None,  # the study's row is gone; its id and UID stay in the detail
        discarded_study_id=study_id,
        study_instance_uid=uid,
        instances=len(keys),
    )
    db.commit()
    store, left = node().store, 0
    for key in keys:  # rows first: a file left behind is litter, a row without its file a lie
        try:
            store.remove(key)
        except OSError as exc:
            left += 1
            log.warning("study %s discarded; file %s not removed: %s", uid, key, exc)
    message = f"Study {study_id} is discarded ({len(keys)} instances removed)."
    if left:
        message = f"Study {study_id} is discarded; {left} of its files could not be removed."
    return _done(message, "error" if left else "info")


@bp.post("/dashboard/reports/<int:report_id>/resend")
@login_required
def resend(report_id: int):
    """Send a failed or retrying report again now (its retries and error cleared)."""
    db = session()
    report = db.get(Report, report_id)
    if report is None:
        abort(404, f"Report {report_id} doesn't exist.")
    previous = report.status
    if previous not in (ReportStatus.FAILED, ReportStatus.RETRYING):
        db.rollback()
        return _done(f"Report {report_id} is {previous}: nothing to re-send.", "error")
    study_id = db.scalar(select(Analysis.study_id).where(Analysis.id == report.analysis_id))
    resend_audited(db, report, study_id, previous)
    db.commit()
    return _done(f"The report will be sent to {report.destination} again shortly.")
