"""Export jobs, run by the workers: one :class:`~node.records.db.ExportJob` row per export.

The web UI creates the row (queued) and hands its id to the ``exports`` queue; a worker
claims it, re-reads its parameters and writes progress (with a heartbeat), counts and
outcome to the row, so the page only ever reads the database. The sweeper hands a queued
job out again when its message was lost, and fails a running job whose worker stopped
beating (``analysis_timeout_seconds``) as interrupted, and deletes the bundles of jobs
finished more than ``export_retention_days`` ago (the job is then ``expired``). A failed
job's partial bundle is deleted when it fails.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.records.db import ExportJob, ExportStatus, utcnow
from node.records.export import ExportSummary, export_bundle
from node.settings import Settings

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the worker stopped while this export ran; start it again"
ERROR_MAX_LENGTH = 1024
UNFINISHED = (ExportStatus.QUEUED, ExportStatus.RUNNING)


def exports_root(settings: Settings) -> Path:
    """Where export bundles are written: ``data_dir/exports``."""
    return Path(settings.data_dir) / "exports"


def export_folder(settings: Settings, job_id: int, started: datetime) -> Path:
    """The bundle folder of a job: ``data_dir/exports/<job id>-<UTC time>``."""
    return exports_root(settings) / f"{job_id}-{started:%Y%m%dT%H%M%SZ}"


def run_export_job(node: Node, job_id: int) -> None:
    """Run a queued job to its end: DONE with counts and folder, or FAILED with the reason."""
    parameters = _claim(node, job_id)
    if parameters is None:
        return
    folder = export_folder(node.settings, job_id, utcnow())
    try:
        summary = export_bundle(
            node,
            folder,
            keywords=parameters.get("selection"),
            since=_day(parameters.get("since")),
            until=_day(parameters.get("until")),
            progress=_progress_writer(node, job_id),
        )
    except Exception as exc:  # the job's boundary: any failure becomes a FAILED row, logged
        log.exception("export job %s failed", job_id)
        _remove_bundle(node.settings, folder)  # a partial bundle is of no use
        _finish(node, job_id, ExportStatus.FAILED, error=failure_reason(exc))
        return
    _finish(node, job_id, ExportStatus.DONE, folder=str(folder), counts=job_counts(summary))


def _claim(node: Node, job_id: int) -> dict | None:
    """Move a queued job to running and return its parameters (None: not queued any more)."""
    with node.session_factory() as session, session.begin():
        job = session.get(ExportJob, job_id)
        if job is None or job.status != ExportStatus.QUEUED:
            return None
        job.status = ExportStatus.RUNNING
        job.updated_at = utcnow()
        return dict(job.parameters)


def _day(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def _progress_writer(node: Node, job_id: int):
    def report(done: int, total: int) -> None:
        with node.session_factory() as session, session.begin():
            session.execute(
                update(ExportJob)
                .where(ExportJob.id == job_id)
                .values(done=done, total=total, updated_at=utcnow())
            )

    return report


def _finish(node: Node, job_id: int, status: ExportStatus, **values) -> None:
    with node.session_factory() as session, session.begin():
        session.execute(
            update(ExportJob)
            .where(ExportJob.id == job_id)
            .values(status=status, finished_at=utcnow(), **values)
        )


def failure_reason(exc: Exception) -> str:
    """What the page shows for a failed export: the cause in a sentence."""
    if isinstance(exc, OSError) and (exc.strerror or exc.filename):  # from the system
        reason = f"the export could not be written: {exc.strerror or exc}"
        if exc.filename:
            reason += f" ({Path(str(exc.filename)).name})"  # a name, not the node's paths
    elif isinstance(exc, OSError | ValueError):  # export_bundle's own, already a sentence
        reason = str(exc)
    else:
        reason = f"unexpected error ({type(exc).__name__}: {exc}); see the node log"
    return reason[:ERROR_MAX_LENGTH]


def job_counts(summary: ExportSummary) -> dict:
    """What the job row keeps of an export summary: counts and skipped studies by reason."""
    return {
        "images": dict(summary.images),
        "studies": dict(summary.studies),
        "patients": summary.patients,
        "skipped": dict(Counter(item["reason"] for item in summary.skipped)),
    }


def due_exports(session: Session, now: datetime, stale: datetime, dead: datetime) -> list[int]:
    """Queued jobs to hand out (again): their message is older than ``stale`` (lost, or the
    broker was down when they were started); running jobs silent since ``dead`` are failed
    as interrupted. Caller commits."""
    due = list(
        session.scalars(
            select(ExportJob.id).where(
                ExportJob.status == ExportStatus.QUEUED,
                (ExportJob.updated_at.is_(None) | (ExportJob.updated_at <= stale)),
            )
        )
    )
    if due:
        session.execute(update(ExportJob).where(ExportJob.id.in_(due)).values(updated_at=now))
    lost = list(
        session.scalars(
            select(ExportJob.id).where(
                ExportJob.status == ExportStatus.RUNNING,
                ExportJob.updated_at <= dead,
            )
        )
    )
    if lost:
        session.execute(
            update(ExportJob)
            .where(ExportJob.id.in_(lost))
            .values(status=ExportStatus.FAILED, error=INTERRUPTED, finished_at=now)
        )
        log.warning("export jobs %s were interrupted", lost)
    return due


def expire_exports(session: Session, settings: Settings, now: datetime) -> list[int]:
    """Delete the bundles of jobs finished more than ``export_retention_days`` before
    ``now`` and mark those jobs expired. Caller commits (a pass whose commit fails is
    redone: deleting a deleted folder is nothing)."""
    cutoff = now - timedelta(days=settings.export_retention_days)
    jobs = session.scalars(
        select(ExportJob).where(
            ExportJob.status == ExportStatus.DONE, ExportJob.finished_at <= cutoff
        )
    ).all()
    for job in jobs:
        if job.folder:
            _remove_bundle(settings, Path(job.folder))
        job.status = ExportStatus.EXPIRED
    if jobs:
        log.info("export jobs %s expired: their bundles were deleted", [job.id for job in jobs])
    return [job.id for job in jobs]


def _remove_bundle(settings: Settings, folder: Path) -> None:
    """Delete an export bundle, only ever under the exports folder."""
    root = exports_root(settings).resolve()
    target = folder.resolve()
    if target == root or not target.is_relative_to(root):
        log.error("not deleting %s: it is not an export bundle under %s", folder, root)
        return
    try:
        shutil.rmtree(target)
    except FileNotFoundError:
        pass  # already gone: nothing to delete
    except OSError as exc:  # logged once; the sweeper must go on
        log.error("export bundle %s could not be deleted: %s", folder, exc)
