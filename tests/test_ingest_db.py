"""Ingest, schema and lifecycle on SQLite and PostgreSQL, with a controlled clock."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from pydicom import dcmread
from sqlalchemy import inspect, select

from node.ingest.ingestor import Ingestor, Outcome
from node.ingest.part10 import DatasetError, split_part10
from node.ingest.store import InstanceStore
from node.records import lifecycle, schema
from node.records.db import Instance, Series, Study, StudyStatus, make_engine, make_session_factory

T0 = datetime(2026, 1, 10, 10, 0, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def ingestor(database_url, tmp_path, clock):
    engine = make_engine(database_url)
    schema.upgrade(engine)
    yield Ingestor(InstanceStore(tmp_path / "store"), make_session_factory(engine), clock)
    engine.dispose()


def body_of(path):
    meta, body = split_part10(path.read_bytes())
    return body, str(meta.TransferSyntaxUID)


def ingest(ingestor, path, ae="TESTSCU"):
    return ingestor.ingest_part10(path.read_bytes(), ae)


def study_row(ingestor) -> Study:
    with ingestor.session_factory() as session:
        return session.scalars(select(Study)).one()


def test_migration_creates_the_schema_at_head(database_url):
    engine = make_engine(database_url)
    assert schema.current_revision(engine) is None
    with pytest.raises(RuntimeError, match="run `ainode db upgrade`"):
        schema.require_current(engine)
    schema.upgrade(engine)
    assert schema.current_revision(engine) == schema.head_revision()
    assert {"study", "series", "instance"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_the_migrations_build_exactly_the_models_schema(database_url):
    """Alembic's autogenerate finds nothing to add: the migrations and node.records.db
    describe the same tables, columns, types and indexes (on SQLite and PostgreSQL)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from node.records.db import Base

    engine = make_engine(database_url)
    schema.upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        drift = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert drift == []


def test_ingest_records_study_series_instance_with_counts(ingestor, chest_series):
    _spec, files = chest_series
    results = [ingest(ingestor, p) for p in files[:5]]
    assert {r.outcome for r in results} == {Outcome.STORED}
    study = study_row(ingestor)
    assert (study.instance_count, study.series_count, study.modalities) == (5, 1, "CT")
    assert study.status == StudyStatus.RECEIVING
    assert study.patient_name == "PHANTOM^CHEST"
    assert study.first_received_at == T0 and study.last_received_at == T0


def test_duplicate_is_one_row_and_keeps_the_first_file(ingestor, chest_series):
    _spec, files = chest_series
    first = ingest(ingestor, files[0])
    again = ingest(ingestor, files[0])
    assert (first.outcome, again.outcome) == (Outcome.STORED, Outcome.DUPLICATE)
    with ingestor.session_factory() as session:
        assert len(session.scalars(select(Instance)).all()) == 1
    assert study_row(ingestor).instance_count == 1


def test_concurrent_senders_of_one_study_make_one_study_row(ingestor, chest_series):
    """Two associations delivering the same study at once (and one instance twice)."""
    _spec, files = chest_series
    halves = [files[0:10] + files[:1], files[10:20] + files[:1]]
    errors = []

    def send(paths):
        try:
            for p in paths:
                ingest(ingestor, p)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with ingestor.session_factory() as session:
        assert len(session.scalars(select(Study)).all()) == 1
        assert len(session.scalars(select(Series)).all()) == 1
        assert len(session.scalars(select(Instance)).all()) == 20
    assert study_row(ingestor).instance_count == 20


def test_bad_dataset_records_nothing(ingestor, chest_series):
    data = chest_series[1][0].read_bytes()
    with pytest.raises(DatasetError, match="truncated"):
        ingestor.ingest_part10(data[:-1000], "TESTSCU")
    with ingestor.session_factory() as session:
        assert session.scalars(select(Study)).all() == []
    assert [p for p in ingestor.store.root.rglob("*") if p.is_file()] == []


def test_study_becomes_stable_after_quiet_period(ingestor, chest_series, clock):
    _spec, files = chest_series
    ingest(ingestor, files[0])
    clock.advance(20)
    ingest(ingestor, files[1])
    with ingestor.session_factory() as session:
        clock.advance(29)
        assert lifecycle.mark_stable(session, 30, now=clock()) == []
        clock.advance(1)
        assert lifecycle.mark_stable(session, 30, now=clock()) == [
            study_row(ingestor).study_instance_uid
        ]
    study = study_row(ingestor)
    assert study.status == StudyStatus.STABLE and study.status_changed_at == clock()


def test_new_instance_makes_a_stable_study_receive_again(ingestor, chest_series, clock):
    _spec, files = chest_series
    ingest(ingestor, files[0])
    clock.advance(60)
    with ingestor.session_factory() as session:
        lifecycle.mark_stable(session, 30, now=clock())
    ingest(ingestor, files[1])
    assert study_row(ingestor).status == StudyStatus.RECEIVING


