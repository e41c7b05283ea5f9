"""End to end with real peers: Orthanc pushes, Celery workers analyse, the SR lands in Orthanc."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node import phantom
from node.analysis.bundle import ModelInfo
from node.records.db import Analysis, Report, Study, make_engine
from node.reporting.sr import read_sr_summary
from node.settings import DEMO_MODEL_DIR
from tests.config import write_config
from tests.conftest import orthanc_peer
from tests.peers import free_port, start_redis, stop_process, storescp, storescu, wait_for_port

DEMO = DEMO_MODEL_DIR


class NodeProcesses:
    """`ainode serve` / `ainode worker` processes of one test, with their logs."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config, self.workdir, self.procs = config, workdir, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ainode.cli", "--config", str(self.config), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        self.procs.pop(name).send_signal(signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:]
            for p in self.workdir.glob("*.log")
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)
        self.procs.clear()


def studies(config: Path) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "ainode.cli", "--config", str(config), "studies", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def wait_until(condition, timeout: float, what: str, logs=lambda: "", every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


def qido(orthanc, path: str) -> list[dict]:
    """A QIDO-RS answer (application/dicom+json) as a list."""
    answer = orthanc.get(f"/dicom-web{path}")
    if isinstance(answer, bytes | bytearray):
        answer = json.loads(answer or b"[]")
    return answer or []


def sr_in_orthanc(orthanc, study_uid: str):
    """The SR files Orthanc holds in a study, found by QIDO Modality=SR."""
    found = []
    for item in qido(orthanc, f"/studies/{study_uid}/series?Modality=SR"):
        series_uid = item["0020000E"]["Value"][0]
        for instance in qido(orthanc, f"/studies/{study_uid}/series/{series_uid}/instances"):
            sop = instance["00080018"]["Value"][0]
            orthanc_id = orthanc.post("/tools/lookup", raw=sop.encode())[0]["ID"]
            found.append(dcmread(io.BytesIO(orthanc.get(f"/instances/{orthanc_id}/file"))))
    return found


@pytest.fixture
def demo_info() -> ModelInfo:
    return ModelInfo.from_json(DEMO / "model.json")


@pytest.fixture
def redis(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


def node_config(make_settings, orthanc, tmp_path, **overrides):
    settings = make_settings(
        peers=[orthanc_peer(orthanc)],
        report_peer="pacs",
        study_stable_seconds=2,
        requeue_after_seconds=3,
        report_retry_seconds=1,
        **overrides,
    )
    orthanc.add_modality("AINODE", settings.ae_title, "127.0.0.1", settings.dicom_port)
    return settings, write_config(settings, tmp_path / "ainode.toml")


# The demo model is right on ~96% of held-out phantom slices and on the held-out studies
# (tests/test_bundle.py measures that); these end-to-end tests are about delivery, so they
# use phantom seeds it classifies correctly, checked once by running the pipeline in process.
def push_phantom(orthanc, tmp_path, finding="covid", slices=24, seed=22, syntax="explicit"):
    spec = phantom.PhantomSpec(finding=finding, slices=slices, seed=seed, patient_id=f"E2E{seed}")
    files = phantom.write_series(spec, tmp_path / f"phantom-{seed}", transfer_syntax=syntax)
    orthanc.upload_dir(files[0].parent)
    uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    orthanc.store_to_modality("AINODE", [orthanc.find_study(uid)])
    return uid, files


def check_sr(sr, study_uid: str, info: ModelInfo, finding: str = "COVID-19") -> dict:
    summary = read_sr_summary(sr)
    assert sr.StudyInstanceUID == study_uid
    assert finding.lower() in summary["finding"].lower()
    assert summary["algorithm_name"] == info.name
    assert summary["algorithm_version"] == info.version
    assert summary["demo"] is True
    return summary


def test_orthanc_push_is_analysed_by_a_celery_worker_on_redis_and_the_sr_files_into_the_study(
    make_settings, orthanc, redis, tmp_path, demo_info
):
    settings, config = node_config(make_settings, orthanc, tmp_path, broker_url=redis.url)
    procs = NodeProcesses(config, tmp_path)
    try:
        procs.start("serve", "serve", "--no-worker")
        procs.start("worker", "worker")
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        study_uid, _files = push_phantom(orthanc, tmp_path)
        [sr] = wait_until(lambda: sr_in_orthanc(orthanc, study_uid), 240, "SR", procs.logs)
        summary = check_sr(sr, study_uid, demo_info)
        assert summary["finding_code"] == ("SCT", "840539006")
        wait_until(lambda: studies(config)[0]["status"] == "reported", 30, "reported", procs.logs)
    finally:
        procs.stop_all()


def rows(settings, model) -> list:
    """All rows of one table (Analysis or Report), oldest first, from the node's database."""
    from node.runtime import build_node

    node = build_node(settings)
    try:
        with node.session_factory() as session:
            return session.scalars(select(model).order_by(model.id)).all()
    finally:
        node.close()


def study_statuses(engine) -> list[str]:
    """The lifecycle status of every study, read straight from the node's database."""
    with engine.connect() as connection:
        return list(connection.scalars(select(Study.status)))


def analyses(settings) -> list[Analysis]:
    return rows(settings, Analysis)


def reports(settings) -> list[Report]:
    return rows(settings, Report)


def running_analysis(engine) -> bool:
    """An analysis run is open (claimed, not finished), read straight from the database."""
    with engine.connect() as connection:
        return bool(
            connection.scalars(select(Analysis.id).where(Analysis.status == "running")).first()
        )


def kill_mid_analysis(settings, pid: int, logs) -> None:
    """SIGKILL worker ``pid`` while it is analysing: wait for the open analysis run, freeze
    the worker (SIGSTOP), check the run is still open, then kill it. Deterministic: a
    stopped worker cannot finish the run between the check and the kill."""
    engine = make_engine(settings.resolved_database_url)
    try:
        wait_until(lambda: running_analysis(engine), 180, "analysis to start", logs, every=0.05)
        os.kill(pid, signal.SIGSTOP)
        assert running_analysis(engine), "the analysis ended before the worker was stopped"
        os.kill(pid, signal.SIGKILL)
    finally:
        engine.dispose()


def assert_analysed_and_reported_once(settings) -> None:
    runs = analyses(settings)
    outcomes = [(a.status, a.error) for a in runs]
    assert [a.status for a in runs].count("done") == 1, outcomes
    assert "abandoned" in {a.status for a in runs}, outcomes  # the kill landed mid-analysis
    assert {a.status for a in runs} <= {"done", "abandoned"}, outcomes
    assert len(reports(settings)) == 1


def test_worker_killed_mid_analysis_the_study_completes_once_after_restart(
    make_settings, orthanc, redis, tmp_path, demo_info
):
    settings, config = node_config(
        make_settings, orthanc, tmp_path, broker_url=redis.url, analysis_timeout_seconds=6
    )
    procs = NodeProcesses(config, tmp_path)
    try:
        procs.start("serve", "serve", "--no-worker")
        worker = procs.start("worker", "worker")
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        study_uid, _files = push_phantom(orthanc, tmp_path, slices=60, seed=24)
        kill_mid_analysis(settings, worker.pid, procs.logs)
        procs.kill("worker")
        procs.start("worker2", "worker")
        [sr] = wait_until(lambda: sr_in_orthanc(orthanc, study_uid), 240, "SR", procs.logs)
        check_sr(sr, study_uid, demo_info)
        assert_analysed_and_reported_once(settings)
    finally:
        procs.stop_all()


def serve_workers(procs: NodeProcesses) -> dict[str, int]:
    """The embedded workers `ainode serve` says it (re)started: {queues: latest pid}."""
    found = re.findall(r"worker (\S+) (?:started|restarted) \(pid (\d+)\)", procs.log("serve"))
    return {name: int(pid) for name, pid in found}


def test_embedded_default_needs_no_broker_server_and_restarts_a_killed_worker(
    make_settings, orthanc, tmp_path, demo_info
):
    """`ainode serve` alone (SQLite broker, its own workers): its analysis worker killed
    mid-analysis is restarted by serve, and the study is still analysed and reported once."""
    settings, config = node_config(make_settings, orthanc, tmp_path, analysis_timeout_seconds=6)
    assert settings.broker_url is None
    procs = NodeProcesses(config, tmp_path)
    try:
        serve = procs.start("serve", "serve")  # starts its own workers on the SQLite broker
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        study_uid, _files = push_phantom(orthanc, tmp_path, slices=60, seed=23)
        killed = serve_workers(procs)["analysis,exports"]
        kill_mid_analysis(settings, killed, procs.logs)
        wait_until(
            lambda: serve_workers(procs)["analysis,exports"] != killed,
            60,
            "serve to restart its worker",
            procs.logs,
        )
        assert f"(pid {killed}) ended unexpectedly (killed by SIGKILL)" in procs.log("serve")
        [sr] = wait_until(lambda: sr_in_orthanc(orthanc, study_uid), 240, "SR", procs.logs)
        check_sr(sr, study_uid, demo_info)
        assert_analysed_and_reported_once(settings)
        workers = serve_workers(procs).values()
        procs.stop_all()  # SIGTERM: serve stops its workers and exits cleanly
        assert serve.returncode == 0, procs.logs()
        assert all(process_gone(pid) for pid in workers)
    finally:
        procs.stop_all()


def process_gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def task_ends(procs: NodeProcesses, task: str) -> int:
    """How many runs of ``task`` the worker logs say have ended (succeeded, retried, raised)."""
    pattern = rf"Task {re.escape(task)}\[[^\]]+\] (?:succeeded|retry|raised)"
    return sum(len(re.findall(pattern, procs.log(name))) for name in ("worker1", "worker2"))


def test_two_workers_race_for_one_study_and_one_report_on_postgresql_and_redis(
    make_settings, postgres, redis, tmp_path
):
    """The production layout: PostgreSQL, Redis, `serve --no-worker` and two workers, each
    handed the same study and the same report: one analysis, one SR at the peer."""
    from node.settings import Peer
    from node.workflow.queue import ANALYZE_STUDY, SEND_REPORT, enqueue, make_celery

    database = postgres.create_database("ainode_e2e_race")
    sr_port = free_port()
    settings = make_settings(
        database_url=database,
        broker_url=redis.url,
        peers=[Peer(name="archive", ae_title="ARCHIVE", port=sr_port)],
        report_peer="archive",
        study_stable_seconds=2,
        requeue_after_seconds=3,
        report_retry_seconds=1,
    )
    config = write_config(settings, tmp_path / "ainode.toml")
    archive = storescp(sr_port, tmp_path / "archive", aet="ARCHIVE")
    procs = NodeProcesses(config, tmp_path)
    app = make_celery(settings)
    try:
        procs.start("serve", "serve", "--no-worker")
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        procs.start("worker1", "worker")
        procs.start("worker2", "worker")
        spec = phantom.PhantomSpec(finding="covid", slices=24, seed=26, patient_id="E2E26")
        files = phantom.write_series(spec, tmp_path / "study")
        assert storescu("127.0.0.1", settings.dicom_port, files).returncode == 0
        [study] = wait_until(lambda: rows(settings, Study), 30, "the study", procs.logs)
        wait_until(lambda: rows(settings, Study)[0].status != "receiving", 60, "stable", procs.logs)
        assert enqueue(app, ANALYZE_STUDY, study.id)  # the second worker's copy
        [report] = wait_until(lambda: reports(settings), 240, "the report", procs.logs)
        assert enqueue(app, SEND_REPORT, report.id)  # the second worker's copy
        wait_until(lambda: task_ends(procs, ANALYZE_STUDY) >= 2, 120, "both analyses", procs.logs)
        wait_until(lambda: task_ends(procs, SEND_REPORT) >= 2, 120, "both sends", procs.logs)
        wait_until(lambda: reports(settings)[0].status == "sent", 120, "delivery", procs.logs)
        assert [a.status for a in analyses(settings)] == ["done"]
        assert rows(settings, Study)[0].status == "reported"
        received = list((tmp_path / "archive").glob("*.dcm"))
        assert len(received) == 1, received
        assert dcmread(received[0]).SOPInstanceUID == reports(settings)[0].sop_instance_uid
    finally:
        procs.stop_all()
        stop_process(archive)
        postgres.drop_database("ainode_e2e_race")


def test_ingest_goes_on_while_redis_is_down_and_analysis_follows_when_it_returns(
    make_settings, orthanc, redis, tmp_path, demo_info
):
    settings, config = node_config(make_settings, orthanc, tmp_path, broker_url=redis.url)
    procs = NodeProcesses(config, tmp_path)
    try:
        procs.start("serve", "serve", "--no-worker")
        procs.start("worker", "worker")
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        redis.stop()
        spec = phantom.PhantomSpec(finding="pneumonia", slices=24, seed=24, patient_id="E2E24")
        files = phantom.write_series(spec, tmp_path / "during-outage")
        result = storescu("127.0.0.1", settings.dicom_port, files)
        assert result.returncode == 0, result.stdout + result.stderr  # ingest does not care
        wait_until(lambda: studies(config)[0]["status"] == "queued", 30, "queued", procs.logs)
        redis.start()
        study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        [sr] = wait_until(lambda: sr_in_orthanc(orthanc, study_uid), 240, "SR", procs.logs)
        check_sr(sr, study_uid, demo_info, finding="pneumonia")
    finally:
        procs.stop_all()


def test_sr_destination_down_is_retried_and_delivered_when_it_returns(
    make_settings, orthanc, tmp_path
):
    from node.settings import Peer

    sr_port = free_port()
    destination = Peer(name="archive", ae_title="ARCHIVE", port=sr_port)
    settings = make_settings(
        peers=[orthanc_peer(orthanc), destination],
        report_peer="archive",
        study_stable_seconds=2,
        requeue_after_seconds=3,
        report_retry_seconds=1,
    )
    config = write_config(settings, tmp_path / "ainode.toml")
    procs = NodeProcesses(config, tmp_path)
    archive = None
    try:
        procs.start("serve", "serve")
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        spec = phantom.PhantomSpec(finding="covid", slices=24, seed=25, patient_id="E2E25")
        files = phantom.write_series(spec, tmp_path / "study")
        assert storescu("127.0.0.1", settings.dicom_port, files).returncode == 0

        def retrying():
            found = reports(settings)
            return found and found[0].status == "retrying" and found[0].retries >= 1

        wait_until(retrying, 240, "a failed delivery to be recorded", procs.logs)
        [report] = reports(settings)
        assert "ARCHIVE" in report.last_error
        shown = studies(config)[0]  # what an administrator sees meanwhile
        assert shown["status"] == "analyzed"
        # retrying, or being sent again right now (report_retry_seconds is 1): the last
        # error stays on the report until a delivery succeeds
        assert shown["report"]["status"] in ("retrying", "sending"), shown["report"]
        assert "ARCHIVE" in shown["report"]["last_error"]
        archive = storescp(sr_port, tmp_path / "archive", aet="ARCHIVE")
        wait_until(lambda: reports(settings)[0].status == "sent", 120, "delivery", procs.logs)
        [received] = list((tmp_path / "archive").glob("*.dcm"))
        assert dcmread(received).SOPInstanceUID == report.sop_instance_uid
        assert studies(config)[0]["status"] == "reported"
    finally:
        procs.stop_all()
        if archive is not None:
            stop_process(archive)
