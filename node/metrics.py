"""The node's Prometheus metrics, read from the database on each scrape.

Every figure comes from rows (studies, analyses, reports, workers, the SCP's own counts in
``scp_stat``), so whichever process serves /metrics — ``ainode serve`` with its web UI or
``ainode web`` alone — reports the same numbers, and a restart loses none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import timedelta

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.records import registry, scp_stats, workers
from node.records.db import (
    Analysis,
    AnalysisStatus,
    Report,
    ReportStatus,
    Study,
    StudyStatus,
    utcnow,
)
from node.runtime import Node
from node.workflow import retention
from node.workflow.queue import QUEUES

log = logging.getLogger(__name__)

ANALYSIS_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)  # seconds
REPORT_BUCKETS = (1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)  # seconds, incl. retries
_REDIS_PRIORITY_SEPARATOR = "\x06\x16"  # kombu's Redis transport: QUEUE, QUEUE\x06\x163, …
_REDIS_PRIORITY_STEPS = (3, 6, 9)

# Every metric name /metrics exposes (the Grafana dashboard may query only these).
METRIC_NAMES = (
    "ainode_instances_received_total",
    "ainode_instances_refused_total",
    "ainode_associations_rejected_total",
    "ainode_associations_open",
    "ainode_scp_listening",
    "ainode_studies",
    "ainode_queue_depth",
    "ainode_broker_queue_messages",
    "ainode_analysis_duration_seconds",
    "ainode_report_send_seconds",
    "ainode_model_info",
    "ainode_worker_last_seen_timestamp_seconds",
    "ainode_workers_alive",
    "ainode_store_free_bytes",
    "ainode_retention_freed_bytes_total",
)


class NodeCollector(Collector):
    """Collects the node's metrics from its database and store on each scrape."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        settings = self.node.settings
        with self.node.session_factory() as session:
            yield from _received(session)
            yield from _scp(session)
            yield from _studies(session)
            yield from _queues(session)
            yield _durations(
                "ainode_analysis_duration_seconds",
                "Time from the start to the end of each finished analysis",
                ANALYSIS_BUCKETS,
                session.execute(
                    select(Analysis.started_at, Analysis.finished_at).where(
                        Analysis.status == AnalysisStatus.DONE, Analysis.finished_at.is_not(None)
                    )
                ),
            )
            yield _durations(
                "ainode_report_send_seconds",
                "Time from an SR's creation to its delivery to the PACS (retries included)",
                REPORT_BUCKETS,
                session.execute(
                    # opened_at: created_at is restamped each time a report is handed out
                    select(
                        func.coalesce(Report.opened_at, Report.created_at), Report.sent_at
                    ).where(Report.status == ReportStatus.SENT, Report.sent_at.is_not(None))
                ),
            )
            yield _model(settings, session)
            yield from _workers(session, settings.health_worker_silence_seconds)
            freed = CounterMetricFamily(
                "ainode_retention_freed_bytes",
                "Bytes of received pixel data the retention policy removed",
            )
            freed.add_metric([], retention.freed_bytes_total(session))
            yield freed
        if settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")):
            yield from _broker_queues(settings.broker_url)
        free = GaugeMetricFamily(
            "ainode_store_free_bytes", "Free space on the instance store's file system"
        )
        free.add_metric([], self.node.store.free_bytes())
        yield free


def make_registry(node: Node) -> CollectorRegistry:
    """A registry of the node's own (the process's default one is not exposed)."""
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(NodeCollector(node))
    return metrics


def _received(session: Session) -> Iterable[Metric]:
    received = CounterMetricFamily(
        "ainode_instances_received",
        "Instances received and stored (C-STORE, pull, upload), as the studies count them",
    )
    received.add_metric(
        [], session.scalar(select(func.coalesce(func.sum(Study.instance_count), 0)))
    )
    yield received


