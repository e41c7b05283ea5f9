"""The node's long-lived parts built from the settings: database, store and ingestor.

Every process builds one (``ainode serve``, a worker, the web UI, the CLI); what runs on top
of it (the SCP, the sweeper, the web server) is wired by the composition root, :mod:`ainode`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node import atomic
from node.ingest.ingestor import Ingestor
from node.ingest.store import InstanceStore
from node.records import schema
from node.records.db import make_engine, make_session_factory
from node.settings import Settings

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
    prepare_data_dir(settings)
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


def prepare_data_dir(settings: Settings) -> None:
    """Make the data folder private (0700) when it is made: it holds the database, the
    instances, exports and uploads, all patient data, and every process of the node runs
    as one user. An existing folder open to others is kept as the operator set it, and
    said in the log."""
    folder = atomic.private_folder(settings.data_dir)
    if folder.stat().st_mode & 0o007:
        log.warning(
            "the data folder %s is open to every user of this machine (mode %o): it holds "
            "patient data; `chmod 700` it",
            folder,
            folder.stat().st_mode & 0o777,
        )


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
