"""Work that must end once: attempts, late instances, heartbeats and the sweeper's loop."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from node import phantom
from node.analysis.bundle import ModelBundle
from node.records import lifecycle
from node.records.db import Analysis, Instance, Report, Study, StudyStatus, utcnow
from node.settings import DEMO_MODEL_DIR, Peer
from node.workflow import jobs, sweeper
from tests.peers import free_port
from tests.test_pipeline import ingest_files, stable


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.load(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    spec = phantom.PhantomSpec(slices=12, seed=33)
    return phantom.write_series(spec, tmp_path_factory.mktemp("hardening"))


def study_row(node, study_id) -> Study:
    with node.session_factory() as session:
        return session.get(Study, study_id)


def stored_file(node, study_id, index: int = 5) -> Path:
    with node.session_factory() as session:
        keys = session.scalars(select(Instance.store_key).order_by(Instance.id)).all()
    return node.store.path(keys[index])


def late_instance(series: list[Path], tmp_path: Path) -> bytes:
    """One more instance of the study (a new SOP Instance UID in the same series)."""
    from pydicom.uid import generate_uid

    ds = dcmread(series[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / f"late-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


# ------------------------------------------------------------------ attempts (finding 1)


def test_a_corrupt_slice_is_skipped_with_its_reason_and_the_rest_analysed(node, bundle, series):
    study_id = ingest_files(node, series)
    stable(node, study_id)
    path = stored_file(node, study_id)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated on disk
    assert jobs.run_analysis(node, bundle, study_id) is None  # (no report destination)
    assert study_row(node, study_id).status == "analyzed"
    with node.session_factory() as session:
        analysis = session.scalars(select(Analysis)).one()
        (uid,) = [uid for uid, why in analysis.instances_skipped.items() if "decode" in why]
        assert "cannot decode the pixel data" in analysis.instances_skipped[uid]
        assert uid == dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert analysis.slices_evaluated > 0


def test_a_study_of_corrupt_files_fails_at_once_with_the_reason(node, bundle, series):
    study_id = ingest_files(node, series)
    stable(node, study_id)
    for index in range(len(series)):
        path = stored_file(node, study_id, index)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert jobs.run_analysis(node, bundle, study_id) is None
    study = study_row(node, study_id)
    assert study.status == "failed"
    assert study.status_reason.startswith(f"no slice could be decoded ({len(series)} × ")
    assert "cannot decode the pixel data" in study.status_reason


def test_an_error_that_keeps_coming_fails_the_study_after_the_attempts(
    make_node, bundle, series, tmp_path
):
    node = make_node(analysis_max_attempts=3)
    study_id = ingest_files(node, series)
    stable(node, study_id)
    path = stored_file(node, study_id)
    path.write_bytes(path.read_bytes()[:400])  # a header cut before the SOP Instance UID
    for attempt in (1, 2, 3):
        with pytest.raises(AttributeError):
            jobs.run_analysis(node, bundle, study_id)
        study = study_row(node, study_id)
        assert study.analysis_attempts == attempt
        assert study.status == ("failed" if attempt == 3 else "queued")
    assert study.status_reason.startswith("gave up after 3 attempts: AttributeError")
    assert "SOPInstanceUID" in study.status_reason
    assert jobs.run_analysis(node, bundle, study_id) is None  # no fourth run
    # More instances: the study is received, stable, queued again with its attempts anew.
    node.ingestor.ingest_part10(late_instance(series, tmp_path), "TESTSCU")
    assert study_row(node, study_id).status == "receiving"
    stable(node, study_id)
    assert study_row(node, study_id).analysis_attempts == 0


def test_a_worker_lost_again_and_again_fails_the_study(make_node, bundle, series, database_url):
    node = make_node(
        analysis_max_attempts=2, analysis_timeout_seconds=600, database_url=database_url
    )
    study_id = ingest_files(node, series)
    stable(node, study_id)
    identity = bundle.info.identity()
    assert jobs.claim_study(node, study_id, identity, "w1") is not None
    later = utcnow() + timedelta(seconds=601)
    assert sweeper.due_work(node, later).analyses == [study_id]
    assert study_row(node, study_id).status == "queued"
    assert jobs.claim_study(node, study_id, identity, "w2") is not None
    assert sweeper.due_work(node, later + timedelta(seconds=1202)).analyses == []
    study = study_row(node, study_id)
    assert study.status == "failed"
    assert study.status_reason == "gave up after 2 attempts: worker lost (no heartbeat for 600 s)"


# --------------------------------------------------------------- late instances (finding 4)


@pytest.mark.parametrize("status", ["queued", "analyzing", "analyzed", "reported", "failed"])
def test_an_instance_arriving_late_makes_the_study_receive_again(node, series, tmp_path, status):
    study_id = ingest_files(node, series)
    with node.session_factory() as session, session.begin():
        session.execute(update(Study).where(Study.id == study_id).values(status=status))
    node.ingestor.ingest_part10(late_instance(series, tmp_path), "TESTSCU")
    assert study_row(node, study_id).status == "receiving"


@pytest.mark.parametrize("status", ["analyzed", "reported", "failed"])
def test_an_sr_arriving_late_leaves_a_finished_study_as_it_is(node, series, tmp_path, status):
    # A PACS that routes whole studies sends the node's own SR back to it: were that to
    # reopen the study, the node would analyse and report it again, for ever.
    study_id = ingest_files(node, series)
    with node.session_factory() as session, session.begin():
        session.execute(update(Study).where(Study.id == study_id).values(status=status))
    node.ingestor.ingest_part10(sr_instance(series, tmp_path), "PACS")
    study = study_row(node, study_id)
    assert (study.status, study.instance_count) == (status, len(series) + 1)


def test_an_sr_arriving_late_does_not_supersede_a_report_waiting_for_its_pacs(
    make_node, bundle, series, tmp_path
):
    from node.reporting import delivery
    from node.reporting.sr import DeviceObserver

    peer = Peer(name="archive", ae_title="ARCHIVE", port=free_port())  # down: nobody listens
    node = make_node(peers=[peer], report_peer="archive")
    study_id = ingest_files(node, series)
    stable(node, study_id)
    report_id = jobs.run_analysis(node, bundle, study_id)
    node.ingestor.ingest_part10(sr_instance(series, tmp_path), "PACS")
    with pytest.raises(delivery.ReportRetry):
        delivery.deliver_report(node, report_id, DeviceObserver(uid="2.25.1"))
    with node.session_factory() as session:
        report = session.get(Report, report_id)
        assert report.status == "retrying"
        assert "superseded" not in report.last_error


def sr_instance(series: list[Path], tmp_path: Path) -> bytes:
    """An SR in the study (as the node's own SR, forwarded back by a PACS, would be)."""
    from pydicom.uid import Comprehensive3DSRStorage, generate_uid

    ds = dcmread(series[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "SR"
    del ds.PixelData
    path = tmp_path / f"sr-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_a_run_that_saw_part_of_the_study_discards_its_result(
    make_node, bundle, series, tmp_path, database_url
):
    from node.analysis.analyze import analyze_instances

    peer = Peer(name="archive", ae_title="ARCHIVE", port=free_port())
    node = make_node(peers=[peer], report_peer="archive", database_url=database_url)
    study_id = ingest_files(node, series)
    stable(node, study_id)
    analysis_id = jobs.claim_study(node, study_id, bundle.info.identity(), "w1")
    outcome = analyze_instances(jobs.instance_paths(node, study_id), bundle)
    node.ingestor.ingest_part10(late_instance(series, tmp_path), "TESTSCU")  # meanwhile
    assert jobs._record(node, study_id, analysis_id, outcome) is None
    with node.session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis.status == "abandoned"
        assert "more instances" in analysis.error
        assert session.scalars(select(Report)).all() == []  # no SR for the partial study
    assert study_row(node, study_id).status == "receiving"


def test_a_reported_study_that_receives_more_is_reported_again_with_a_new_sr(
    make_node, bundle, series, tmp_path
):
    from node.reporting import delivery
    from node.reporting.sr import DeviceObserver

    peer = Peer(name="archive", ae_title="ARCHIVE", port=free_port())
    node = make_node(peers=[peer], report_peer="archive")
    study_id = ingest_files(node, series)
    stable(node, study_id)
    first = jobs.run_analysis(node, bundle, study_id)
    with node.session_factory() as session, session.begin():  # as a delivery would
        moved = lifecycle.move_where(
            session, study_id, {StudyStatus.ANALYZED}, StudyStatus.REPORTED
        )
        assert moved
    node.ingestor.ingest_part10(late_instance(series, tmp_path), "TESTSCU")
    now = utcnow() + timedelta(seconds=node.settings.study_stable_seconds + 1)
    with node.session_factory() as session:
        lifecycle.mark_stable(session, node.settings.study_stable_seconds, now=now)
    assert sweeper.due_work(node, now).analyses == [study_id]
    second = jobs.run_analysis(node, bundle, study_id)
    assert second is not None and second != first
    with node.session_factory() as session:
        old, new = session.get(Report, first), session.get(Report, second)
        assert new.sop_instance_uid != old.sop_instance_uid
        assert session.get(Analysis, new.analysis_id).slices_evaluated > 0
    # The first SR, still waiting for its PACS, described part of the study: never sent.
    observer = DeviceObserver(uid="2.25.1")
    assert delivery.deliver_report(node, first, observer) == "failed"
    with node.session_factory() as session:
        assert session.get(Report, first).last_error.startswith("superseded")


# -------------------------------------------------------------------- heartbeat (finding 5)


def test_a_long_run_that_beats_is_not_taken_for_lost(make_node, bundle, series):
    node = make_node(analysis_timeout_seconds=600)
    study_id = ingest_files(node, series)
    stable(node, study_id)
    analysis_id = jobs.claim_study(node, study_id, bundle.info.identity(), "w1")
    now = utcnow()
    with node.session_factory() as session, session.begin():  # an hour in, beat 5 min ago
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id)
            .values(started_at=now - timedelta(hours=1), heartbeat_at=now - timedelta(minutes=5))
        )
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(status_changed_at=now - timedelta(hours=1))
        )
    assert sweeper.due_work(node, now).analyses == []
    assert study_row(node, study_id).status == "analyzing"
    assert sweeper.due_work(node, now + timedelta(minutes=6)).analyses == [study_id]
    with node.session_factory() as session:
        assert session.get(Analysis, analysis_id).status == "abandoned"


