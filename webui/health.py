"""``/healthz`` and ``/metrics``: for monitoring, without a sign-in, only from the addresses
``metrics_allowed_addresses`` lists (others get 403)."""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from functools import lru_cache

from flask import Blueprint, abort, current_app, jsonify, request
from kombu import Connection
from kombu.exceptions import OperationalError as BrokerError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from node import metrics
from node.records import scp_stats, workers
from node.records.db import utcnow
from node.settings import Settings
from webui import node, session

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)

BROKER_TIMEOUT_SECONDS = 3.0
# the SCP says it listens every node.dicom.acceptor.STATS_REFRESH_SECONDS (15 s)
SCP_SILENCE_SECONDS = 60.0


@bp.before_request
def _allowed_only() -> None:
    settings: Settings = current_app.extensions["ainode_settings"]
    if not _allowed(tuple(settings.metrics_allowed_addresses), request.remote_addr or ""):
        abort(403, "Health and metrics are only served to the addresses the node allows.")


@lru_cache(maxsize=64)
def _networks(allowed: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(value, strict=False) for value in allowed)


def _allowed(allowed: tuple[str, ...], address: str) -> bool:
    try:
        client = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if client.version == 6 and client.ipv4_mapped is not None:
        client = client.ipv4_mapped
    return any(client in network for network in _networks(allowed))


@bp.route("/metrics")
def prometheus_metrics():
    """The node's metrics in Prometheus's text format (node.metrics)."""
    registry = current_app.extensions.get("ainode_metrics")
    if registry is None:
        registry = current_app.extensions["ainode_metrics"] = metrics.make_registry(node())
    return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


@bp.route("/healthz")
def healthz():
    """Each check ok or failed with a detail; 200 when all are ok, else 503."""
    settings: Settings = current_app.extensions["ainode_settings"]
    checks = {}
    for name, check in CHECKS.items():
        started = time.monotonic()
        try:
            ok, detail = check(settings)
        except Exception as exc:  # a check that breaks is a failed check, said why
            log.exception("health check %s broke", name)
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        checks[name] = {
            "status": "ok" if ok else "failed",
            "detail": detail,
            "seconds": round(time.monotonic() - started, 3),
        }
    healthy = all(c["status"] == "ok" for c in checks.values())
    answer = jsonify({"status": "ok" if healthy else "failed", "checks": checks})
    return answer, 200 if healthy else 503


def check_database(_settings: Settings) -> tuple[bool, str]:
    try:
        session().execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        session().rollback()
        return False, f"database unreachable: {str(exc).splitlines()[0]}"
    return True, node().engine.url.render_as_string(hide_password=True)


def check_broker(settings: Settings) -> tuple[bool, str]:
    url = settings.resolved_broker_url
    try:
        with Connection(url, connect_timeout=BROKER_TIMEOUT_SECONDS) as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
    except (BrokerError, OSError) as exc:
        return False, f"broker unreachable: {exc}"
    return True, "reachable"


def check_store(settings: Settings) -> tuple[bool, str]:
    folder = settings.store_path
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".healthz-", suffix=".probe") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return False, f"cannot write in {folder}: {exc.strerror or exc}"
    return True, f"{folder} writable"


def check_disk(settings: Settings) -> tuple[bool, str]:
    free_mb = node().store.free_bytes() // 2**20
    detail = f"{free_mb} MB free, threshold {settings.min_free_disk_mb} MB"
    return free_mb >= settings.min_free_disk_mb, detail


def check_model(settings: Settings) -> tuple[bool, str]:
    since = utcnow() - timedelta(seconds=settings.health_worker_silence_seconds)
    alive = workers.seen(session(), since=since)
    loaded = [w for w in alive if w.model_name]
    if loaded:
        newest = loaded[0]
        return True, (
            f"worker {newest.name} serves {newest.model_name}:{newest.model_version} "
            f"({len(alive)} worker(s) alive)"
        )
    window = f"{settings.health_worker_silence_seconds:g} s"
    if alive:
        return False, f"{len(alive)} worker(s) alive, none has loaded a model in the last {window}"
    return False, f"no worker has beaten in the last {window}"


def check_scp(settings: Settings) -> tuple[bool, str]:
    row = scp_stats.read(session()).get((scp_stats.LISTENING, ""))
    where = f"{settings.ae_title} on port {settings.dicom_port}"
    if row is None:
        return False, f"the storage SCP ({where}) has never reported listening"
    silent = (utcnow() - row.updated_at).total_seconds()
    if not row.value:
        return False, f"the storage SCP ({where}) is stopped or does not accept connections"
    if silent > SCP_SILENCE_SECONDS:
        return False, f"the storage SCP ({where}) has not reported for {silent:.0f} s"
    return True, f"{where}, listening (reported {silent:.0f} s ago)"


CHECKS: dict[str, Callable[[Settings], tuple[bool, str]]] = {
    "database": check_database,
    "broker": check_broker,
    "store": check_store,
    "disk": check_disk,
    "model": check_model,
    "scp": check_scp,
}
