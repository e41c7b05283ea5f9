"""Ingest: one received instance becomes a durable file plus its committed rows.

Shared by the Storage SCP, C-GET, C-MOVE and DICOMweb pulls so that every path
stores the same way: check the encoded dataset, write the file (fsynced), then
commit the rows. Only then may the caller report success.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Boolean, bindparam, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from node.analysis.imaging import CT_STORAGE
from node.ingest.part10 import DatasetMismatch, InstanceHeader, read_header
from node.ingest.store import InstanceStore, StoreError
from node.records import lifecycle
from node.records.db import Instance, Series, Study, describe, utcnow

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    """What happened to one received instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"


class DatabaseUnavailable(RuntimeError):
    """The database refused the rows; the file was removed again and nothing is recorded."""


@dataclass(frozen=True)
class IngestResult:
    """The outcome for one instance and the header it carried."""

    outcome: Outcome
    header: InstanceHeader
    store_key: str


class Ingestor:
    """Stores instances durably: file first, then the rows, then (caller) the success status."""

    def __init__(
        self,
        store: InstanceStore,
        session_factory: sessionmaker,
        clock: Callable[[], datetime] = utcnow,
        max_inflated_bytes: int = 2**31,
    ) -> None:
        self.store = store
        self.session_factory = session_factory
        self.engine = session_factory.kw["bind"]
        self.clock = clock
        self.sql = _Statements(self.engine.dialect.name)
        self._parents = _ParentCache()
        self.max_inflated_bytes = max_inflated_bytes
        self._spool: Path | None = None
        self._spool_lock = threading.Lock()

    def spool_folder(self) -> Path:
        """This process's folder for incoming datasets, in the store (made on first use)."""
        with self._spool_lock:
            if self._spool is None:
                self._spool = self.store.spool_folder()
            return self._spool

    def remove_spool(self) -> None:
        """Remove this process's spool folder (at shutdown)."""
        with self._spool_lock:
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)
                self._spool = None

    def ingest_file(
        self, spooled: Path, source_ae: str | None, expected_sop_class: str | None = None
    ) -> IngestResult:
        """Ingest a Part 10 file received into :meth:`spool_folder`: checked whole, its
        header read, moved into the store (a rename), its rows committed.

        Raises ``DatasetError`` (cannot understand), ``StoreError`` (cannot write)
        or ``DatabaseUnavailable``; in each case nothing is recorded. A file that is
        not kept (refused or a duplicate) is left where it is, for the caller.
        """
        header = read_header(spooled, self.max_inflated_bytes)
        if expected_sop_class is not None and header.sop_class_uid != expected_sop_class:
            raise DatasetMismatch(
                f"the dataset's SOP class {header.sop_class_uid} is not the command's "
                f"{expected_sop_class}"
            )
        return self._ingest(header, spooled, source_ae)

    def ingest_part10(self, data: bytes, source_ae: str | None) -> IngestResult:
        """Ingest a whole DICOM Part 10 file (as WADO-RS returns), kept byte for byte."""
        fd, name = tempfile.mkstemp(prefix=".", suffix=".part", dir=self.spool_folder())
        spooled = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            return self.ingest_file(spooled, source_ae)
        finally:
            spooled.unlink(missing_ok=True)

    def is_stored(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID has a committed row."""
        with self.engine.connect() as connection:
            found = connection.execute(self.sql.instance_exists, {"uid": sop_instance_uid})
            return found.first() is not None

    def _ingest(self, header: InstanceHeader, spooled: Path, source_ae: str | None) -> IngestResult:
        key = self.store.key_for(header.sop_instance_uid)
        # The file is always in place before its row is committed, so without a file there
        # is no row and the common case costs a stat, not a query.
        if self.store.exists(key) and self.is_stored(header.sop_instance_uid):
            log.info("instance %s already stored: kept the first copy", header.sop_instance_uid)
            return IngestResult(Outcome.DUPLICATE, header, key)
        size = self.store.settle(key, spooled)  # the costly fsync, before any lock is taken
        row = {
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "instance_number": header.instance_number,
            "store_key": key,
            "size_bytes": size,
            "source_ae": source_ae,
            "received_at": self.clock(),
        }
        try:
            inserted = self._record(header, row, spooled)
        except DBAPIError as exc:  # the database refused or is gone; not a coding error
            self._parents.clear()  # a rolled-back transaction may have created them
            raise DatabaseUnavailable(f"database refused instance rows: {describe(exc)}") from exc
        except StoreError:
            self._parents.clear()
            raise
        if not inserted:
            log.info("instance %s stored meanwhile by another sender", header.sop_instance_uid)
            return IngestResult(Outcome.DUPLICATE, header, key)
        return IngestResult(Outcome.STORED, header, key)

    def _record(self, header: InstanceHeader, row: dict, spooled: Path) -> bool:
        """Insert the instance row (and its study/series on first sight), move the file into
        the store, bump the counts, all in one transaction.

        The file is moved only once this transaction's insert has won the instance's row,
        and removed again if the transaction fails before its commit: while the insert is
        undecided no other copy can commit a row for the instance (PostgreSQL makes a
        concurrent insert of the same UID wait; SQLite has one writer), so a copy never
        replaces or removes the file of a committed row. Returns False when the instance
        already had a row (another copy won); its spooled file is then left untouched.
        """
        now, key = row["received_at"], row["store_key"]
        with self.engine.begin() as connection:
            parents = self._parents.get(header.series_instance_uid)
            new_series = False
            if parents is None:
                parents, new_series = _ensure_parents(connection, self.sql, header, now)
            study_id, series_id = parents
            inserted = connection.execute(
                self.sql.insert_instance, {**row, "series_id": series_id}
            ).scalar_one_or_none()
            if inserted is None:
                return False
            try:
                self.store.adopt(key, spooled)  # over a file left by a crash before its row
                connection.execute(self.sql.bump_series, {"row_id": series_id, "at": now})
                connection.execute(
                    self.sql.bump_study,
                    {
                        "row_id": study_id,
                        "at": now,
                        "new_series": int(new_series),
                        "reopens": header.sop_class_uid in CT_STORAGE,
                    },
                )
                if new_series:
                    connection.execute(self.sql.set_modalities, {"row_id": study_id})
            except BaseException:
                self.store.remove(key)  # still ours: the insert is not given up yet
                raise
        # A failed commit leaves the file: the row may exist after all, and a re-send
        # replaces the file if it does not.
        self._parents.put(header.series_instance_uid, parents)
        return True


class _ParentCache:
    """SeriesInstanceUID -> (study id, series id) for series seen recently, bounded."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.items: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def get(self, uid: str) -> tuple[int, int] | None:
        with self.lock:
            found = self.items.get(uid)
            if found is not None:
                self.items.move_to_end(uid)
            return found

    def put(self, uid: str, ids: tuple[int, int]) -> None:
        with self.lock:
            self.items[uid] = ids
            self.items.move_to_end(uid)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


class _Statements:
    """The ingest statements, built once per dialect (building them per call costs more
    than running them)."""

    def __init__(self, dialect: str) -> None:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.instance_exists = select(Instance.id).where(
            Instance.sop_instance_uid == bindparam("uid")
        )
        self.insert_study = insert(Study).on_conflict_do_nothing(
            index_elements=["study_instance_uid"]
        )
        self.study_id = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
        self.insert_series = (
            insert(Series)
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
            .returning(Series.id)
        )
        self.series_id = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
        self.insert_instance = (
            insert(Instance)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(Instance.id)
        )
        self.bump_series = (
            update(Series)
            .where(Series.id == bindparam("row_id"))
            .values(instance_count=Series.instance_count + 1, last_received_at=bindparam("at"))
        )
        self.bump_study = (
            update(Study)
            .where(Study.id == bindparam("row_id"))
            .values(
                instance_count=Study.instance_count + 1,
                series_count=Study.series_count + bindparam("new_series"),
                last_received_at=bindparam("at"),
                status=lifecycle.status_on_arrival(bindparam("reopens", type_=Boolean)),
                suspended_from=lifecycle.suspended_from_on_arrival(
                    bindparam("reopens", type_=Boolean)
                ),
                status_changed_at=lifecycle.changed_at_on_arrival(
                    bindparam("reopens", type_=Boolean), bindparam("at")
                ),
            )
        )
        modalities = (
            select(func.group_concat(Series.modality.distinct()))
            if dialect == "sqlite"
            else select(func.string_agg(Series.modality.distinct(), literal("\\")))
        )
        self.set_modalities = (
            update(Study)
            .where(Study.id == bindparam("row_id"))
            .values(
                modalities=func.coalesce(
                    modalities.where(Series.study_id == bindparam("row_id")).scalar_subquery(), ""
                )
            )
        )


def _ensure_parents(connection, sql: _Statements, header: InstanceHeader, now):
    """Get or create the study and series rows; returns ((study id, series id), new series)."""
    connection.execute(
        sql.insert_study,
        {
            "study_instance_uid": header.study_instance_uid,
            "patient_id": header.patient_id,
            "patient_name": header.patient_name,
            "study_date": header.study_date,
            "study_time": header.study_time,
            "accession_number": header.accession_number,
            "study_description": header.study_description,
            "modalities": "",
            "status": lifecycle.INITIAL,
            "retries": 0,
            "series_count": 0,
            "instance_count": 0,
            "first_received_at": now,
            "last_received_at": now,
            "status_changed_at": now,
        },
    )
    study_id = connection.execute(sql.study_id, {"uid": header.study_instance_uid}).scalar_one()
    series_id = connection.execute(
        sql.insert_series,
        {
            "study_id": study_id,
            "series_instance_uid": header.series_instance_uid,
            "modality": header.modality,
            "series_number": header.series_number,
            "series_description": header.series_description,
            "body_part_examined": header.body_part_examined,
            "slice_thickness": header.slice_thickness,
            "instance_count": 0,
            "first_received_at": now,
            "last_received_at": now,
        },
    ).scalar_one_or_none()
    if series_id is not None:
        return (study_id, series_id), True
    series_id = connection.execute(sql.series_id, {"uid": header.series_instance_uid}).scalar_one()
    return (study_id, series_id), False


__all__ = [
    "DatabaseUnavailable",
    "IngestResult",
    "Ingestor",
    "Outcome",
    "StoreError",
]
