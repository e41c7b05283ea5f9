"""Upload and classify: one PNG, JPEG or DICOM file judged by the active model.

Nothing uploaded is written to disk unless the user ticks "keep"; a kept file goes to
``data_dir/uploads`` under a generated name (the client's file name is only ever shown).
The model is loaded once per process and reloaded when the active model changes.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from flask import Blueprint, current_app, jsonify, make_response, render_template, request
from flask_login import login_required
from flask_wtf.csrf import CSRFError
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge

from node.analysis.analyze import AnalysisOptions
from node.analysis.bundle import INFO_FILE, BundleError, ModelInfo
from node.analysis.imaging import Window, to_png_bytes
from node.records.db import utcnow
from node.records.registry import ActiveBundle, active_model_dir
from node.settings import Settings
from webui import node, session
from webui.uploaded_image import (
    UploadedImage,
    UploadError,
    UploadResult,
    classify_upload,
    dicom_preview,
    file_kind,
    read_picture,
    read_upload,
)

bp = Blueprint("upload", __name__)
DISPLAY_NAME_MAX_LENGTH = 120
KEEP_VALUES = ("1", "on", "true", "yes")


class ServedModel:
    """The active model of this process: loaded on first use, reloaded when it changes."""

    def __init__(self, settings: Settings) -> None:
        self._active = ActiveBundle(settings)
        self._lock = threading.Lock()  # one load, and one inference at a time, per process

    def classify(self, db: Session, image: UploadedImage) -> UploadResult:
        with self._lock:
            return classify_upload(image, self._active.current(db))


@bp.record_once
def _serve_model(state) -> None:
    settings = state.app.extensions["ainode_node"].settings
    state.app.extensions["ainode_served_model"] = ServedModel(settings)


# Every POST here is a fetch() from the page, so errors are JSON it can show.
@bp.errorhandler(UploadError)
def _upload_error(exc: UploadError):
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
    if file_kind(data) == "dicom":
        png = dicom_preview(data, Window(settings.window_center, settings.window_width))
    else:
        png = to_png_bytes(read_picture(data))
    answer = make_response(png)
    answer.headers["Content-Type"] = "image/png"
    answer.headers["Cache-Control"] = "no-store"
    return answer


@bp.route("/upload/classify", methods=["POST"])
@login_required
def classify():
    """The active model's class and probabilities for the uploaded file (JSON)."""
    data, name = _uploaded()
    settings = node().settings
    image = read_upload(data, AnalysisOptions.from_settings(settings))
    served: ServedModel = current_app.extensions["ainode_served_model"]
    try:
        result = served.classify(session(), image)
    except BundleError as exc:
        current_app.logger.error("upload: the active model cannot be served: %s", exc)
        return jsonify(error=f"The active model cannot be loaded: {exc}"), 503
    kept = None
    if request.form.get("keep", "").strip().lower() in KEEP_VALUES:
        kept = keep_upload(settings, data, image.suffix)
    return jsonify(file=name, kind=image.kind, kept=kept, **result.as_dict())


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


def keep_upload(settings: Settings, data: bytes, suffix: str) -> str:
    """Write an upload into ``data_dir/uploads`` under a new name (temp file, fsync, rename)."""
    folder = Path(settings.data_dir) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{utcnow():%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}{suffix}"
    temp = folder / f".{name}.partial"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # may hold patient data
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, folder / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return name


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