def _scp(session: Session) -> Iterable[Metric]:
    rows = scp_stats.read(session)
    refused = CounterMetricFamily(
        "ainode_instances_refused",
        "Instances the storage SCP refused, by reason (the DIMSE status it answered)",
        labels=["reason"],
    )
    rejected = CounterMetricFamily(
        "ainode_associations_rejected",
        "Associations the storage SCP rejected, by reason",
        labels=["reason"],
    )
    for family, kind, known in (
        (refused, scp_stats.INSTANCE_REFUSED, scp_stats.REFUSAL_REASONS),
        (rejected, scp_stats.ASSOCIATION_REJECTED, scp_stats.REJECTION_REASONS),
    ):
        counts = {reason: row.value for (k, reason), row in rows.items() if k == kind}
        for reason in sorted(set(known) | set(counts)):
            family.add_metric([reason], counts.get(reason, 0))
        yield family
    for kind, name, text in (
        (scp_stats.ASSOCIATIONS_OPEN, "ainode_associations_open", "Associations open now"),
        (scp_stats.LISTENING, "ainode_scp_listening", "1 while the storage SCP listens"),
    ):
        gauge = GaugeMetricFamily(name, text)
        row = rows.get((kind, ""))
        gauge.add_metric([], row.value if row is not None else 0)
        yield gauge


def _studies(session: Session) -> Iterable[Metric]:
    counts = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
    studies = GaugeMetricFamily("ainode_studies", "Studies by lifecycle status", labels=["status"])
    for status in StudyStatus:
        studies.add_metric([status.value], counts.get(status.value, 0))
    yield studies


def _queues(session: Session) -> Iterable[Metric]:
    depth = GaugeMetricFamily(
        "ainode_queue_depth",
        "Work waiting, from the database: studies queued for analysis, SRs not yet delivered",
        labels=["queue"],
    )
    queued = session.scalar(
        select(func.count()).select_from(Study).where(Study.status == StudyStatus.QUEUED)
    )
    waiting = (ReportStatus.PENDING, ReportStatus.RETRYING, ReportStatus.SENDING)
    reports = session.scalar(
        select(func.count()).select_from(Report).where(Report.status.in_(waiting))
    )
    depth.add_metric(["analysis"], queued)
    depth.add_metric(["reports"], reports)
    yield depth


def _durations(
    name: str, documentation: str, bounds: tuple[int, ...], rows: Iterable[tuple]
) -> Metric:
    """A histogram of ``end - start`` over ``rows`` of (start, end)."""
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for start, end in rows:
        seconds = max((end - start).total_seconds(), 0.0)
        total += seconds
        index = next((i for i, bound in enumerate(bounds) if seconds <= bound), len(bounds))
        counts[index] += 1
    cumulative, buckets = 0, []
    for bound, count in zip([*map(floatToGoString, bounds), "+Inf"], counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _model(settings, session: Session) -> Metric:
    info = InfoMetricFamily("ainode_model", "The model the workers are to serve (the active one)")
    active = next(m for m in registry.list_models(settings, session) if m.active)
    info.add_metric(
        [],
        {
            "name": active.name,
            "version": active.version,
            "demo": str(bool(active.info and active.info.demo)).lower(),
            "usable": "false" if active.error else "true",
        },
    )
    return info


def _workers(session: Session, silence_seconds: float) -> Iterable[Metric]:
    now = utcnow()
    seen = GaugeMetricFamily(
        "ainode_worker_last_seen_timestamp_seconds",
        "When each worker last beat (Unix time), with its queues and the model it loaded",
        labels=["worker", "host", "queues", "model"],
    )
    alive = 0
    for worker in workers.seen(session):
        model = f"{worker.model_name}:{worker.model_version}" if worker.model_name else ""
        labels = [worker.name, worker.host, worker.queues, model]
        seen.add_metric(labels, worker.last_seen_at.timestamp())
        alive += workers.silent_since(worker, now) <= timedelta(seconds=silence_seconds)
    yield seen
    count = GaugeMetricFamily(
        "ainode_workers_alive", "Workers that beat within health_worker_silence_seconds"
    )
    count.add_metric([], alive)
    yield count


def _broker_queues(url: str) -> Iterable[Metric]:
    """Messages waiting in each Celery queue on Redis (none listed when Redis is down)."""
    import redis

    family = GaugeMetricFamily(
        "ainode_broker_queue_messages", "Messages waiting in the broker, by queue", labels=["queue"]
    )
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        for queue in QUEUES:
            keys = [
                queue,
                *(f"{queue}{_REDIS_PRIORITY_SEPARATOR}{p}" for p in _REDIS_PRIORITY_STEPS),
            ]
            family.add_metric([queue], sum(client.llen(key) for key in keys))
    except redis.RedisError as exc:
        log.warning("broker queue lengths unavailable: %s", exc)
        return
    finally:
        client.close()
    yield family
