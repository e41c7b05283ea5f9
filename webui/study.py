"""Study review: header, slice viewer, the result and its SR delivery, radiologists' verdicts."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    make_response,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import select

from node.analysis import calibration
from node.analysis.imaging import ImageTooLarge, ImagingError
from node.analysis.result import CLASSES, ModelIdentity
from node.records.db import Analysis, ReportKind, Verdict, utcnow
from node.records.labels import effective_keyword_classes, labels_of
from node.reporting import chain, delivery
from node.workflow.retention import removed_reason
from webui import audit, node, session, viewer
from webui.review import (
    answer,
    find_study,
    latest_analysis,
    latest_report,
    posted_fields,
    resend_audited,
)

log = logging.getLogger(__name__)
bp = Blueprint("study", __name__)
VERDICT_COMMENT_MAX_LENGTH = 1024
SLICE_MAX_AGE = 24 * 3600  # a slice URL carries the slice list's version, so it may be kept
SLICE_AUDIT_WINDOW = timedelta(hours=1)  # one slice_view event per user, study and hour
REPORT_KINDS = {
    ReportKind.MODEL: "model result",
    ReportKind.REANALYSIS: "re-analysis",
    ReportKind.CORRECTION: "radiologist correction",
}


def _slice_cache() -> viewer.SliceListCache:
    return current_app.extensions.setdefault("ainode_slice_lists", viewer.SliceListCache())


@bp.context_processor
def _formatting() -> dict:
    def utc_time(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "—"

    def dicom_date(value: str | None) -> str:
        if value and len(value) == 8 and value.isdigit():
            return f"{value[:4]}-{value[4:6]}-{value[6:]}"
        return value or "—"

    return {
        "utc_time": utc_time,
        "dicom_date": dicom_date,
        "report_kinds": REPORT_KINDS,
        "describe_decision": calibration.describe,  # how the class was decided, in words
    }


# --------------------------------------------------------------------------- pages


@bp.route("/studies/<int:study_id>")
@login_required
def view(study_id: int):
    db = session()
    study = find_study(db, study_id)
    result = latest_analysis(db, study_id, done=True)
    attempt = latest_analysis(db, study_id)
    slices = viewer.slice_list(node(), db, study, result, _slice_cache())
    key_maps = viewer.key_slice_maps(slices, result)
    settings = node().settings
    page = render_template(
        "study.html",
        study=study,
        result=result,
        attempt=attempt if attempt is not None and attempt is not result else None,
        model=_model(result),
        classes=CLASSES,
        report=latest_report(db, result),
        reports=chain.report_chain(db, study_id),
        destination=settings.report_destination,
        hold_outside_experience=settings.report_hold_outside_experience,
        verdicts=db.scalars(
            select(Verdict)
            .where(Verdict.study_id == study_id)
            .order_by(Verdict.at.desc(), Verdict.id.desc())
        ).all(),
        labels=labels_of(db, study_id),
        keywords=list(effective_keyword_classes(settings, db)),
        slices=slices,
        viewer_data={
            "count": len(slices.slices),
            "url": url_for("study.slice_png", study_id=study_id, n=0).rsplit("/", 1)[0],
            "version": slices.version,
            "strip": viewer.strip_values(slices, result),
            "strip_classes": list(viewer.STRIP_CLASSES),
            "key_slices": [
                {
                    "n": n,
                    "rank": key["rank"],
                    "class": key.get("class"),
                    "evidence": key.get("evidence"),
                    "heatmap": key["heatmap"] is not None,
                }
                for n, key in sorted(key_maps.items(), key=lambda item: item[1]["rank"])
            ],
            "heatmap_url": url_for("study.heatmap_png", study_id=study_id, n=0).rsplit("/", 1)[0],
        },
    )
    audit.record(db, current_user.username, "study_view", study_id)
    db.commit()
    response = make_response(page)
    response.headers["Cache-Control"] = "private, no-store"  # patient data
    return response


def _audit_slice_read(db, study_id: int) -> None:
    """Audit that this user read the study's images: once per :data:`SLICE_AUDIT_WINDOW`
    (scrolling a series fetches hundreds of slices)."""
    since = utcnow() - SLICE_AUDIT_WINDOW
    if not audit.recorded_since(db, current_user.username, "slice_view", since, study_id):
        audit.record(db, current_user.username, "slice_view", study_id)
        db.commit()


def _model(result: Analysis | None) -> ModelIdentity | None:
    if result is None:
        return None
    return ModelIdentity(result.model_name, result.model_version, demo=result.model_demo)


@bp.route("/studies/<int:study_id>/slices/<int:n>.png")
@login_required
def slice_png(study_id: int, n: int):
    """Slice ``n`` (0 = the most cranial) of the viewer's series, windowed, as PNG."""
    db = session()
    study = find_study(db, study_id)
    if study.pixels_removed_at is not None:  # gone for good, not "not found"
        abort(410, f"Slice {n} of study {study_id}: {removed_reason(study.pixels_removed_at)}.")
    result = latest_analysis(db, study_id, done=True)
    slices = viewer.slice_list(node(), db, study, result, _slice_cache())
    if slices.problem is not None:
        abort(404, f"Study {study_id} has no slices to show: {slices.problem}.")
    if n >= len(slices.slices):
        abort(404, f"Study {study_id} has no slice {n} ({len(slices.slices)} slices to show).")
    _audit_slice_read(db, study_id)
    try:
        window = viewer.window_from_args(request.args)
    except ValueError as exc:
        abort(400, str(exc))
    etag = viewer.etag_for(slices, n, window)
    if request.if_none_match.contains(etag):
        response = Response(status=304)
    else:
        try:
            png = viewer.render_slice(node(), slices.slices[n], window)
        except (ImagingError, OSError) as exc:
            log.warning("study %d slice %d cannot be shown: %s", study_id, n, exc)
            status = 422 if isinstance(exc, ImageTooLarge) else 500  # refused, not decoded
            abort(status, f"Slice {n} of study {study_id} cannot be shown: {exc}")
        response = Response(png, mimetype="image/png")
    response.set_etag(etag)
    current = request.args.get("v") == slices.version
    response.headers["Cache-Control"] = (
        f"private, max-age={SLICE_MAX_AGE}" if current else "private, no-cache"
    )
    return response


