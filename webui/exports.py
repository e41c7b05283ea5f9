"""Exports: choose labelled studies, preview the counts, run the export, download the bundle.

An export is seen and downloaded only by the user who started it, and by admins (anyone
else gets the page of an export that doesn't exist, and the attempt is audited). Bundles
are deleted by the sweeper ``export_retention_days`` after they finished and the job is
then shown as expired (:func:`node.workflow.exports.expire_exports`).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import NoReturn

from flask import (
    Blueprint,
    Response,
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
from sqlalchemy import select

from node.analysis.result import CLASSES
from node.records.db import ExportJob, ExportStatus, utcnow
from node.records.labels import check_keyword, effective_keyword_classes
from node.workflow.exports import exports_root
from node.workflow.queue import RUN_EXPORT, enqueue, make_celery
from webui import audit, node, session
from webui.export_preview import (
    ExportSelection,
    keywords_in_use,
    preview_export,
    selection_keywords,
)

bp = Blueprint("exports", __name__)
JOBS_LISTED = 50
MAX_KEYWORDS = 100


@bp.record_once
def _queue(state) -> None:
    """The job queue the exports are handed to (the workers run them)."""
    if "ainode_celery" not in state.app.extensions:
        state.app.extensions["ainode_celery"] = make_celery(state.app.extensions["ainode_settings"])


@bp.errorhandler(CSRFError)
def _csrf_error(exc: CSRFError):
    return jsonify(error=f"The request was refused: {exc.description}"), 400


# --------------------------------------------------------------------------- pages


@bp.route("/exports")
@login_required
def index():
    db = session()
    mapping = effective_keyword_classes(node().settings, db)
    folded = {keyword.casefold(): class_name for keyword, class_name in mapping.items()}
    in_use = [
        {
            "keyword": keyword,
            "studies": studies,
            "mapped": keyword.casefold() in folded,
            "class_name": folded.get(keyword.casefold()),
        }
        for keyword, studies in keywords_in_use(db)
    ]
    return render_template(
        "exports.html",
        keywords=in_use,
        mapping=mapping,
        classes=CLASSES,
        jobs=latest_jobs(db),
        retention_days=node().settings.export_retention_days,
    )


@bp.route("/exports/jobs")
@login_required
def jobs():
    """The latest export jobs as JSON (the page polls this while one runs)."""
    return jsonify(jobs=latest_jobs(session()))


@bp.route("/exports/<int:job_id>")
@login_required
def job(job_id: int):
    """One export job as JSON."""
    return jsonify(job_json(_visible_job(session(), job_id)))


@bp.route("/exports/preview", methods=["POST"])
@login_required
def preview():
    """What an export of the posted selection would hold; writes nothing."""
    db = session()
    mapping = effective_keyword_classes(node().settings, db)
    selection, chosen = _posted_selection(mapping)
    counts = preview_export(db, mapping, selection)
    wanted = selection.as_dict()
    audit.record(
        db,
        current_user.username,
        "export_preview",
        **chosen,
        since=wanted["since"],
        until=wanted["until"],
        selected=counts.selected,
    )
    db.commit()
    return jsonify(selection=wanted, counts=counts.as_dict())


@bp.route("/exports", methods=["POST"])
@login_required
def start():
    """Create an export job for the posted selection and hand it to the workers' queue (a
    job whose message cannot be sent now stays queued: the sweeper hands it out later)."""
    db = session()
    mapping = effective_keyword_classes(node().settings, db)
    selection, chosen = _posted_selection(mapping)
    counts = preview_export(db, mapping, selection)
    if counts.selected == 0:
        return jsonify(error="Nothing to export: no labelled study matches this selection."), 400
    wanted = selection.as_dict()
    parameters = {
        **chosen,
        "since": wanted["since"],
        "until": wanted["until"],
        "selection": wanted["keywords"],  # what export_bundle is given
    }
    created = ExportJob(
        requested_by=current_user.username,
        parameters=parameters,
        status=ExportStatus.QUEUED,
        total=counts.selected,
        updated_at=utcnow(),  # handed out now; the sweeper re-sends it if the message is lost
    )
    db.add(created)
    db.flush()
    audit.record(db, current_user.username, "export", job=created.id, **parameters)
    db.commit()
    answer = job_json(created)
    if not enqueue(current_app.extensions["ainode_celery"], RUN_EXPORT, created.id):
        answer["notice"] = "The job queue is unreachable: the export starts when it is back."
    return jsonify(answer), 202


@bp.route("/exports/<int:job_id>/download")
@login_required
def download(job_id: int):
    """The finished bundle as a zip, streamed (404 for unknown, someone else's, unfinished
    or expired exports)."""
    db = session()
    found = _visible_job(db, job_id)
    if found.status == ExportStatus.EXPIRED:
        days = node().settings.export_retention_days
        abort(
            404,
            f"Export {job_id} has expired: its files were deleted {days:g} days after it finished.",
        )
    if found.status != ExportStatus.DONE or not found.folder:
        abort(404, f"Export {job_id} is not finished (it is {found.status}).")
    folder = Path(found.folder)
    root = exports_root(node().settings).resolve()
    if not folder.resolve().is_relative_to(root) or not folder.is_dir():
        abort(404, f"The files of export {job_id} are no longer on the node.")
    audit.record(db, current_user.username, "export", job=job_id, download=True)
    db.commit()
    return Response(
        zip_stream(folder),
        mimetype="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{folder.name}.zip"'},
    )


# --------------------------------------------------------------------------- helpers


def _visible_job(db, job_id: int) -> ExportJob:
    """The export ``job_id`` if the signed-in user may see it (theirs, or any for admins);
    404 otherwise, the same answer as for an export that doesn't exist (audited)."""
    found = db.get(ExportJob, job_id)
    if found is not None and not _may_see(found):
        audit.record(
            db, current_user.username, "export_denied", job=job_id, owner=found.requested_by
        )
        db.commit()
        found = None
    if found is None:
        abort(404, f"Export {job_id} doesn't exist.")
    return found


