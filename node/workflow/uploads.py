"""Uploaded files classified by the workers, so the web UI never loads a model.

The web UI checks an upload (its type and size; a bad file is refused at once), writes its
bytes privately under ``data_dir/uploads/.pending``, records an :class:`UploadJob` and
hands its id to the ``uploads`` queue; a worker classifies it with the active model and
writes the answer to the row, which the page polls. The pending bytes are removed once
answered, or moved under a generated name into ``data_dir/uploads`` when the user asked to
keep them. The sweeper hands out a job whose message was lost and fails one whose worker
died (``analysis_timeout_seconds``).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node import atomic
from node.analysis import gradcam
from node.analysis.analyze import AnalysisOptions
from node.analysis.classify import ClassifyError, answer_image, read_input
from node.analysis.model_info import BundleError
from node.records.db import UploadJob, UploadStatus, utcnow
from node.settings import Settings

if TYPE_CHECKING:
    from node.analysis.bundle import ModelBundle
    from node.runtime import Node

log = logging.getLogger(__name__)
PENDING = ".pending"
INTERRUPTED = "interrupted: the worker stopped while classifying this file; upload it again"
ERROR_MAX_LENGTH = 1024


def uploads_folder(settings: Settings) -> Path:
    """Where kept uploads go: ``data_dir/uploads`` (pending ones in its ``.pending``)."""
    return Path(settings.data_dir) / "uploads"


def submit(
    session: Session,
    settings: Settings,
    data: bytes,
    *,
    kind: str,
    suffix: str,
    file_name: str,
    requested_by: str,
    keep: bool,
) -> UploadJob:
    """Write the upload's bytes privately (0600: they may hold patient data) and record its
    job, queued and handed out now (the caller commits, then enqueues)."""
    folder = uploads_folder(settings) / PENDING
    folder.mkdir(parents=True, exist_ok=True)
    pending = folder / f"{secrets.token_hex(16)}{suffix}"
    atomic.write_bytes(pending, data, mode=0o600)
    job = UploadJob(
        requested_by=requested_by,
        file_name=file_name,
        kind=kind,
        pending=str(pending),
        keep=keep,
        status=UploadStatus.QUEUED,
        answer={},
        updated_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def classify_upload_job(node: Node, active_bundle: Callable[[], ModelBundle], job_id: int) -> str:
    """Classify a queued upload with the active model (``active_bundle()``, loaded once the
    job is claimed); its answer, or why there is none, goes to its row. Returns the job's
    final status ("" when the job was not queued: nothing done)."""
    with node.session_factory() as session, session.begin():
        job = session.get(UploadJob, job_id)
        if job is None or job.status != UploadStatus.QUEUED:
            return ""
        job.status, job.updated_at = UploadStatus.RUNNING, utcnow()
        pending, keep, kind = Path(job.pending or ""), job.keep, job.kind
    try:
        data = pending.read_bytes()
        image = read_input(data, AnalysisOptions.from_settings(node.settings))
        bundle = active_bundle()
        answer = answer_image(image, bundle).as_dict()
        answer["heatmap"] = _heatmap(bundle, image, answer["predicted_class"], job_id)
        kept = _keep(node.settings, pending, image.suffix) if keep else None
    except ClassifyError as exc:
        return _finish(node, job_id, UploadStatus.FAILED, pending, error=str(exc))
    except BundleError as exc:
        log.error("upload %d: the active model cannot be served: %s", job_id, exc)
        reason = f"The active model cannot be loaded: {exc}"
        return _finish(node, job_id, UploadStatus.FAILED, pending, error=reason)
    except OSError as exc:
        log.error("upload %d: %s", job_id, exc)
        reason = f"The uploaded file could not be read or kept: {exc.strerror or exc}"
        return _finish(node, job_id, UploadStatus.FAILED, pending, error=reason)
    log.info("upload %d (%s) classified: %s", job_id, kind, answer["predicted_class"])
    return _finish(node, job_id, UploadStatus.DONE, pending, answer=answer, kept=kept)


def _heatmap(bundle: ModelBundle, image, predicted_class: str, job_id: int) -> dict | None:
    """The Grad-CAM map (:func:`node.analysis.gradcam.encode`) of a one-slice upload for its
    class; None for several slices (the page shows one) or when it cannot be made (logged)."""
    if len(image.slices) != 1:
        return None
    try:
        explainer = bundle.gradcam()
        heatmap = explainer.maps(image.slices, bundle.info.classes.index(predicted_class))[0]
    except (gradcam.GradCamError, ValueError, OSError) as exc:
        log.warning("upload %d: no heatmap (%s: %s)", job_id, type(exc).__name__, exc)
        return None
    return gradcam.encode(heatmap)


def _keep(settings: Settings, pending: Path, suffix: str) -> str:
    """Move the pending bytes under a new name into the uploads folder; returns the name."""
    name = f"{utcnow():%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}{suffix}"
    target = uploads_folder(settings) / name
    os.replace(pending, target)
    atomic.fsync_folder(target.parent)
    return name


def _finish(node: Node, job_id: int, status: UploadStatus, pending: Path, **values) -> str:
    if "error" in values:
        values["error"] = values["error"][:ERROR_MAX_LENGTH]
    with node.session_factory() as session, session.begin():
        session.execute(
            update(UploadJob)
            .where(UploadJob.id == job_id)
            .values(status=status, finished_at=utcnow(), pending=None, **values)
        )
    pending.unlink(missing_ok=True)  # answered: the bytes go unless they were kept (moved)
    return status


def due_uploads(session: Session, now: datetime, stale: datetime, dead: datetime) -> list[int]:
    """Queued uploads whose message is older than ``stale`` (handed out again); running ones
    older than ``dead`` are failed as interrupted and their bytes removed. Caller commits."""
    due = list(
        session.scalars(
            select(UploadJob.id).where(
                UploadJob.status == UploadStatus.QUEUED, UploadJob.updated_at <= stale
            )
        )
    )
    if due:
        session.execute(update(UploadJob).where(UploadJob.id.in_(due)).values(updated_at=now))
    for job in session.scalars(
        select(UploadJob).where(
            UploadJob.status == UploadStatus.RUNNING, UploadJob.updated_at <= dead
        )
    ):
        if job.pending:
            Path(job.pending).unlink(missing_ok=True)
        job.status, job.error, job.finished_at, job.pending = (
            UploadStatus.FAILED,
            INTERRUPTED,
            now,
            None,
        )
        log.warning("upload %d was interrupted", job.id)
    return due
