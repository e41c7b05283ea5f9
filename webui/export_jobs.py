"""Export jobs: one :class:`~node.records.db.ExportJob` row per export, run in a background thread.

The thread takes the job's id, re-reads its parameters and writes its progress, counts and
outcome to the row, so the page only ever reads the database. A job that the process did not
finish (the node stopped) is recorded as failed, "interrupted", the next time jobs are listed
or the app starts: a job is only running while this process holds its thread.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import date, datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.records.db import ExportJob, ExportStatus, utcnow
from node.records.export import ExportSummary, export_bundle
from node.runtime import Node
from node.settings import Settings

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the node stopped while this export ran; start it again"
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
        return dict(job.parameters)


def _day(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def _progress_writer(node: Node, job_id: int):
    def report(done: int, total: int) -> None:
        with node.session_factory() as session, session.begin():
            session.execute(
                update(ExportJob).where(ExportJob.id == job_id).values(done=done, total=total)
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


class ExportRunner:
    """The export jobs this process runs, one background thread each."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def submit(self, session: Session, job: ExportJob) -> None:
        """Commit the new job (with whatever the session holds) and start its thread."""
        with self._lock:  # a listing in between would take the job for an interrupted one
            session.commit()
            thread = threading.Thread(
                target=self._run, args=(job.id,), name=f"export-{job.id}", daemon=True
            )
            self._threads[job.id] = thread
            thread.start()

    def _run(self, job_id: int) -> None:
        try:
            run_export_job(self.node, job_id)
        finally:
            with self._lock:
                self._threads.pop(job_id, None)

    def fail_interrupted(self, session: Session) -> int:
        """Record unfinished jobs that no thread of this process runs as failed; how many."""
        with self._lock:
            stale = [
                job
                for job in session.scalars(
                    select(ExportJob).where(ExportJob.status.in_(UNFINISHED))
                )
                if job.id not in self._threads
            ]
            for job in stale:
                job.status, job.error, job.finished_at = ExportStatus.FAILED, INTERRUPTED, utcnow()
            if stale:
                session.commit()
                log.warning("export jobs %s were interrupted", [job.id for job in stale])
            return len(stale)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for each running export (shutdown, tests)."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)
