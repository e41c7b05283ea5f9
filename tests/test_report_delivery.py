"""SR delivery against real peers: one delivery at a time, the retry window, what the PACS
answers, STOW through the whole pipeline and a re-analysis's new SR."""

from __future__ import annotations

import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from pydicom import dcmread
from sqlalchemy import select, update

from node import phantom
from node.analysis.bundle import ModelBundle
from node.records.db import Report, Study, utcnow
from node.reporting import delivery
from node.reporting.sr import SendError, build_sr, send_sr_stow
from node.runtime import build_node
from node.settings import DEMO_MODEL_DIR, Peer
from node.workflow import jobs, sweeper
from tests.conftest import orthanc_peer
from tests.peers import ArchiveSCP, free_port
from tests.test_pipeline import ingest_files, stable
from tests.test_report import OBSERVER, study_result

ARCHIVE = ArchiveSCP.AE_TITLE


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.load(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    spec = phantom.PhantomSpec(slices=12, seed=33)
    return phantom.write_series(spec, tmp_path_factory.mktemp("delivery"))


@pytest.fixture
def archive(request):
    scp = ArchiveSCP(**getattr(request, "param", {}))
    yield scp
    scp.stop()


def analysed(make_settings, bundle, series, peer: Peer, **overrides):
    """A node with one analysed study whose report to ``peer`` is pending: (node, report id)."""
    settings = make_settings(peers=[peer], report_peer=peer.name, **overrides)
    node = build_node(settings, migrate=True)
    study_id = ingest_files(node, series)
    stable(node, study_id)
    return node, jobs.run_analysis(node, bundle, study_id)


def report_row(node, report_id) -> Report:
    with node.session_factory() as session:
        return session.get(Report, report_id)


def study_status(node) -> str:
    with node.session_factory() as session:
        return session.scalars(select(Study.status)).one()


# ------------------------------------------------------------- one delivery (finding 2)


@pytest.mark.parametrize("archive", [{"hold": True}], indirect=True)
def test_a_second_delivery_while_one_is_in_flight_does_nothing(
    make_settings, bundle, series, archive
):
    node, report_id = analysed(make_settings, bundle, series, archive.peer)
    outcomes = {}

    def deliver(name):
        outcomes[name] = delivery.deliver_report(node, report_id, OBSERVER)

    first = threading.Thread(target=deliver, args=("first",))
    first.start()
    assert archive.arrived.wait(60), "the first C-STORE never arrived"
    second = threading.Thread(target=deliver, args=("second",))
    second.start()
    second.join(30)
    assert outcomes.get("second") == "sending"  # answered at once, nothing sent
    archive.release()
    first.join(60)
    assert outcomes["first"] == "sent"
    assert archive.received == [report_row(node, report_id).sop_instance_uid]
    assert study_status(node) == "reported"
    node.close()


def test_a_send_whose_worker_died_is_taken_back_after_the_lease(
    make_settings, bundle, series, archive
):
    node, report_id = analysed(
        make_settings, bundle, series, archive.peer, report_lease_seconds=300
    )
    now = utcnow()
    with node.session_factory() as session, session.begin():  # a worker claimed it, then died
        session.execute(
            update(Report)
            .where(Report.id == report_id)
            .values(status="sending", claimed_at=now, created_at=now)
        )
    assert sweeper.due_work(node, now + timedelta(seconds=200)).reports == []
    assert sweeper.due_work(node, now + timedelta(seconds=301)).reports == [report_id]
    assert report_row(node, report_id).status == "retrying"
    assert delivery.deliver_report(node, report_id, OBSERVER) == "sent"
    assert len(archive.received) == 1
    node.close()


# -------------------------------------------------------- the retry window (finding 3)


def test_a_pacs_that_stays_down_is_retried_for_the_window_then_failed(
    make_settings, bundle, series
):
    down = Peer(name="archive", ae_title=ARCHIVE, port=free_port())
    node, report_id = analysed(make_settings, bundle, series, down, report_retry_hours=24)
    for attempt in range(1, 13):  # more than the old limit of 8 retries
        with pytest.raises(delivery.ReportRetry) as info:
            delivery.deliver_report(node, report_id, OBSERVER)
        assert info.value.delay == min(10 * 2 ** (attempt - 1), 3600)  # capped at an hour
        report = report_row(node, report_id)
        assert (report.status, report.retries) == ("retrying", attempt)
    with node.session_factory() as session, session.begin():  # the first failure, 24 h ago
        session.execute(
            update(Report)
            .where(Report.id == report_id)
            .values(failing_since=utcnow() - timedelta(hours=24, seconds=1))
        )
    assert delivery.deliver_report(node, report_id, OBSERVER) == "failed"
    report = report_row(node, report_id)
    assert f"{ARCHIVE}@127.0.0.1" in report.last_error
    assert "gave up after 13 attempts over 24 h" in report.last_error
    assert study_status(node) == "analyzed"
    node.close()


def test_report_max_retries_in_an_old_config_is_accepted_and_ignored(make_settings, caplog):
    settings = make_settings(report_max_retries=8)
    assert settings.report_retry_hours == 72
    assert "report_max_retries is deprecated and ignored" in caplog.text


# --------------------------------------------------- what the PACS answers (finding 7)


@pytest.mark.parametrize(
    ("archive", "outcome"),
    [
        ({"status": 0x0000}, "sent"),
        ({"status": 0xB000}, "sent"),  # a warning: the SR is stored
        ({"status": 0xA900}, "failed"),  # data set does not match the SOP class
        ({"status": 0xC000}, "failed"),  # cannot understand
        ({"status": 0xA700}, "retrying"),  # out of resources
    ],
    indirect=["archive"],
)
def test_the_c_store_status_decides_the_report(make_settings, bundle, series, archive, outcome):
    node, report_id = analysed(make_settings, bundle, series, archive.peer)
    try:
        status = delivery.deliver_report(node, report_id, OBSERVER)
    except delivery.ReportRetry:
        status = "retrying"
    report = report_row(node, report_id)
    assert (status, report.status, len(archive.received)) == (outcome, outcome, 1)
    if outcome != "sent":
        assert f"status 0x{archive.status:04X}" in report.last_error
    node.close()


class _Answer(BaseHTTPRequestHandler):
    code = 500

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = f"answer {self.code}".encode()
        self.send_response(self.code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("code", "transient"),
    [(400, False), (403, False), (409, False), (408, True), (429, True), (500, True), (503, True)],
)
def test_the_stow_http_status_decides_whether_to_retry(series, code, transient):
    handler = type("Answer", (_Answer,), {"code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        headers = [dcmread(path, stop_before_pixels=True) for path in series]
        root = f"http://127.0.0.1:{server.server_port}/dicom-web"
        peer = Peer(name="web", ae_title="WEB", dicomweb_url=root)
        with pytest.raises(SendError) as info:
            send_sr_stow(build_sr(headers, study_result(headers), OBSERVER), peer)
    finally:
        server.shutdown()
        server.server_close()
    assert info.value.transient is transient
    assert f"HTTP {code}" in str(info.value)


# ----------------------------------------- reports that can never be sent (finding 1)


def test_a_report_whose_peer_was_removed_fails_with_the_reason(
    make_settings, bundle, series, archive
):
    node, report_id = analysed(make_settings, bundle, series, archive.peer)
    node.close()
    other = Peer(name="other", ae_title="OTHER", port=free_port())
    renamed = build_node(node.settings.model_copy(update={"peers": [other], "report_peer": None}))
    assert delivery.deliver_report(renamed, report_id, OBSERVER) == "failed"
    report = report_row(renamed, report_id)
    assert report.last_error.startswith("report peer no longer configured: unknown peer 'archive'")
    assert sweeper.due_work(renamed, utcnow() + timedelta(hours=1)).reports == []  # no loop
    assert archive.received == []
    renamed.close()


def test_a_report_whose_sr_cannot_be_built_fails_with_the_reason(
    make_settings, bundle, series, archive
):
    from node.records.db import Analysis, SlicePrediction

    node, report_id = analysed(make_settings, bundle, series, archive.peer)

    def other(values: dict) -> dict:  # a custom model's class without a SNOMED code
        return {("Other" if k == "Pneumonia" else k): v for k, v in values.items()}

    with node.session_factory() as session, session.begin():
        analysis = session.scalars(select(Analysis)).one()
        analysis.probabilities = other(analysis.probabilities) | {"Other": 0.99}
        analysis.predicted_class = "Other"
        for row in session.scalars(select(SlicePrediction)):
            row.probabilities = other(row.probabilities)
    assert delivery.deliver_report(node, report_id, OBSERVER) == "failed"
    report = report_row(node, report_id)
    assert report.last_error.startswith("the SR cannot be built: predicted_class 'Other'")
    assert archive.received == []
    node.close()


# ------------------------------------------- the whole pipeline with Orthanc (finding 7)


def sr_instances(orthanc, study_uid: str) -> list[str]:
    """SOP Instance UIDs of the SRs Orthanc holds in a study (QIDO-RS, Modality=SR)."""
    session = requests.Session()
    session.trust_env = False
    url = f"{orthanc.dicomweb_url}/studies/{study_uid}/series"
    found = []
    for series in session.get(url, params={"Modality": "SR"}, timeout=30).json():
        series_uid = series["0020000E"]["Value"][0]
        for item in session.get(f"{url}/{series_uid}/instances", timeout=30).json():
            found.append(item["00080018"]["Value"][0])
    return found


def test_stow_delivery_through_the_whole_pipeline(make_settings, bundle, series, orthanc):
    node, report_id = analysed(
        make_settings, bundle, series, orthanc_peer(orthanc), report_method="stow"
    )
    assert report_row(node, report_id).method == "stow"
    assert delivery.deliver_report(node, report_id, OBSERVER) == "sent"
    study_uid = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    assert sr_instances(orthanc, study_uid) == [report_row(node, report_id).sop_instance_uid]
    assert study_status(node) == "reported"
    node.close()


def test_reanalyze_gives_a_second_sr_with_a_new_sop_instance_uid(
    make_settings, bundle, series, orthanc, monkeypatch, capsys, tmp_path
):
    from ainode.cli import main
    from tests.config import write_config

    node, first = analysed(make_settings, bundle, series, orthanc_peer(orthanc))
    assert delivery.deliver_report(node, first, OBSERVER) == "sent"
    study_uid = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    monkeypatch.delenv("AINODE_CONFIG", raising=False)
    config = write_config(node.settings, tmp_path / "ainode.toml")
    assert main(["--config", str(config), "reanalyze", study_uid]) == 0
    assert f"study {study_uid} queued for analysis" in capsys.readouterr().out
    with node.session_factory() as session:
        study_id = session.scalars(select(Study.id)).one()
    second = jobs.run_analysis(node, bundle, study_id)
    assert delivery.deliver_report(node, second, OBSERVER) == "sent"
    uids = {report_row(node, first).sop_instance_uid, report_row(node, second).sop_instance_uid}
    assert len(uids) == 2
    assert sorted(sr_instances(orthanc, study_uid)) == sorted(uids)
    assert study_status(node) == "reported"
    node.close()