def _may_see(job: ExportJob) -> bool:
    return current_user.is_admin or job.requested_by == current_user.username


def latest_jobs(db) -> list[dict]:
    """The newest export jobs the signed-in user may see (admins: everyone's)."""
    query = select(ExportJob)
    if not current_user.is_admin:
        query = query.where(ExportJob.requested_by == current_user.username)
    listed = db.scalars(
        query.order_by(ExportJob.created_at.desc(), ExportJob.id.desc()).limit(JOBS_LISTED)
    )
    return [job_json(job) for job in listed]


def job_json(job: ExportJob) -> dict:
    """An export job as the page shows it."""
    done = job.status == ExportStatus.DONE
    return {
        "id": job.id,
        "requested_by": job.requested_by,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
        "status": job.status,
        "done": job.done,
        "total": job.total,
        "parameters": job.parameters,
        "counts": job.counts,
        "error": job.error,
        "download": url_for("exports.download", job_id=job.id) if done else None,
    }


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _posted_selection(mapping: dict[str, str | None]) -> tuple[ExportSelection, dict]:
    """The selection a JSON body asks for, and the keywords and classes as chosen.

    Aborts with a JSON 400 naming the field that is wrong.
    """
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        _refuse("The request body must be a JSON object.")
    keywords = _keywords(body.get("keywords") or [])
    classes = body.get("classes") or []
    if not isinstance(classes, list) or any(c not in CLASSES for c in classes):
        _refuse(f"classes must be a list of {', '.join(CLASSES)}, got {classes!r}")
    try:
        selection = ExportSelection(
            selection_keywords(keywords, classes, mapping),
            _date(body, "since"),
            _date(body, "until"),
        )
    except ValueError as exc:
        _refuse(str(exc))
    return selection, {"keywords": keywords, "classes": list(classes)}


def _keywords(value: object) -> list[str]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or len(value) > MAX_KEYWORDS:
        _refuse(f"keywords must be a list of at most {MAX_KEYWORDS} keywords")
    try:
        return [check_keyword(keyword) for keyword in value]
    except ValueError as exc:
        _refuse(str(exc))


def _date(body: dict, name: str) -> date | None:
    value = body.get(name)
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    _refuse(f"'{name}' must be a date as YYYY-MM-DD, got {value!r}")


def _refuse(message: str) -> NoReturn:
    abort(make_response(jsonify(error=message), 400))


class _Chunks(io.RawIOBase):
    """A write-only stream whose bytes are taken out as they come (zip without a temp file)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def zip_stream(folder: Path) -> Iterator[bytes]:
    """The files under ``folder`` as a zip, in pieces (PNGs stored, text deflated)."""
    out = _Chunks()
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            compress = zipfile.ZIP_STORED if path.suffix == ".png" else zipfile.ZIP_DEFLATED
            archive.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}", compress)
            yield out.take()
    yield out.take()
