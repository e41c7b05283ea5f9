"""The Celery application: broker, reliability options, and enqueueing by task name."""

from __future__ import annotations

import logging

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError

from node.settings import Settings

log = logging.getLogger(__name__)

ANALYZE_STUDY = "node.tasks.analyze_study"
SEND_REPORT = "node.tasks.send_report"
RUN_EXPORT = "node.tasks.run_export"
CLASSIFY_UPLOAD = "node.tasks.classify_upload"
# on the reports queue: a delivery, like an SR, by the workers that already consume it
SEND_NOTIFICATION = "node.tasks.send_notification"
QUEUES = ("uploads", "reports", "analysis", "exports")  # what a worker consumes
# The embedded workers of `ainode serve`: what a person waits for (an SR, an uploaded file's
# answer) never waits behind a long analysis or export.
WORKER_GROUPS = (("analysis", "exports"), ("reports", "uploads"))


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the settings' broker (Redis in production, SQLite when embedded)."""
    broker = settings.resolved_broker_url
    app = Celery("ainode", broker=broker, include=["node.workflow.tasks"])
    if broker.startswith(("redis://", "rediss://")):
        transport_options = {
            # A message a dead worker held comes back after this; the sweeper also
            # recovers such studies from the database.
            "visibility_timeout": int(settings.analysis_timeout_seconds),
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
        }
    else:
        transport_options = {}  # the SQLAlchemy transport hands these to create_engine
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options=transport_options,
        task_routes={
            ANALYZE_STUDY: {"queue": "analysis"},
            SEND_REPORT: {"queue": "reports"},
            RUN_EXPORT: {"queue": "exports"},
            CLASSIFY_UPLOAD: {"queue": "uploads"},
            SEND_NOTIFICATION: {"queue": "reports"},
        },
        task_default_queue="analysis",
        worker_hijack_root_logger=False,
    )
    # Nothing else of the settings goes here: `celery inspect conf` shows this configuration
    # to whoever reaches the broker. A worker reads its settings from its own configuration
    # (node.workflow.tasks.use_settings).
    return app


def enqueue(app: Celery, task: str, item_id: int) -> bool:
    """Send one task; False (logged) when the broker is unreachable — the sweeper retries."""
    try:
        app.send_task(task, args=[item_id], retry=False)
    except (BrokerError, OSError) as exc:
        log.warning("broker unreachable, %s(%d) deferred: %s", task, item_id, exc)
        return False
    return True