def test_the_worker_beats_while_it_analyses(make_node, bundle, series):
    node = make_node(analysis_timeout_seconds=0.3)  # a beat every 50 ms
    study_id = ingest_files(node, series)
    stable(node, study_id)
    jobs.run_analysis(node, bundle, study_id)
    with node.session_factory() as session:
        analysis = session.scalars(select(Analysis)).one()
    assert analysis.status == "done"
    assert analysis.started_at < analysis.heartbeat_at <= analysis.finished_at


# ---------------------------------------------------------------- sweeper loop (finding 6)


def test_an_exception_in_a_pass_does_not_stop_the_sweeper(node, caplog):
    calls = []
    stop = threading.Event()

    def dispatch():
        calls.append(len(calls))
        if len(calls) == 1:
            raise KeyError("a bug in one pass")
        stop.set()

    worker = threading.Thread(target=sweeper.run, args=(node, stop, 0.01, dispatch))
    with caplog.at_level(logging.ERROR, logger="node.workflow.sweeper"):
        worker.start()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert calls == [0, 1]  # the pass after the failure ran
    [record] = [r for r in caplog.records if "lifecycle sweep failed" in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is KeyError


# ------------------------------------------------- UIDs that are not DICOM UIDs (issue 14)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_study_with_uuid_uids_is_stored_analysed_and_reported(
    make_node, bundle, series, tmp_path
):
    # De-identified public sets often carry UUID strings as UIDs: stored under hashed file
    # names, analysed, and the SR refers to the UIDs exactly as the PACS holds them.
    import uuid

    from node.reporting import delivery
    from node.reporting.sr import DeviceObserver, build_sr

    study_uid, series_uid = str(uuid.uuid4()), str(uuid.uuid4())
    files = []
    for path in series:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = str(uuid.uuid4())
        files.append(tmp_path / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(files[-1])
    peer = Peer(name="archive", ae_title="ARCHIVE", port=free_port())
    node = make_node(peers=[peer], report_peer="archive")
    study_id = ingest_files(node, files)
    with node.session_factory() as session:
        keys = session.scalars(select(Instance.store_key)).all()
    assert len(keys) == len(files)
    assert not any(f.stem in key for f in files for key in keys)  # never a path
    stable(node, study_id)
    report_id = jobs.run_analysis(node, bundle, study_id)
    assert study_row(node, study_id).status == "analyzed"
    with node.session_factory() as session:
        analysis_id = session.get(Report, report_id).analysis_id
    result, headers, _study, _ = delivery.study_result(node, analysis_id)
    sr = build_sr(headers, result, DeviceObserver(uid="2.25.1"))
    assert sr.StudyInstanceUID == study_uid
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    referenced = {ref.ReferencedSOPInstanceUID for ref in evidence.ReferencedSOPSequence}
    assert referenced <= {Path(f).stem for f in files} and referenced
