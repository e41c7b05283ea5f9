"""Celery tasks: serialization and retries only; the work is in :mod:`node.workflow.jobs`
(analysis) and :mod:`node.reporting.delivery` (SR).

The task names are the queue's wire contract, kept from the node's first layout so that
messages queued before an upgrade still find their task.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta

from celery import shared_task
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from node import logs
from node.analysis.bundle import BundleError, ModelBundle
from node.records import workers
from node.records.db import utcnow
from node.records.registry import ActiveBundle
from node.reporting import delivery
from node.reporting.sr import DeviceObserver
from node.runtime import Node, build_node
from node.settings import Settings, load_settings
from node.workflow import exports, jobs, notifications, uploads

log = logging.getLogger(__name__)

_worker: dict = {}  # this worker process's node and active-model cache, built once
# The settings this worker runs on, from its own --config file and environment (set by
# `ainode worker`). Never in the Celery app's configuration: `celery inspect conf` shows
# that to anyone who can reach the broker, and the settings hold the export salt, the web
# UI's secret key and the database password.
_configured: dict[str, Settings] = {}
_building = threading.Lock()  # the heartbeat thread and the tasks share this process's node
_loading = threading.RLock()  # … and its model: one load at a time
_stop_beating = threading.Event()
MODEL_QUEUES = {"analysis", "uploads"}  # workers on these load the model at start


def use_settings(settings: Settings) -> None:
    """Run this worker process on ``settings`` (called once by ``ainode worker``)."""
    _configured["settings"] = settings
    _worker.clear()


def worker_settings() -> Settings:
    """This worker's settings: those it was started with, else ``$AINODE_CONFIG`` and the
    ``AINODE_*`` environment (a worker started by ``celery worker`` directly)."""
    if "settings" not in _configured:
        _configured["settings"] = load_settings()
    return _configured["settings"]


def worker_node(app=None) -> Node:
    """The node of this worker process (built on first use from the worker's settings;
    ``app`` is accepted for the tasks' sake and not read)."""
    with _building:
        if "node" not in _worker:
            settings = worker_settings()
            _worker["node"] = build_node(settings)
            _worker["model"] = ActiveBundle(settings)
            _worker["name"] = f"{socket.gethostname()}:{os.getpid()}"
        return _worker["node"]


def worker_state(app=None) -> tuple[Node, ModelBundle]:
    """The node and the active model bundle, reloaded only when the activation changed."""
    node = worker_node(app)
    with _loading, node.session_factory() as session:
        bundle = _worker["model"].current(session)
        identity = bundle.info.identity()
        _worker["served"] = (identity.name, identity.version)  # for the heartbeat
    return node, bundle


@worker_process_init.connect
def _forget_parent_state(**_kwargs) -> None:
    _worker.clear()  # a forked pool process must not share the parent's connections


@worker_ready.connect
def _start_heartbeat(sender=None, **_kwargs) -> None:
    """Once the worker consumes: beat now and every worker_heartbeat_seconds (a daemon
    thread), loading the model first on a worker that serves it."""
    consumer = getattr(sender, "task_consumer", None)
    queues = sorted(q.name for q in getattr(consumer, "queues", None) or [])
    _stop_beating.clear()
    threading.Thread(
        target=beat_forever, args=(",".join(queues),), name="worker-heartbeat", daemon=True
    ).start()


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs) -> None:
    _stop_beating.set()


def beat_forever(queues: str) -> None:
    """Record this worker alive (queues, model loaded) until the worker shuts down."""
    preload = bool(MODEL_QUEUES & set(queues.split(",")))
    while True:
        try:
            node = worker_node()
        except (SQLAlchemyError, RuntimeError, OSError) as exc:
            log.warning("worker heartbeat not recorded: %s", exc)
        else:
            beat(node, queues)
            if preload:
                preload = False
                _preload_model()
                beat(node, queues)
        if _stop_beating.wait(worker_settings().worker_heartbeat_seconds):
            return


def _preload_model() -> None:
    """Load the model now, so that the first study does not wait for it and /healthz can
    tell that a worker serves one."""
    try:
        worker_state()
    except (BundleError, OSError, SQLAlchemyError) as exc:
        log.error("the model could not be loaded at start (next try: the next task): %s", exc)


def beat(node: Node, queues: str) -> None:
    """One heartbeat row for this worker; workers silent for worker_forget_hours forgotten."""
    settings = node.settings
    try:
        with node.session_factory() as session, session.begin():
            workers.beat(
                session,
                _worker["name"],
                socket.gethostname(),
                os.getpid(),
                queues,
                model=_worker.get("served"),
            )
            workers.forget(session, utcnow() - timedelta(hours=settings.worker_forget_hours))
    except SQLAlchemyError as exc:
        log.warning("worker heartbeat not recorded: %s", exc)


def observer(node: Node) -> DeviceObserver:
    """The node as the SR's device observer."""
    from node import __version__
    from node.dicom.network import IMPLEMENTATION_CLASS_UID

    return DeviceObserver(
        uid=IMPLEMENTATION_CLASS_UID,
        name=node.settings.ae_title,
        manufacturer="ainode",
        model_name="ainode",
        serial_number=__version__,
    )


# A job a person or the sweeper queued: acknowledged once done, redelivered when its worker
# dies, retried (with back-off) while the database is unreachable.
_JOB = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "max_retries": 5,
}


@shared_task(
    bind=True,
    name="node.tasks.analyze_study",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, OSError),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=5,
)
def analyze_study(self, study_id: int) -> None:
    """Analyse a study and hand its report to the report queue."""
    with logs.study_keys(study_id=study_id):
        node, bundle = worker_state(self.app)
        report_id = jobs.run_analysis(node, bundle, study_id, worker=_worker["name"])
    if report_id is not None:
        send_report.apply_async(args=[report_id])


@shared_task(
    bind=True,
    name="node.tasks.send_report",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError,),
    max_retries=20,
)
def send_report(self, report_id: int) -> None:
    """Deliver a report's SR; transient failures come back with exponential backoff."""
    node = worker_node(self.app)
    try:
        with logs.study_keys(report_id=report_id):
            delivery.deliver_report(node, report_id, observer(node))
    except delivery.ReportRetry as exc:
        # the report row decides when to stop (report_retry_hours from the first failure)
        raise self.retry(exc=exc, countdown=exc.delay, max_retries=None) from exc


@shared_task(name="node.tasks.run_export", **_JOB)
def run_export(self, job_id: int) -> None:
    """Run an export job the web UI queued (progress and outcome go to its row)."""
    exports.run_export_job(worker_node(self.app), job_id)


@shared_task(name="node.tasks.classify_upload", **_JOB)
def classify_upload(self, job_id: int) -> None:
    """Classify a file uploaded in the web UI with the active model."""
    uploads.classify_upload_job(worker_node(self.app), lambda: worker_state(self.app)[1], job_id)


@shared_task(name="node.tasks.send_notification", **_JOB)
def send_notification(self, notification_id: int) -> None:
    """Make one attempt at a notification; its row keeps the retry schedule (the sweeper
    hands it out again when due), so a retry never waits inside a worker."""
    notifications.deliver_notification(worker_node(self.app), notification_id)