@bp.route("/studies/<int:study_id>/heatmaps/<int:n>.png")
@login_required
def heatmap_png(study_id: int, n: int):
    """The Grad-CAM overlay of displayed slice ``n`` (a key slice of the latest result)."""
    db = session()
    study = find_study(db, study_id)
    result = latest_analysis(db, study_id, done=True)
    slices = viewer.slice_list(node(), db, study, result, _slice_cache())
    key = viewer.key_slice_maps(slices, result).get(n)
    if key is None or key["heatmap"] is None:
        abort(404, f"Slice {n} of study {study_id} has no heatmap (only key slices have one).")
    _audit_slice_read(db, study_id)
    try:
        png = viewer.render_heatmap(key["heatmap"])
    except ValueError as exc:
        log.warning("study %d heatmap %d cannot be shown: %s", study_id, n, exc)
        abort(500, f"The heatmap of slice {n} of study {study_id} cannot be shown: {exc}")
    response = Response(png, mimetype="image/png")
    response.headers["Cache-Control"] = "private, no-cache"
    return response


# --------------------------------------------------------------------------- actions


@bp.post("/studies/<int:study_id>/verdict")
@login_required
def verdict(study_id: int):
    """Agree with the latest result, or correct it to another class (optional comment)."""
    db = session()
    find_study(db, study_id)
    result = latest_analysis(db, study_id, done=True)
    if result is None:
        abort(400, f"Study {study_id} has no result to agree with or correct.")
    fields = posted_fields()
    choice, comment = fields.get("verdict"), fields.get("comment") or ""
    if choice != "agree" and choice not in CLASSES:
        abort(400, f"verdict must be agree or one of {', '.join(CLASSES)}, got {choice!r}")
    if choice == result.predicted_class:
        abort(400, f"{choice} is the predicted class: use Agree.")
    if not isinstance(comment, str) or len(comment.strip()) > VERDICT_COMMENT_MAX_LENGTH:
        abort(400, f"comment must be text of at most {VERDICT_COMMENT_MAX_LENGTH} characters.")
    agrees = choice == "agree"
    row = Verdict(
        study_id=study_id,
        analysis_id=result.id,
        username=current_user.username,
        agrees=agrees,
        corrected_class=None if agrees else choice,
        comment=comment.strip(),
        at=utcnow(),
    )
    db.add(row)
    db.flush()
    report = delivery.open_correction(db, row, node().settings)  # when the site wants it
    audit.record(
        db,
        current_user.username,
        "verdict",
        study_id,
        verdict_id=row.id,
        analysis_id=result.id,
        agrees=agrees,
        corrected_class=row.corrected_class,
        comment=row.comment,
        report_id=report.id if report is not None else None,
    )
    db.commit()
    message = "Agreement recorded." if agrees else f"Correction to {choice} recorded."
    if report is not None:
        message += f" A corrected SR will be sent to {report.destination} shortly."
    return answer(study_id, message, anchor="result")


@bp.post("/studies/<int:study_id>/report/resend")
@login_required
def resend_report(study_id: int):
    """Send the result's SR again: the report goes back to pending, due at the next sweep.

    The node's own dispatcher (``node.workflow.sweeper``) hands it to the report queue,
    so the web UI never talks to the broker; delivery keeps the SR's UIDs, so a PACS
    that has it already just receives the same instance again.
    """
    db = session()
    find_study(db, study_id)
    result = latest_analysis(db, study_id, done=True)
    if result is None:
        abort(400, f"Study {study_id} has no result to report.")
    report = latest_report(db, result)
    previous = report.status if report is not None else None
    if report is None:  # no destination was configured when the result was made
        try:
            report = delivery.open_report(db, result.id, node().settings)
        except delivery.NoDestination:
            abort(400, "No report destination is configured (set report_peer, or one peer).")
    resend_audited(db, report, study_id, previous)
    db.commit()
    return answer(
        study_id, f"The report will be sent to {report.destination} again shortly.", anchor="sr"
    )
