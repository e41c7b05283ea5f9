"""The running node: wires settings, database, store, ingest and the SCP together."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node import lifecycle, schema
from node.db import make_engine, make_session_factory
from node.ingest import Ingestor
from node.scp import start_scp
from node.settings import Settings
from node.store import InstanceStore

log = logging.getLogger(__name__)


@dataclass
class Node:
    """The node's long-lived parts, built once from the settings."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker
    store: InstanceStore
    ingestor: Ingestor

    def close(self) -> None:
        """Release database connections and this process's spool folder."""
        self.ingestor.remove_spool()
        self.engine.dispose()


def build_node(settings: Settings, *, migrate: bool = False) -> Node:
    """Build the node; with ``migrate`` bring the schema to head, else require it there."""
    engine = make_engine(settings.resolved_database_url)
    if migrate:
        schema.upgrade(engine)
    else:
        schema.require_current(engine)
    session_factory = make_session_factory(engine)
    # The 4,096 fan-out folders are made by the processes that receive (SCP, pull); a web UI,
    # worker or CLI node that never writes does not need them.
    store = InstanceStore(settings.store_path)
    ingestor = Ingestor(store, session_factory, max_inflated_bytes=settings.max_dataset_mb * 2**20)
    return Node(settings, engine, session_factory, store, ingestor)


def wait_for_schema(settings: Settings, timeout: float = 60.0) -> None:
    """Wait until the database is at the shipped schema; raise naming the fix if it is not."""
    engine = make_engine(settings.resolved_database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                schema.require_current(engine)
                return
            except (RuntimeError, SQLAlchemyError) as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(str(exc)) from exc
                log.info("waiting for the database schema: %s", exc)
                time.sleep(1.0)
    finally:
        engine.dispose()


def sweep_once(node: Node) -> list[str]:
    """One pass of the lifecycle sweeper: mark quiet studies stable."""
    with node.session_factory() as session:
        return lifecycle.mark_stable(session, node.settings.study_stable_seconds)


def serve(
    node: Node,
    stop: threading.Event,
    sweep_interval: float = 1.0,
    dispatch: Callable[[], None] | None = None,
) -> None:
    """Run the SCP and the lifecycle sweeper (and ``dispatch`` after each sweep) until ``stop``."""
    if node.settings.calling_ae_allow_list == set():
        log.warning(
            "no calling AE is allowed: every association will be rejected. Set "
            "AINODE_ALLOWED_CALLING_AES='[\"YOURPACS\"]' or configure peers"
        )
    server = start_scp(node.settings, node.ingestor)
    try:
        while not stop.is_set():
            try:
                sweep_once(node)
                if dispatch is not None:
                    dispatch()
            except SQLAlchemyError:  # the sweeper outlives a database hiccup and retries
                log.exception("lifecycle sweep failed; retrying in %.0f s", sweep_interval)
            stop.wait(sweep_interval)
    finally:
        server.shutdown()
        log.info("storage SCP stopped")
