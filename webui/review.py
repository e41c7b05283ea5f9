"""Shared parts of the study pages: the study and its latest result, reading a post and
answering it (a flash and the study page, or JSON)."""

from __future__ import annotations

from flask import abort, flash, jsonify, redirect, request, url_for
from flask_login import current_user
from sqlalchemy.orm import Session

from node.records.db import Report, Study
from node.records.results import latest_analysis, latest_report
from node.reporting import delivery
from webui import audit

__all__ = ["answer", "find_study", "latest_analysis", "latest_report", "posted_fields"]


def find_study(db: Session, study_id: int) -> Study:
    """The study with this database id, or a 404 page naming it."""
    study = db.get(Study, study_id)
    if study is None:
        abort(404, f"Study {study_id} doesn't exist.")
    return study


def posted_fields() -> dict:
    """The fields of a form post or of a JSON object body."""
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, "The request body must be a JSON object.")
        return body
    return request.form.to_dict()


def answer(study_id: int, message: str, category: str = "info", anchor: str | None = None):
    """Tell the user what happened: JSON for a JSON post, else a flash and the study page."""
    ok = category != "error"
    if request.is_json:
        return jsonify(ok=ok, message=message), 200 if ok else 400
    flash(message, category)
    return redirect(url_for("study.view", study_id=study_id, _anchor=anchor), code=303)


def resend_audited(db: Session, report: Report, study_id: int, previous: str | None) -> None:
    """Put ``report`` back to be sent at the next sweep, audited as the signed-in user (the
    caller commits)."""
    delivery.resend(db, report)
    db.flush()
    audit.record(
        db,
        current_user.username,
        "resend_report",
        study_id,
        report_id=report.id,
        sop_instance_uid=report.sop_instance_uid,
        destination=report.destination,
        previous_status=previous,
    )
