"""Ingest: one received instance becomes a durable file plus its committed rows.

Shared by the Storage SCP, C-GET, C-MOVE and DICOMweb pulls so that every path
stores the same way: check the encoded dataset, write the file (fsynced), then
commit the rows. Only then may the caller report success.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.db import Instance, Series, Study, StudyStatus, utcnow
from node.part10 import InstanceHeader, file_meta_bytes, read_header, split_part10
from node.store import InstanceStore, StoreError

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
    ) -> None:
        self.store = store
        self.session_factory = session_factory
        self.clock = clock

    def ingest_dataset(
        self, dataset_bytes: bytes, transfer_syntax_uid: str, source_ae: str | None
    ) -> IngestResult:
        """Ingest an encoded dataset as received over DIMSE (no file meta).

        Raises ``DatasetError`` (cannot understand), ``StoreError`` (cannot write)
        or ``DatabaseUnavailable``; in each case nothing is recorded.
        """
        header = read_header(dataset_bytes, transfer_syntax_uid)
        return self._ingest(header, [file_meta_bytes(header, source_ae), dataset_bytes], source_ae)

    def ingest_part10(self, data: bytes, source_ae: str | None) -> IngestResult:
        """Ingest a whole DICOM Part 10 file (as WADO-RS returns), kept byte for byte."""
        meta, dataset_bytes = split_part10(data)
        header = read_header(dataset_bytes, str(meta.TransferSyntaxUID))
        return self._ingest(header, [data], source_ae)

    def is_stored(self, sop_instance_uid: str) -> bool:
        """Whether an instance with this SOP Instance UID has a committed row."""
        with self.session_factory() as session:
            return _instance_exists(session, sop_instance_uid)

    def _ingest(self, header: InstanceHeader, parts: list[bytes], source_ae: str | None):
        key = self.store.key_for(header.sop_instance_uid)
        with self.session_factory() as session:
            if _instance_exists(session, header.sop_instance_uid):
                log.info("instance %s already stored: kept the first copy", header.sop_instance_uid)
                return IngestResult(Outcome.DUPLICATE, header, key)
        existed = self.store.exists(key)
        size = self.store.write(key, parts)
        try:
            with self.session_factory() as session, session.begin():
                inserted = _record(session, header, key, size, source_ae, self.clock())
        except SQLAlchemyError as exc:
            if not existed:
                self.store.remove(key)
            raise DatabaseUnavailable(f"database refused instance rows: {exc}") from exc
        if not inserted:
            return IngestResult(Outcome.DUPLICATE, header, key)
        return IngestResult(Outcome.STORED, header, key)


def _instance_exists(session: Session, sop_instance_uid: str) -> bool:
    found = session.execute(
        select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return found is not None


def _insert(session: Session, table):
    """An INSERT that does nothing on a unique conflict, in the session's dialect."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table)


def _record(
    session: Session,
    header: InstanceHeader,
    key: str,
    size: int,
    source_ae: str | None,
    now: datetime,
) -> bool:
    """Insert study/series/instance rows and bump counts; False when the instance existed.

    ``INSERT … ON CONFLICT DO NOTHING RETURNING id`` tells whether this transaction
    created the row (``rowcount`` is not reliable for that across drivers).
    """
    session.execute(
        _insert(session, Study)
        .values(
            study_instance_uid=header.study_instance_uid,
            patient_id=header.patient_id,
            patient_name=header.patient_name,
            study_date=header.study_date,
            study_time=header.study_time,
            accession_number=header.accession_number,
            study_description=header.study_description,
            modalities="",
            status=StudyStatus.RECEIVING,
            retries=0,
            series_count=0,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            status_changed_at=now,
        )
        .on_conflict_do_nothing(index_elements=["study_instance_uid"])
    )
    study_id = session.scalar(
        select(Study.id).where(Study.study_instance_uid == header.study_instance_uid)
    )
    new_series = session.execute(
        _insert(session, Series)
        .values(
            study_id=study_id,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            series_number=header.series_number,
            series_description=header.series_description,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        .returning(Series.id)
    ).scalar_one_or_none()
    series_id = new_series or session.scalar(
        select(Series.id).where(Series.series_instance_uid == header.series_instance_uid)
    )
    inserted = session.execute(
        _insert(session, Instance)
        .values(
            series_id=series_id,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            instance_number=header.instance_number,
            store_key=key,
            size_bytes=size,
            source_ae=source_ae,
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        .returning(Instance.id)
    ).scalar_one_or_none()
    if inserted is None:
        return False
    session.execute(
        update(Series)
        .where(Series.id == series_id)
        .values(instance_count=Series.instance_count + 1, last_received_at=now)
    )
    values = {
        "instance_count": Study.instance_count + 1,
        "last_received_at": now,
        # A study that was already judged complete is receiving again.
        "status": case(
            (Study.status == StudyStatus.STABLE, StudyStatus.RECEIVING), else_=Study.status
        ),
    }
    if new_series:
        modalities = session.scalars(
            select(func.distinct(Series.modality)).where(
                Series.study_id == study_id, Series.modality.is_not(None)
            )
        ).all()
        values["series_count"] = Study.series_count + 1
        values["modalities"] = "\\".join(sorted(modalities))
    session.execute(update(Study).where(Study.id == study_id).values(**values))
    return True


__all__ = [
    "DatabaseUnavailable",
    "IngestResult",
    "Ingestor",
    "Outcome",
    "StoreError",
]
