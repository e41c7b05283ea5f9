"""Ingest hardening: a copy of an instance arriving at once with another never replaces or
removes the first one's file, over-long and non-conforming values are stored, database
errors carry no patient data, and what holds patient data is private on disk."""

from __future__ import annotations

import logging
import os
import stat
import threading
import traceback
from contextlib import contextmanager

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from node import phantom
from node.dicom.scp import start_scp
from node.ingest.ingestor import DatabaseUnavailable, Ingestor, Outcome
from node.ingest.store import InstanceStore, check_uid, is_uid
from node.records import schema
from node.records.db import Instance, Study, describe, make_engine, make_session_factory
from node.runtime import build_node

PATIENT = "DOE^JANE^SECRETNAME"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _instances(session_factory) -> list[Instance]:
    with session_factory() as session:
        return list(session.scalars(select(Instance)))


def _hold_the_second_copy(store: InstanceStore):
    """Make two copies of one instance both find no file in the store, then let the second
    go on only once ``first_done`` is set: the race of two senders, made deterministic.

    Only the order is forced: the store's real ``exists`` answers.
    """
    looked = threading.Barrier(2, timeout=30)
    first_done = threading.Event()
    lock, order = threading.Lock(), []
    real_exists = store.exists

    def exists(key: str) -> bool:
        found = real_exists(key)
        looked.wait()
        with lock:
            order.append(key)
            second = len(order) == 2
        if second:
            assert first_done.wait(30), "the first copy was never answered"
        return found

    store.exists = exists
    return first_done


def _ct_association(port: int, ae_title: str):
    ae = AE(ae_title=ae_title)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    association = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert association.is_established
    return association