def test_stability_is_computed_from_committed_times_after_a_restart(
    database_url, tmp_path, chest_series, clock
):
    """A new process (new engine, new ingestor) sees the same quiet period."""
    _spec, files = chest_series
    engine = make_engine(database_url)
    schema.upgrade(engine)
    first = Ingestor(InstanceStore(tmp_path / "store"), make_session_factory(engine), clock)
    ingest(first, files[0])
    engine.dispose()  # the node stops

    clock.advance(45)
    engine = make_engine(database_url)  # and starts again
    with make_session_factory(engine)() as session:
        marked = lifecycle.mark_stable(session, 30, now=clock())
    assert marked == [dcmread(files[0], stop_before_pixels=True).StudyInstanceUID]
    engine.dispose()


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (StudyStatus.RECEIVING, StudyStatus.ANALYZED),
        (StudyStatus.RECEIVING, StudyStatus.REPORTED),
        (StudyStatus.REPORTED, StudyStatus.ANALYZING),
    ],
)
def test_lifecycle_refuses_skipping_steps(start, to):
    study = Study(study_instance_uid="1.2.3", status=start, retries=0)
    with pytest.raises(lifecycle.TransitionError, match=f"{start} -> {to} not allowed"):
        lifecycle.move(study, to)


def test_failed_move_counts_a_retry_and_keeps_the_reason():
    study = Study(study_instance_uid="1.2.3", status=StudyStatus.STABLE, retries=0)
    lifecycle.move(study, StudyStatus.FAILED, reason="worker lost", now=T0)
    assert (study.status, study.status_reason, study.retries) == ("failed", "worker lost", 1)


def test_part10_split_rejects_non_dicom():
    with pytest.raises(DatasetError, match="no DICM prefix"):
        split_part10(b"\0" * 200)


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_header_text_is_decoded_with_the_dataset_charset(ingestor, tmp_path, charset):
    from node import phantom

    spec = phantom.PhantomSpec(
        slices=1,
        seed=3,
        charset=charset,
        patient_name="Núñez^José",
        study_description="Tórax Simple",
    )
    [path] = phantom.write_series(spec, tmp_path / "one")
    result = ingest(ingestor, path)
    assert result.header.patient_name == "Núñez^José"
    assert result.header.study_description == "Tórax Simple"
    assert result.header.instance_number == 1
    study = study_row(ingestor)
    assert (study.patient_name, study.study_description) == ("Núñez^José", "Tórax Simple")


def test_file_without_row_is_written_again_on_resend(ingestor, chest_series):
    """A crash between file and row leaves a file only; the re-send records it."""
    _spec, files = chest_series
    body, syntax = body_of(files[0])
    uid = dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    key = ingestor.store.key_for(uid)
    ingestor.store.write(key, [b"an earlier copy that never got its row"])
    assert ingest(ingestor, files[0]).outcome == Outcome.STORED
    assert split_part10(ingestor.store.read(key))[1] == body
    assert study_row(ingestor).instance_count == 1


def test_upgrading_an_sqlite_node_to_text_values_keeps_every_row(tmp_path):
    """Migration 0006 rewrites declared types in place: a table copy would drop ``study``
    and, through ON DELETE CASCADE, every series and instance with it."""
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    schema.upgrade(engine, "0005")
    now = T0.isoformat()
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO study (id, study_instance_uid, modalities, status, retries,"
                " series_count, instance_count, first_received_at, last_received_at,"
                " status_changed_at) VALUES (1, '1.2.3', 'CT', 'receiving', 0, 1, 1, :t, :t, :t)"
            ),
            {"t": now},
        )
        connection.execute(
            text(
                "INSERT INTO series (id, study_id, series_instance_uid, instance_count,"
                " first_received_at, last_received_at) VALUES (1, 1, '1.2.3.4', 1, :t, :t)"
            ),
            {"t": now},
        )
        connection.execute(
            text(
                "INSERT INTO instance (series_id, sop_instance_uid, sop_class_uid,"
                " transfer_syntax_uid, store_key, size_bytes, received_at)"
                " VALUES (1, '1.2.3.4.5', '1.2', '1.2.840.10008.1.2.1', 'k', 1, :t)"
            ),
            {"t": now},
        )
    from alembic import command

    config = schema.alembic_config(engine.url.render_as_string(hide_password=False))

    def instances() -> int:
        with engine.connect() as connection:
            return connection.execute(text("SELECT count(*) FROM instance")).scalar()

    schema.upgrade(engine, "0006")
    assert instances() == 1
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0005")
    assert instances() == 1
    schema.upgrade(engine)
    with make_session_factory(engine)() as session:
        assert len(session.scalars(select(Instance)).all()) == 1
        assert session.scalars(select(Series)).one().series_instance_uid == "1.2.3.4"
        session.add(Study(study_instance_uid="x" * 100, accession_number="A" * 40))
        session.commit()
    engine.dispose()
