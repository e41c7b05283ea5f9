"""Retention: which reported studies lose their pixel data, what stays, what never goes."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from ainode.cli import main
from node import phantom
from node.analysis.result import ModelIdentity
from node.records import lifecycle
from node.records.db import (
    Analysis,
    AnalysisStatus,
    AuditEvent,
    ExportJob,
    ExportStatus,
    Instance,
    Label,
    Report,
    ReportStatus,
    Series,
    SlicePrediction,
    Study,
    StudyStatus,
    Verdict,
    utcnow,
)
from node.records.export import export_bundle
from node.reporting import delivery
from node.runtime import build_node
from node.settings import Peer
from node.workflow import jobs, retention, sweeper
from tests.config import write_config
from tests.peers import free_port

S = StudyStatus
NOW = utcnow()  # the clock the runs are given: "now" for every study's age
OLD, YOUNG = NOW - timedelta(days=40), NOW - timedelta(days=10)
MODEL = ModelIdentity("retention-test", "1")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Path]]:
    """Six small phantom studies (three slices each), each its own Study Instance UID."""
    root = tmp_path_factory.mktemp("retention")
    return [
        phantom.write_series(phantom.PhantomSpec(slices=3, seed=500 + n), root / f"s{n}")
        for n in range(6)
    ]


@pytest.fixture
def make_node(make_settings):
    built = []

    def make(**overrides):
        values = {"peers": [Peer(name="pacs", ae_title="PACS", port=free_port())]}
        node = build_node(make_settings(**{**values, **overrides}), migrate=True)
        built.append(node)
        return node

    yield make
    for node in built:
        node.close()


def ingest(node, files: list[Path]) -> int:
    for path in files:
        node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with node.session_factory() as session:
        return session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one()


def analysed(node, files: list[Path]) -> tuple[int, int]:
    """A study moved through the lifecycle to ``analyzed`` with a result: (study, analysis)."""
    study_id = ingest(node, files)
    with node.session_factory() as session, session.begin():
        assert lifecycle.move_where(session, study_id, {S.RECEIVING}, S.STABLE)
        assert lifecycle.move_where(session, study_id, {S.STABLE}, S.QUEUED)
    analysis_id = jobs.claim_study(node, study_id, MODEL, "worker-1")
    with node.session_factory() as session, session.begin():
        uid = session.scalars(
            select(Instance.sop_instance_uid)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
        ).first()
        probabilities = {"Covid_19": 0.7, "Normal": 0.2, "Pneumonia": 0.1}
        session.add(SlicePrediction(analysis_id=analysis_id, position=0, sop_instance_uid=uid,
                                    frame=None, probabilities=probabilities))  # fmt: skip
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id)
            .values(status=AnalysisStatus.DONE, predicted_class="Covid_19", rule="top-mean",
                    probabilities=probabilities, slices_evaluated=1, finished_at=utcnow())
        )  # fmt: skip
        assert lifecycle.end_run(session, study_id, analysis_id, S.ANALYZED)
    return study_id, analysis_id


def reported(node, files: list[Path], at) -> int:
    """A study whose SR was delivered at ``at`` (so it is ``reported`` since then)."""
    study_id, analysis_id = analysed(node, files)
    with node.session_factory() as session, session.begin():
        report = delivery.open_report(session, analysis_id, node.settings)
        # delivery's own send needs a PACS; the outcome it records is this row
        report.status, report.sent_at = ReportStatus.SENT, at
        assert lifecycle.move_where(session, study_id, {S.ANALYZED}, S.REPORTED, now=at)
    return study_id


def uid_of(node, study_id: int) -> str:
    with node.session_factory() as session:
        return session.get(Study, study_id).study_instance_uid


def files_of(node, study_id: int) -> list[Path]:
    with node.session_factory() as session:
        keys = session.scalars(
            select(Instance.store_key)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
        ).all()
    return [node.store.path(key) for key in keys]


def has_pixels(path: Path) -> bool:
    return "PixelData" in dcmread(path)


def dry_uids(node, now=NOW) -> list[str]:
    return [c.study_instance_uid for c in retention.run_retention(node, now, dry_run=True).studies]


# ------------------------------------------------------------------ the age policy


def test_dry_run_lists_exactly_the_studies_reported_before_retention_days(make_node, studies):
    node = make_node(retention_days=30)
    old = reported(node, studies[0], OLD)
    reported(node, studies[1], YOUNG)  # reported, but recently
    analysed(node, studies[2])  # a result, no SR delivered yet
    ingest(node, studies[3])  # still receiving
    run = retention.run_retention(node, NOW, dry_run=True)
    assert [c.study_instance_uid for c in run.studies] == [uid_of(node, old)]
    (candidate,) = run.studies
    assert candidate.why == "reported 40 days ago (retention_days 30)"
    assert candidate.size_bytes == sum(p.stat().st_size for p in files_of(node, old))
    assert all(has_pixels(p) for p in files_of(node, old))  # a dry run removes nothing


def test_the_policy_is_off_unless_the_site_sets_it(make_node, studies):
    node = make_node()
    assert node.settings.retention_days is None
    assert node.settings.retention_min_free_disk_mb is None
    old = reported(node, studies[0], NOW - timedelta(days=3650))
    assert retention.run_retention(node, NOW).studies == []
    assert all(has_pixels(p) for p in files_of(node, old))


def test_the_run_removes_pixel_data_and_keeps_rows_results_and_reports(
    make_node, studies, caplog, database_url
):
    node = make_node(retention_days=30, database_url=database_url)
    old, young = reported(node, studies[0], OLD), reported(node, studies[1], YOUNG)
    before = {p: p.stat().st_size for p in files_of(node, old)}
    with caplog.at_level(logging.INFO, logger="node.workflow.retention"):
        run = retention.run_retention(node, NOW)
    assert [c.study_id for c in run.studies] == [old]
    for path, size in before.items():
        header = dcmread(path)  # still a readable DICOM file: its header is kept
        assert "PixelData" not in header and header.StudyInstanceUID == uid_of(node, old)
        assert path.stat().st_size < size
    freed = sum(size - path.stat().st_size for path, size in before.items())
    assert run.freed_bytes == freed > 0
    assert all(has_pixels(p) for p in files_of(node, young))
    with node.session_factory() as session:
        study = session.get(Study, old)
        assert study.status == S.REPORTED and study.pixels_removed_at >= NOW
        assert study.pixels_removed_bytes == freed
        assert retention.freed_bytes_total(session) == freed
        instances = session.scalars(
            select(Instance).join(Series).where(Series.study_id == old)
        ).all()
        assert len(instances) == 3
        assert {i.removed_at for i in instances} == {study.pixels_removed_at}
        analysis = session.scalars(select(Analysis).where(Analysis.study_id == old)).one()
        assert analysis.predicted_class == "Covid_19" and len(analysis.slices) == 1
        assert session.scalars(select(Report).where(Report.analysis_id == analysis.id)).one()
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "retention"))
        assert (event.study_id, event.username) == (old, "lifecycle")
    line = f"retention: study {uid_of(node, old)} pixel data removed (3 instances, {freed} bytes"
    assert line in caplog.text
    assert "PHANTOM" not in caplog.text  # no patient name in the log
    # A second run finds nothing more to take, and the SR can still be rebuilt
    assert retention.run_retention(node, NOW).studies == []
    result, headers, _study, _ = delivery.study_result(node, analysis.id)
    assert result.predicted_class == "Covid_19" and len(headers) == 1
    # what Prometheus sees
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from node.metrics import make_registry

    text = generate_latest(make_registry(node)).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name.endswith("freed_bytes")]
    assert [s.value for s in family.samples if s.name.endswith("_total")] == [freed]


# ------------------------------------------------------------------ protections


def label(node, study_id, keyword: str, at) -> None:
    with node.session_factory() as session, session.begin():
        session.add(Label(study_id=study_id, keyword=keyword, created_by="dr.rad", created_at=at))


def export_job(node, at, selection=None) -> None:
    with node.session_factory() as session, session.begin():
        session.add(ExportJob(requested_by="dr.rad", status=ExportStatus.DONE, created_at=at,
                              finished_at=at, parameters={"selection": selection}))  # fmt: skip


def test_a_study_labelled_for_training_stays_until_an_export_took_it(make_node, studies):
    node = make_node(retention_days=30)
    study = reported(node, studies[0], OLD)
    label(node, study, "COVID", NOW - timedelta(days=5))
    export_job(node, NOW - timedelta(days=6))  # an export from before the label
    export_job(node, NOW - timedelta(days=4), selection=["Pneumonia"])  # did not select it
    assert dry_uids(node) == []
    assert retention.run_retention(node, NOW).studies == []
    assert all(has_pixels(p) for p in files_of(node, study))
    export_job(node, NOW - timedelta(days=3), selection=["covid"])  # took it
    assert dry_uids(node) == [uid_of(node, study)]


def test_a_plain_tag_or_an_exclude_label_does_not_keep_a_study(make_node, studies):
    node = make_node(retention_days=30)
    tagged, excluded = reported(node, studies[0], OLD), reported(node, studies[1], OLD)
    label(node, tagged, "teaching-file", NOW)
    label(node, excluded, "Exclude", NOW)
    assert sorted(dry_uids(node)) == sorted([uid_of(node, tagged), uid_of(node, excluded)])


@pytest.mark.parametrize(
    "status", [ReportStatus.PENDING, ReportStatus.RETRYING, ReportStatus.FAILED]
)
def test_a_study_whose_latest_sr_is_not_delivered_is_under_review(
    make_node, studies, status, database_url
):
    node = make_node(retention_days=30, database_url=database_url)
    study = reported(node, studies[0], OLD)
    with node.session_factory() as session, session.begin():
        report = session.scalars(select(Report)).one()
        delivery.resend(session, report)  # a person asked for the SR again
        report.status = status  # what the delivery recorded since
    assert dry_uids(node) == []
    assert retention.run_retention(node, NOW).studies == []
    assert all(has_pixels(p) for p in files_of(node, study))


def test_a_recent_correction_keeps_the_study_under_review(make_node, studies, database_url):
    node = make_node(retention_days=30, retention_review_days=14, database_url=database_url)
    corrected, agreed = reported(node, studies[0], OLD), reported(node, studies[1], OLD)
    with node.session_factory() as session, session.begin():
        for study_id, agrees in ((corrected, False), (agreed, True)):
            analysis_id = session.scalars(
                select(Analysis.id).where(Analysis.study_id == study_id)
            ).one()
            session.add(Verdict(study_id=study_id, analysis_id=analysis_id, username="dr.rad",
                                agrees=agrees, corrected_class=None if agrees else "Normal",
                                at=NOW - timedelta(days=2)))  # fmt: skip
    assert dry_uids(node) == [uid_of(node, agreed)]
    # the correction keeps it 14 days (until NOW + 12 days), then the age policy applies
    assert dry_uids(node, NOW + timedelta(days=11)) == [uid_of(node, agreed)]
    both = sorted([uid_of(node, corrected), uid_of(node, agreed)])
    assert sorted(dry_uids(node, NOW + timedelta(days=13))) == both


def test_a_study_analysed_again_or_receiving_is_never_taken(make_node, studies):
    node = make_node(retention_days=30)
    requeued, reopened = reported(node, studies[0], OLD), reported(node, studies[1], OLD)
    with node.session_factory() as session, session.begin():
        assert lifecycle.move_where(session, requeued, {S.REPORTED}, S.QUEUED, "reanalyze")
    assert jobs.claim_study(node, requeued, MODEL, "worker-2") is not None  # analysing
    late = dcmread(studies[1][0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = studies[1][0].parent.parent / "late.dcm"
    late.save_as(path, enforce_file_format=True)
    node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")  # a late instance: receiving
    assert {uid_of(node, requeued), uid_of(node, reopened)}.isdisjoint(dry_uids(node))
    assert retention.run_retention(node, NOW).studies == []
    for study in (requeued, reopened):
        assert all(has_pixels(p) for p in files_of(node, study))


def test_a_study_that_changed_after_it_was_listed_is_left_alone(make_node, studies):
    node = make_node(retention_days=30)
    study = reported(node, studies[0], OLD)
    (candidate,) = retention.candidates(node, NOW)
    with node.session_factory() as session, session.begin():  # a re-analysis meanwhile
        assert lifecycle.move_where(session, study, {S.REPORTED}, S.QUEUED, "reanalyze")
    assert retention.remove_pixel_data(node, candidate, NOW, "lifecycle") == 0
    assert all(has_pixels(p) for p in files_of(node, study))


# ------------------------------------------------------------------ free disk


def test_low_free_disk_takes_the_oldest_reported_studies_first_until_above_it(
    make_node, studies, monkeypatch
):
    node = make_node(retention_min_free_disk_mb=64)
    ages = [300, 200, 100, 50]  # days since reported: all young for any age policy
    ids = [reported(node, studies[n], NOW - timedelta(days=d)) for n, d in enumerate(ages)]
    label(node, ids[0], "COVID", NOW)  # the oldest is protected: never taken
    size = sum(p.stat().st_size for p in files_of(node, ids[1]))
    freed: list[int] = []
    floor = 64 * retention.MB
    # the disk is hardware: its free space is the floor less 1.5 studies, plus what went
    monkeypatch.setattr(
        type(node.store), "free_bytes", lambda _store: floor - int(1.5 * size) + sum(freed)
    )
    dry = retention.run_retention(node, NOW, dry_run=True)
    assert [c.study_id for c in dry.studies] == ids[1:3]
    free_mb = (floor - int(1.5 * size)) // retention.MB
    assert dry.studies[0].why == f"free disk {free_mb} MB below retention_min_free_disk_mb 64"
    run = retention.run_retention(node, NOW)
    freed.append(run.freed_bytes)
    assert [c.study_id for c in run.studies] == ids[1:3]
    assert all(has_pixels(p) for p in files_of(node, ids[0]) + files_of(node, ids[3]))
    assert not any(has_pixels(p) for p in files_of(node, ids[1]) + files_of(node, ids[2]))
    freed.append(size)  # the rest of the disk's space came back meanwhile
    assert retention.run_retention(node, NOW).studies == []


def test_the_free_disk_floor_must_be_above_the_receive_guard(make_settings):
    with pytest.raises(ValueError, match="must be above min_free_disk_mb"):
        make_settings(min_free_disk_mb=2048, retention_min_free_disk_mb=1024)


# ------------------------------------------------------------------ orphan temporaries


def test_orphan_temporaries_older_than_an_hour_go_and_younger_stay(make_node, studies):
    node = make_node()
    study = ingest(node, studies[0])
    kept_file = files_of(node, study)[0]
    spool = node.ingestor.spool_folder()
    old_time = time.time() - 2 * 3600
    made = {
        "old write": kept_file.parent / f".tmp-0a1b2c3d-{kept_file.name}",
        "young write": kept_file.parent / f".tmp-99887766-{kept_file.name}",
        "old spooled": spool / ".abc123.part",
        "young spooled": spool / ".def456.part",
    }
    for name, path in made.items():
        path.write_bytes(b"x" * 1000)
        if name.startswith("old"):
            os.utime(path, (old_time, old_time))
    os.utime(kept_file, (old_time, old_time))  # an old instance is no temporary
    run = retention.run_retention(node)
    assert (run.orphans, run.orphan_bytes) == (2, 2000)
    assert {name for name, path in made.items() if path.exists()} == {
        "young write",
        "young spooled",
    }
    assert kept_file.exists() and has_pixels(kept_file)


# ------------------------------------------------------------------ after removal


def removed_study(make_node, studies, **overrides) -> tuple:
    node = make_node(retention_days=30, **overrides)
    study = reported(node, studies[0], OLD)
    assert [c.study_id for c in retention.run_retention(node, NOW).studies] == [study]
    return node, study


def test_reanalysis_of_a_removed_study_is_refused_with_the_reason(
    make_node, studies, tmp_path, capsys
):
    node, study = removed_study(make_node, studies)
    config = write_config(node.settings, tmp_path / "ainode.toml")
    uid = uid_of(node, study)
    assert main(["-c", str(config), "reanalyze", uid]) == 2
    reason = f"pixel data removed by retention on {NOW:%Y-%m-%d}"
    assert f"study {uid} cannot be analysed again: {reason}" in capsys.readouterr().err
    with node.session_factory() as session:
        assert session.get(Study, study).status == S.REPORTED
    # queued by another path all the same: the worker refuses it, with the reason
    with node.session_factory() as session, session.begin():
        assert lifecycle.move_where(session, study, {S.REPORTED}, S.QUEUED, "reanalyze")
    assert jobs.run_analysis(node, _NoModel(), study) is None
    with node.session_factory() as session:
        row = session.get(Study, study)
        assert (row.status, row.status_reason) == (S.FAILED, reason)


class _NoModel:
    """A bundle the refused run never reaches: only its identity is read."""

    class info:  # noqa: N801
        @staticmethod
        def identity() -> ModelIdentity:
            return MODEL


def test_an_export_skips_a_removed_study_with_the_reason(make_node, studies, tmp_path):
    node, study = removed_study(make_node, studies, export_salt="s" * 32)
    label(node, study, "COVID", NOW)  # labelled after its pixels went
    summary = export_bundle(node, tmp_path / "bundle")
    assert [item["reason"] for item in summary.skipped] == ["pixel data removed by retention"]


def test_the_viewer_answers_410_and_the_study_page_says_why(make_node, studies):
    from tests.webui import add_accounts, sign_in
    from webui import create_app

    node, study = removed_study(make_node, studies, web_secure_cookies=False)
    add_accounts(node)
    app = create_app(node.settings, {"TESTING": True}, node=node)
    client = sign_in(app.test_client(), "radiologist")
    answer = client.get(f"/studies/{study}/slices/0.png")
    assert answer.status_code == 410
    assert f"pixel data removed by retention on {NOW:%Y-%m-%d}" in answer.text
    page = client.get(f"/studies/{study}")
    assert page.status_code == 200
    assert f"No slices to show: pixel data removed by retention on {NOW:%Y-%m-%d}" in page.text


# ------------------------------------------------------------------ lifecycle and CLI


def test_the_lifecycle_sweeper_runs_retention(make_node, studies):
    node = make_node(retention_days=30, retention_interval_seconds=3600)
    study = reported(node, studies[0], utcnow() - timedelta(days=31))
    stop = threading.Event()
    thread = threading.Thread(target=sweeper.run, args=(node, stop, 0.05))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with node.session_factory() as session:
                if session.get(Study, study).pixels_removed_at is not None:
                    break
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert not any(has_pixels(p) for p in files_of(node, study))


def test_cli_dry_run_prints_what_would_go_and_the_run_removes_it(
    make_node, studies, tmp_path, capsys
):
    node = make_node(retention_days=30)
    old = reported(node, studies[0], utcnow() - timedelta(days=40))
    reported(node, studies[1], utcnow() - timedelta(days=10))
    config = write_config(node.settings, tmp_path / "ainode.toml")
    size = sum(p.stat().st_size for p in files_of(node, old))
    assert main(["-c", str(config), "retention", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STUDY", "INSTANCE", "UID", "STUDY", "DATE", "REPORTED", "SIZE",
                                "WHY"]  # fmt: skip
    (row,) = [line for line in lines if line.startswith(uid_of(node, old))]
    assert f"{utcnow() - timedelta(days=40):%Y-%m-%d}" in row
    assert "reported 40 days ago (retention_days 30)" in row
    assert f"{size / 1024 / 1024:.1f} MiB" in row
    assert lines[-1].startswith(
        f"total: 1 studies' pixel data would go ({size / 1024 / 1024:.1f} MiB stored)"
    )
    assert all(has_pixels(p) for p in files_of(node, old))
    assert main(["-c", str(config), "retention"]) == 0
    out = capsys.readouterr().out
    assert "total: 1 studies' pixel data removed (" in out
    assert not any(has_pixels(p) for p in files_of(node, old))
    with node.session_factory() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "retention"))
        assert event.username.startswith("cli:")


def test_cli_says_when_the_policy_is_off(make_node, tmp_path, capsys):
    node = make_node()
    config = write_config(node.settings, tmp_path / "ainode.toml")
    assert main(["-c", str(config), "retention", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("retention policy off (set retention_days")
    assert "total: 0 studies' pixel data would go" in out