def test_two_senders_of_one_instance_at_once_both_succeed_and_the_first_file_stays(
    scp, chest_series
):
    """Two PACS send the same instance at once: both are answered success, one row, and the
    stored file is the copy its row describes (the second never replaces it)."""
    dataset = dcmread(chest_series[1][0])
    first_done = _hold_the_second_copy(scp.store)
    statuses = {}

    def send(ae_title: str) -> None:
        association = _ct_association(scp.settings.dicom_port, ae_title)
        try:
            status = association.send_c_store(dataset)
            statuses[ae_title] = status.Status if "Status" in status else None
        finally:
            first_done.set()
            association.release()

    threads = [threading.Thread(target=send, args=(ae,)) for ae in ("TESTSCU", "STORESCU")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == {"TESTSCU": 0x0000, "STORESCU": 0x0000}
    [row] = _instances(scp.session_factory)
    stored = scp.store.path(row.store_key)
    assert dcmread(stored).file_meta.SourceApplicationEntityTitle == row.source_ae
    assert stored.stat().st_size == row.size_bytes


def test_a_second_copy_refused_by_the_database_leaves_the_first_copy_file(
    database_url, tmp_path, chest_series
):
    """The second copy's rows fail after the first copy was stored: the first copy's
    acknowledged file is still there (it used to be removed as the second copy's own)."""
    engine = make_engine(database_url)
    schema.upgrade(engine)
    ingestor = Ingestor(InstanceStore(tmp_path / "store"), make_session_factory(engine))
    data = chest_series[1][0].read_bytes()
    first_done = _hold_the_second_copy(ingestor.store)
    results = {}

    def send(ae_title: str) -> None:
        try:
            results[ae_title] = ingestor.ingest_part10(data, ae_title).outcome
        except DatabaseUnavailable as exc:
            results[ae_title] = exc
        finally:
            if not first_done.is_set():
                # the database refuses whatever comes next: the second copy's rows
                with engine.begin() as connection:
                    connection.execute(text("ALTER TABLE instance RENAME TO instance_away"))
                first_done.set()

    threads = [threading.Thread(target=send, args=(ae,)) for ae in ("FIRST", "SECOND")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE instance_away RENAME TO instance"))
    outcomes = sorted(results.values(), key=lambda r: isinstance(r, Exception))
    assert outcomes[0] is Outcome.STORED
    assert isinstance(outcomes[1], DatabaseUnavailable)
    [row] = _instances(ingestor.session_factory)
    assert ingestor.store.path(row.store_key).read_bytes() == data
    engine.dispose()


def test_database_errors_carry_no_patient_data(database_url, caplog):
    """A refused row's error (as logged, with its traceback) names no value it held."""
    engine = make_engine(database_url)
    schema.upgrade(engine)
    log = logging.getLogger("test.refused")
    with pytest.raises(IntegrityError) as refused, make_session_factory(engine)() as session:
        session.add(
            Study(
                study_instance_uid="1.2.3",
                patient_name=PATIENT,
                patient_id="PID-SECRET-42",
                accession_number="ACC-SECRET-42",
                status="bogus",  # the CHECK constraint refuses the row
            )
        )
        session.commit()
    log.error("refused: %s", refused.value, exc_info=refused.value)
    written = "".join(traceback.format_exception(refused.value)) + caplog.text
    written += describe(refused.value)
    for value in (PATIENT, "PID-SECRET-42", "ACC-SECRET-42"):
        assert value not in written
    assert "ck_study_status" in str(refused.value)  # still says what was refused
    engine.dispose()


def test_over_long_and_non_conforming_values_are_stored_on_postgresql(
    postgres, make_settings, tmp_path
):
    """A PACS's over-long values and UUID UIDs: stored whole (0x0000), the file under a
    hashed name, never under the UID."""
    url = postgres.create_database("ainode_nonconforming")
    settings = make_settings(database_url=url)
    node = build_node(settings, migrate=True)
    server = start_scp(settings, node.ingestor)
    try:
        spec = phantom.PhantomSpec(slices=1, seed=5)
        [path] = phantom.write_series(spec, tmp_path / "one")
        dataset = dcmread(path)
        values = {
            "AccessionNumber": "A" * 40,
            "StudyDescription": "D" * 100,
            "PatientName": "N" * 70 + "^" + "G" * 70,
            "PatientID": "P" * 80,
            "StudyInstanceUID": "6f1c2c8e-3b4a-4f7e-9a1d-2b5c8e7f9a10",
            "SOPInstanceUID": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            "Modality": "CT-NONCONFORMING",
        }
        for keyword, value in values.items():
            setattr(dataset, keyword, value)
        dataset.file_meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
        association = _ct_association(settings.dicom_port, "TESTSCU")
        try:
            status = association.send_c_store(dataset)
        finally:
            association.release()
        assert status.Status == 0x0000
        with node.session_factory() as session:
            study = session.scalars(select(Study)).one()
            [row] = session.scalars(select(Instance)).all()
        assert study.accession_number == values["AccessionNumber"]
        assert study.study_description == values["StudyDescription"]
        assert study.patient_name == values["PatientName"]
        assert study.patient_id == values["PatientID"]
        assert study.study_instance_uid == values["StudyInstanceUID"]
        assert row.sop_instance_uid == values["SOPInstanceUID"]
        assert values["SOPInstanceUID"] not in row.store_key
        assert row.store_key.split("/")[1].startswith("h")
        assert dcmread(node.store.path(row.store_key)).SOPInstanceUID == values["SOPInstanceUID"]
    finally:
        server.shutdown()
        node.close()
        postgres.drop_database("ainode_nonconforming")


@pytest.mark.parametrize("value", ["1.2.3\n", "1.2.3\n\n", "1.02.3", "1.2.", "a.b", "1" * 65])
def test_check_uid_refuses_what_is_not_a_dicom_uid(value):
    assert not is_uid(value)
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        check_uid(value)


@pytest.mark.parametrize("uid", ["1.2.3\n", "../../etc/passwd", "6f1c2c8e-3b4a", "1." * 40])
def test_a_non_conforming_uid_is_never_in_its_store_key(tmp_path, uid):
    store = InstanceStore(tmp_path)
    key = store.key_for(uid)
    folder, name = key.split("/")
    assert len(folder) == 3 and name.startswith("h") and name.endswith(".dcm")
    assert store.path(key).parent.parent == tmp_path
    assert store.key_for("1.2.840.10008.1").endswith("/1.2.840.10008.1.dcm")


@contextmanager
def permissive_umask():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_patient_data_on_disk_is_private_whatever_the_umask(make_settings, chest_series):
    """Data folder, store and spool 0700; database (and its -wal, -shm) and instances 0600."""
    with permissive_umask():
        settings = make_settings()
        node = build_node(settings, migrate=True)
        try:
            node.store.prepare()
            result = node.ingestor.ingest_part10(chest_series[1][0].read_bytes(), "TESTSCU")
            assert result.outcome is Outcome.STORED
            with node.engine.connect() as connection:  # the WAL is open while connected
                connection.execute(select(func.count()).select_from(Instance))
                database = settings.data_dir / "ainode.db"
                for name in ("ainode.db", "ainode.db-wal", "ainode.db-shm"):
                    assert _mode(database.with_name(name)) == 0o600, name
            assert _mode(settings.data_dir) == 0o700
            assert _mode(node.store.root) == 0o700
            assert _mode(node.store.root / "fff") == 0o700
            assert _mode(node.ingestor.spool_folder()) == 0o700
            assert _mode(node.store.path(result.store_key)) == 0o600
            node.store.write("abc/1.2.3.dcm", [b"x"])
            assert _mode(node.store.path("abc/1.2.3.dcm")) == 0o600
        finally:
            node.close()


def test_the_web_secret_key_is_private_and_made_once(make_settings):
    from webui import _secret_key

    with permissive_umask():
        settings = make_settings()
        key = _secret_key(settings)
    path = settings.data_dir / "web_secret_key"
    assert _mode(path) == 0o600 and _mode(settings.data_dir) == 0o700
    assert _secret_key(settings) == key == path.read_text().strip()


def test_a_data_folder_open_to_others_is_said_in_the_log(make_settings, caplog):
    settings = make_settings()
    settings.data_dir.mkdir(mode=0o755)
    settings.data_dir.chmod(0o755)
    node = build_node(settings, migrate=True)
    node.close()
    assert _mode(settings.data_dir) == 0o755  # the operator's choice is kept
    assert "is open to every user of this machine" in caplog.text
