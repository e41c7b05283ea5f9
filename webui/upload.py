"""Upload and classify: one PNG, JPEG or DICOM file judged by the active model.

The web process checks the file and hands it to a worker (:mod:`node.workflow.uploads`),
which holds the model: the web UI never loads one. The bytes wait privately until answered
and are then removed, unless the user ticked "keep": a kept file goes to
``data_dir/uploads`` under a generated name (the client's file name is only ever shown).
"""

from __future__ import annotations

from flask import (
    Blueprint,
    abort,
    current_app,
    jsonify,
    make_response,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from flask_wtf.csrf import CSRFError
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge

from node.analysis import gradcam
from node.analysis.analyze import AnalysisOptions
from node.analysis.bundle_format import INFO_FILE
from node.analysis.classify import ClassifyError, read_input
from node.analysis.model_info import BundleError, ModelInfo
from node.records.db import UploadJob, UploadStatus
from node.records.registry import active_model_dir
from node.workflow import uploads
from node.workflow.queue import CLASSIFY_UPLOAD, enqueue, make_celery
from webui import audit, node, session
from webui.uploaded_image import UploadError, preview_png

bp = Blueprint("upload", __name__)
DISPLAY_NAME_MAX_LENGTH = 120
KEEP_VALUES = ("1", "on", "true", "yes")
QUEUE_DOWN = "The job queue is unreachable: the file is classified when it is back."


@bp.record_once
def _queue(state) -> None:
    """The job queue uploads are handed to: the workers hold the model, the web UI never."""
    if "ainode_celery" not in state.app.extensions:
        state.app.extensions["ainode_celery"] = make_celery(state.app.extensions["ainode_settings"])


# Every POST here is a fetch() from the page, so errors are JSON it can show.
@bp.errorhandler(ClassifyError)  # UploadError too
def _upload_error(exc: ClassifyError):
    return jsonify(error=str(exc)), 400


@bp.errorhandler(RequestEntityTooLarge)
def _too_large(_exc):
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return jsonify(error=f"The file is too large: at most {_size(limit)} may be uploaded."), 413


@bp.errorhandler(CSRFError)
def _csrf_error(exc: CSRFError):
    return jsonify(error=f"The request was refused: {exc.description}"), 400


@bp.route("/upload")
@login_required
def index():
    model, model_error = _active_model(session())
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return render_template(
        "upload.html", model=model, model_error=model_error, max_bytes=limit, max_size=_size(limit)
    )


@bp.route("/upload/preview", methods=["POST"])
@login_required
def preview():
    """The uploaded image as PNG: a DICOM file windowed as the node windows it."""
    data, _name = _uploaded()
    settings = node().settings
    options = AnalysisOptions.from_settings(settings)
    png = preview_png(data, options.window, options.limits)
    answer = make_response(png)
    answer.headers["Content-Type"] = "image/png"
    answer.headers["Cache-Control"] = "no-store"
    return answer


@bp.route("/upload/classify", methods=["POST"])
@login_required
def classify():
    """Check the uploaded file (a bad one is refused at once) and hand it to a worker; the
    answer is polled at ``status_url`` (202)."""
    data, name = _uploaded()
    settings = node().settings
    image = read_input(data, AnalysisOptions.from_settings(settings))  # refuses a bad file now
    db = session()
    job = uploads.submit(
        db,
        settings,
        data,
        kind=image.kind,
        suffix=image.suffix,
        file_name=name,
        requested_by=current_user.username,
        keep=request.form.get("keep", "").strip().lower() in KEEP_VALUES,
    )
    audit.record(
        db, current_user.username, "upload", job=job.id, file=name, kind=image.kind, keep=job.keep
    )
    db.commit()
    if not enqueue(current_app.extensions["ainode_celery"], CLASSIFY_UPLOAD, job.id):
        answer = {"status": job.status, "notice": QUEUE_DOWN}
    else:
        answer = {"status": job.status}
    status_url = url_for("upload.job", job_id=job.id)
    return jsonify(id=job.id, file=name, kind=image.kind, status_url=status_url, **answer), 202


@bp.route("/upload/jobs/<int:job_id>")
@login_required
def job(job_id: int):
    """An upload's classification: queued, running, done (the answer) or failed (why)."""
    found = session().get(UploadJob, job_id)
    if found is None or found.requested_by != current_user.username:
        abort(404, f"Upload {job_id} doesn't exist.")  # another user's upload is not shown
    body = {"id": found.id, "file": found.file_name, "kind": found.kind, "status": found.status}
    if found.status == UploadStatus.DONE:
        answer = dict(found.answer)
        heatmap = answer.pop("heatmap", None)
        body.update(kept=found.kept, **answer)
        body["heatmap_url"] = url_for("upload.heatmap", job_id=job_id) if heatmap else None
    elif found.status == UploadStatus.FAILED:
        body["error"] = found.error
    return jsonify(body)


@bp.route("/upload/jobs/<int:job_id>/heatmap.png")
@login_required
def heatmap(job_id: int):
    """The Grad-CAM overlay of a one-slice upload's answer (PNG, transparent where the model
    found no evidence), for the page to lay over the image."""
    found = session().get(UploadJob, job_id)
    if found is None or found.requested_by != current_user.username:
        abort(404, f"Upload {job_id} doesn't exist.")
    stored = (found.answer or {}).get("heatmap") if found.status == UploadStatus.DONE else None
    if not stored:
        abort(404, f"Upload {job_id} has no heatmap.")
    try:
        png = gradcam.png_bytes(gradcam.overlay_rgba(gradcam.decode(stored)))
    except ValueError as exc:
        abort(500, f"The heatmap of upload {job_id} cannot be shown: {exc}")
    answer = make_response(png)
    answer.headers["Content-Type"] = "image/png"
    answer.headers["Cache-Control"] = "private, no-store"
    return answer


def _uploaded() -> tuple[bytes, str]:
    """The bytes of the posted ``file`` field and a name fit to show (never used as a path)."""
    upload = request.files.get("file")
    if upload is None:
        raise UploadError("No file was sent: choose or drop a PNG, JPEG or DICOM file.")
    return upload.read(), display_name(upload.filename or "")


def display_name(filename: str) -> str:
    """The last part of a client's file name, printable and short (for showing only)."""
    last = filename.replace("\\", "/").rsplit("/", 1)[-1]
    shown = "".join(ch for ch in last if ch.isprintable()).strip()
    return shown[:DISPLAY_NAME_MAX_LENGTH] or "upload"


def _active_model(db: Session) -> tuple[ModelInfo | None, str | None]:
    """The active model's ``model.json`` (read without loading it), or why there is none."""
    try:
        return ModelInfo.from_json(active_model_dir(node().settings, db) / INFO_FILE), None
    except BundleError as exc:
        return None, str(exc)


def _size(limit: int | None) -> str:
    if not limit:
        return "no limit"
    if limit >= 1024 * 1024:
        return f"{limit / (1024 * 1024):g} MB"
    return f"{limit / 1024:g} KB" if limit >= 1024 else f"{limit} bytes"
