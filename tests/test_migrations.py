"""A node's populated database upgraded from the first revision to head, on SQLite and on
PostgreSQL: every row kept with its values, new columns at their defaults, and the
foreign keys and unique constraints still holding. (That the migrations build exactly the
models' schema is tests/test_ingest_db.py's drift test; this is about the data.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import JSON, MetaData, delete, func, insert, literal_column, select
from sqlalchemy.exc import IntegrityError

from node.records import lifecycle, schema
from node.records.db import Base, StudyStatus, make_engine, make_session_factory

T = datetime(2025, 11, 24, 10, 15, 30, 123456, tzinfo=UTC)
LATER = datetime(2025, 11, 24, 10, 47, 2, 5, tzinfo=UTC)

# What a node wrote at each revision, in that revision's columns: (revision, table, rows).
STAGES = [
    (
        "0001",
        "study",
        [
            {
                "id": 1,
                "study_instance_uid": "1.2.826.0.1.3680043.8.498.11",
                "patient_id": "PID-0042",
                "patient_name": "Núñez^José María",
                "study_date": "20251124",
                "study_time": "101530.123",
                "accession_number": "ACC0000000000042",
                "study_description": "Tórax Simple",
                "modalities": "CT\\SR",
                "status": "analyzed",
                "status_reason": None,
                "retries": 0,
                "series_count": 1,
                "instance_count": 2,
                "first_received_at": T,
                "last_received_at": LATER,
                "status_changed_at": LATER,
            },
            {
                "id": 2,
                "study_instance_uid": "1.2.826.0.1.3680043.8.498.12",
                "patient_id": None,
                "patient_name": None,
                "study_date": None,
                "study_time": None,
                "accession_number": None,
                "study_description": None,
                "modalities": "CT",
                "status": "receiving",
                "status_reason": "retried: the worker was lost",
                "retries": 2,
                "series_count": 1,
                "instance_count": 1,
                "first_received_at": LATER,
                "last_received_at": LATER,
                "status_changed_at": LATER,
            },
        ],
    ),
    (
        "0001",
        "series",
        [
            {
                "id": 1,
                "study_id": 1,
                "series_instance_uid": "1.2.826.0.1.3680043.8.498.21",
                "modality": "CT",
                "series_number": 3,
                "series_description": "Pulmón 1.25 mm",
                "instance_count": 2,
                "first_received_at": T,
                "last_received_at": LATER,
            },
            {
                "id": 2,
                "study_id": 2,
                "series_instance_uid": "1.2.826.0.1.3680043.8.498.22",
                "modality": None,
                "series_number": None,
                "series_description": None,
                "instance_count": 1,
                "first_received_at": LATER,
                "last_received_at": LATER,
            },
        ],
    ),
    (
        "0001",
        "instance",
        [
            {
                "id": i,
                "series_id": series,
                "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.3{i}",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "transfer_syntax_uid": "1.2.840.10008.1.2.4.80",
                "instance_number": i if i != 3 else None,
                "store_key": f"ab/cd/{i:064x}",
                "size_bytes": 5_000_000_000 + i,  # over 32 bits: BigInteger
                "source_ae": "ORTHANC" if i != 3 else None,
                "received_at": T,
            }
            for i, series in ((1, 1), (2, 1), (3, 2))
        ],
    ),
    (
        "0002",
        "analysis",
        [
            {
                "id": 1,
                "study_id": 1,
                "model_name": "covidx-ct",
                "model_version": "1.0.0",
                "model_demo": True,
                "status": "done",
                "error": None,
                "worker": "worker@host-1",
                "started_at": T,
                "finished_at": LATER,
                "timings": {"load": 0.5, "inference": 1.25},
                "rule": "top-mean",
                "predicted_class": "Covid_19",
                "probabilities": {"Covid_19": 0.75, "Normal": 0.125, "Pneumonia": 0.125},
                "slices_evaluated": 2,
                "instances_skipped": {"1.2.3": "localizer image"},
            }
        ],
    ),
    (
        "0002",
        "slice_prediction",
        [
            {
                "id": i,
                "analysis_id": 1,
                "position": i - 1,
                "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.3{i}",
                "frame": None,
                "probabilities": {"Covid_19": 0.5, "Normal": 0.25, "Pneumonia": 0.25},
            }
            for i in (1, 2)
        ],
    ),
    (
        "0002",
        "report",
        [
            {
                "id": 1,
                "analysis_id": 1,
                "sop_instance_uid": "1.2.826.0.1.3680043.8.498.41",
                "series_instance_uid": "1.2.826.0.1.3680043.8.498.42",
                "destination": "pacs",
                "method": "dimse",
                "status": "sent",
                "retries": 1,
                "next_retry_at": None,
                "last_error": "association rejected",
                "created_at": LATER,
                "sent_at": LATER,
            }
        ],
    ),
    (
        "0003",
        "label",
        [
            {
                "id": 1,
                "study_id": 1,
                "series_id": None,
                "keyword": "COVID",
                "created_by": "dr.house",
                "created_at": LATER,
            },
            {
                "id": 2,
                "study_id": 1,
                "series_id": 1,
                "keyword": "Exclude",
                "created_by": "dr.house",
                "created_at": LATER,
            },
        ],
    ),
]


def test_a_populated_database_upgrades_from_the_first_revision_to_head(database_url):
    engine = make_engine(database_url)
    written: dict[str, set[str]] = {}  # table -> the columns it had when its rows were written
    for revision, table, rows in STAGES:
        schema.upgrade(engine, revision)
        assert schema.current_revision(engine) == revision
        then = MetaData()
        then.reflect(engine, only=[table])
        written[table] = set(then.tables[table].columns.keys())
        assert set(rows[0]) == written[table], f"{table}: the rows do not fit revision {revision}"
        with engine.begin() as connection:
            connection.execute(insert(then.tables[table]), rows)

    schema.upgrade(engine)
    assert schema.current_revision(engine) == schema.head_revision()
    schema.require_current(engine)

    with engine.connect() as connection:
        for _revision, table, rows in STAGES:
            model = Base.metadata.tables[table]
            assert connection.scalar(select(func.count()).select_from(model)) == len(rows), table
            for row in rows:
                found = connection.execute(select(model).where(model.c.id == row["id"])).one()
                found = found._asdict()
                for column, value in row.items():
                    if column in model.c:  # a column dropped since has nothing to keep
                        assert found[column] == value, f"{table}.{column} of row {row['id']}"
                for column in model.c:
                    if column.name not in written[table]:
                        expected = _default(connection, column)
                        assert found[column.name] == expected, (
                            f"{table}.{column.name}, added after the row was written, is "
                            f"{found[column.name]!r}, not its default {expected!r}"
                        )

    _constraints_still_hold(engine)
    engine.dispose()


def _default(connection, column):
    """What a column added to existing rows holds: its server default, else NULL."""
    if column.server_default is not None:
        clause = column.server_default.arg
        text = clause if isinstance(clause, str) else clause.text
        value = connection.scalar(select(literal_column(text, type_=column.type)))
        if isinstance(column.type, JSON) and isinstance(value, str):
            return json.loads(value)  # a text literal: psycopg does not decode it as JSON
        return value
    assert column.nullable, f"{column} was added NOT NULL without a server default"
    return None


def _constraints_still_hold(engine) -> None:
    """Unique and foreign keys survived the migrations (SQLite rebuilds tables to alter
    them), and the node's own code works on the upgraded rows."""
    tables = Base.metadata.tables
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        assert lifecycle.move_where(session, 2, {StudyStatus.RECEIVING}, StudyStatus.STABLE)
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(
            insert(tables["study"]).values(
                study_instance_uid="1.2.826.0.1.3680043.8.498.11",
                modalities="CT",
                status="receiving",
                retries=0,
                series_count=0,
                instance_count=0,
                first_received_at=T,
                last_received_at=T,
                status_changed_at=T,
            )
        )
    with engine.begin() as connection:
        connection.execute(delete(tables["study"]).where(tables["study"].c.id == 1))
    with engine.connect() as connection:
        left = {
            name: sorted(connection.scalars(select(tables[name].c.id)))
            for name in ("study", "series", "instance", "analysis", "slice_prediction", "report")
            + ("label",)
        }
    # deleting study 1 cascades to everything of it; study 2 and its rows stay
    assert left == {
        "study": [2],
        "series": [2],
        "instance": [3],
        "analysis": [],
        "slice_prediction": [],
        "report": [],
        "label": [],
    }
