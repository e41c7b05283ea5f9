"""/healthz and /metrics on a node that received instances, worker heartbeats, JSON logs and
the Grafana dashboard's metric names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from node import phantom
from node.dicom.scp import start_scp
from node.records import lifecycle
from node.records.db import (
    Analysis,
    AnalysisStatus,
    Report,
    ReportStatus,
    Study,
    utcnow,
)
from node.runtime import build_node
from node.settings import Settings
from tests.config import write_config
from tests.peers import echoscu, storescu, tmpfs
from tests.webui import running_worker

ROOT = Path(__file__).resolve().parents[1]
DEMO = json.loads((ROOT / "node" / "models" / "demo" / "model.json").read_text())


def scrape(client) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def wait_for(read, predicate, timeout: float = 30.0, what: str = "state"):
    """``read()`` until ``predicate`` holds for it; the last value in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never came: {value}")
        time.sleep(0.2)


def web_client(node, remote_addr: str = "127.0.0.1"):
    from webui import create_app

    app = create_app(node.settings, {"TESTING": True}, node=node)
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = remote_addr
    return client


def _corrupt_copy(source: Path, target: Path) -> Path:
    """``source`` with its dataset cut in the middle of the pixel data."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) - 1000])
    return target


def test_metrics_count_what_the_scp_received_refused_and_rejected(scp, chest_series, tmp_path):
    _spec, files = chest_series
    result = storescu("127.0.0.1", scp.settings.dicom_port, files[:3])
    assert result.returncode == 0, result.stdout + result.stderr
    # a dataset cut short: refused 0xC210, the association carries on
    from pynetdicom import _config

    bad = _corrupt_copy(files[3], tmp_path / "cut.dcm")
    sent_chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the bytes as they are
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
        assert assoc.is_established
        assert assoc.send_c_store(bad).Status == 0xC210
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = sent_chunked
    # a calling AE the node does not know, twice
    for _ in range(2):
        refused = echoscu("127.0.0.1", scp.settings.dicom_port, calling_ae="INTRUDER")
        assert refused.returncode != 0
    with scp.session_factory() as session:
        lifecycle.mark_stable(session, 0.001, now=utcnow() + timedelta(seconds=1))
        study = session.scalars(select(Study)).one()
        started = utcnow() - timedelta(minutes=5)
        analysis = Analysis(
            study_id=study.id,
            model_name=DEMO["name"],
            model_version=DEMO["version"],
            status=AnalysisStatus.DONE,
            started_at=started,
            finished_at=started + timedelta(seconds=42),
        )
        session.add(analysis)
        session.flush()
        session.add(
            Report(
                analysis_id=analysis.id,
                sop_instance_uid="1.2.3.4.5",
                series_instance_uid="1.2.3.4",
                destination="pacs",
                method="dimse",
                status=ReportStatus.SENT,
                opened_at=started + timedelta(seconds=42),
                created_at=started + timedelta(seconds=42),
                sent_at=started + timedelta(seconds=49),
            )
        )
        session.commit()

    client = web_client(scp)
    refused_key = ("ainode_instances_refused_total", (("reason", "cannot_understand"),))
    rejected_key = ("ainode_associations_rejected_total", (("reason", "calling_ae"),))
    metrics = wait_for(
        lambda: scrape(client),
        lambda m: m.get(refused_key) == 1 and m.get(rejected_key) == 2,
        what="the SCP's counts in /metrics",
    )
    assert metrics[("ainode_instances_received_total", ())] == 3
    assert metrics[("ainode_instances_refused_total", (("reason", "out_of_resources"),))] == 0
    assert metrics[("ainode_associations_rejected_total", (("reason", "disk_low"),))] == 0
    assert metrics[("ainode_scp_listening", ())] == 1
    assert metrics[("ainode_associations_open", ())] == 0
    assert metrics[("ainode_studies", (("status", "stable"),))] == 1
    assert metrics[("ainode_studies", (("status", "receiving"),))] == 0
    assert metrics[("ainode_queue_depth", (("queue", "analysis"),))] == 0
    info = (
        ("demo", "true"),
        ("name", DEMO["name"]),
        ("usable", "true"),
        ("version", DEMO["version"]),
    )
    assert metrics[("ainode_model_info", info)] == 1
    bucket = "ainode_analysis_duration_seconds_bucket"
    assert metrics[(bucket, (("le", "30.0"),))] == 0
    assert metrics[(bucket, (("le", "60.0"),))] == 1
    assert metrics[("ainode_analysis_duration_seconds_sum", ())] == 42
    assert metrics[("ainode_report_send_seconds_bucket", (("le", "5.0"),))] == 0
    assert metrics[("ainode_report_send_seconds_bucket", (("le", "10.0"),))] == 1


def test_an_open_association_shows_until_it_is_released(scp):
    client = web_client(scp)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
    assert assoc.is_established
    try:
        wait_for(lambda: scrape(client)[("ainode_associations_open", ())], lambda v: v == 1)
    finally:
        assoc.release()
    wait_for(lambda: scrape(client)[("ainode_associations_open", ())], lambda v: v == 0)


def _health(client) -> tuple[int, dict]:
    answer = client.get("/healthz")
    return answer.status_code, answer.get_json()


def _failed(health: tuple[int, dict]) -> set[str]:
    return {name for name, check in health[1]["checks"].items() if check["status"] != "ok"}


def test_healthz_names_each_failed_check(make_settings, tmp_path):
    with tmpfs(tmp_path / "store", "size=1m") as store:
        settings = make_settings(
            store_url=store.as_uri(), worker_heartbeat_seconds=1, health_worker_silence_seconds=6
        )
        node = build_node(settings, migrate=True)
        server = start_scp(settings, node.ingestor)
        client = web_client(node)
        try:
            # the SCP reports listening within a watchdog pass; no worker has beaten yet
            status, body = health = wait_for(
                lambda: _health(client), lambda h: "scp" not in _failed(h), 10, "the SCP"
            )
            assert status == 503
            assert _failed(health) == {"model"}
            assert body["checks"]["model"]["detail"] == "no worker has beaten in the last 6 s"

            with running_worker(settings, tmp_path / "worker"):
                status, body = wait_for(
                    lambda: _health(client), lambda h: h[0] == 200, 120, "a healthy node"
                )
                assert body["status"] == "ok"
                assert set(body["checks"]) == {
                    "database",
                    "broker",
                    "store",
                    "disk",
                    "model",
                    "scp",
                }
                model = f"{DEMO['name']}:{DEMO['version']}"
                assert f"serves {model}" in body["checks"]["model"]["detail"]
                seen = [
                    dict(labels)
                    for (name, labels), _value in scrape(client).items()
                    if name == "ainode_worker_last_seen_timestamp_seconds"
                ]
                assert [(w["model"], w["queues"]) for w in seen] == [
                    (model, "analysis,exports,reports,uploads")
                ]

                subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
                status, body = health = _health(client)
                assert status == 503
                assert _failed(health) == {"store"}
                assert "Read-only file system" in body["checks"]["store"]["detail"]
                subprocess.run(["mount", "-o", "remount,rw", str(store)], check=True)

                server.shutdown()
                status, body = health = _health(client)
                assert status == 503
                assert _failed(health) == {"scp"}
                assert "stopped" in body["checks"]["scp"]["detail"]
            # the worker is gone: no heartbeat within health_worker_silence_seconds
            status, body = wait_for(
                lambda: _health(client), lambda h: "model" in _failed(h), 30, "a silent worker"
            )
            assert body["checks"]["model"]["detail"] == "no worker has beaten in the last 6 s"
        finally:
            server.shutdown()
            node.close()


@pytest.mark.parametrize(
    ("allowed", "address", "expected"),
    [
        (None, "127.0.0.1", 200),
        (None, "::1", 200),
        (None, "10.1.2.3", 403),
        (["10.0.0.0/8"], "10.1.2.3", 200),
        (["10.0.0.0/8"], "127.0.0.1", 403),
        (["192.0.2.7"], "::ffff:192.0.2.7", 200),
    ],
)
@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_only_allowed_addresses_reach_health_and_metrics(
    make_settings, path, allowed, address, expected
):
    overrides = {} if allowed is None else {"metrics_allowed_addresses": allowed}
    node = build_node(make_settings(**overrides), migrate=True)
    try:
        answer = web_client(node, address).get(path)
    finally:
        node.close()
    if expected == 403:
        assert answer.status_code == 403
        assert "only served to the addresses the node allows" in answer.text
    else:
        assert answer.status_code in (200, 503)  # served (the node's health is another test)


def test_metrics_allowed_addresses_must_be_addresses_or_networks():
    with pytest.raises(ValidationError, match="metrics_allowed_addresses"):
        Settings(metrics_allowed_addresses=["localhost"])


def test_json_logs_carry_study_keys_and_no_patient_data(make_settings, tmp_path):
    spec = phantom.PhantomSpec(
        finding="normal", slices=2, seed=3, patient_name="Doe^Janet", patient_id="PID-47110"
    )
    files = phantom.write_series(spec, tmp_path / "study")
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    settings = make_settings(log_format="json", study_stable_seconds=1)
    config = write_config(settings, tmp_path / "ainode.toml")
    log_path = tmp_path / "scp.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ainode.cli", "--config", str(config), "scp"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(log_path.read_text, lambda text: "storage SCP" in text, 60, "the SCP")
        result = storescu("127.0.0.1", settings.dicom_port, files)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(log_path.read_text, lambda text: "receiving -> stable" in text, 30, "stable")
    finally:
        process.terminate()
        process.wait(30)
    text = log_path.read_text()
    assert "Doe" not in text and "Janet" not in text and "PID-47110" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    stable = [line for line in lines if "receiving -> stable" in line["message"]]
    assert len(stable) == 1
    assert stable[0]["study_instance_uid"] == study_uid
    assert isinstance(stable[0]["study_id"], int)
    assert {"time", "level", "logger", "message"} <= set(stable[0])
    assert stable[0]["level"] == "INFO" and stable[0]["logger"] == "node.records.lifecycle"


def test_the_dashboard_queries_only_metrics_the_node_exposes(node):
    dashboard = json.loads((ROOT / "docker" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bainode_\w+", target["expr"])
    }
    exposed = {name for name, _labels in scrape(web_client(node))}
    # what only Redis or a worker adds is absent here: they are the node's names all the same
    exposed |= {"ainode_broker_queue_messages", "ainode_worker_last_seen_timestamp_seconds"}
    assert queried, "the dashboard queries nothing"
    assert queried <= exposed, f"not exposed: {sorted(queried - exposed)}"
    panels = {panel["title"] for panel in dashboard["panels"]}
    assert {"Instances refused by reason", "Studies by status", "Queue depth"} <= panels


def test_compose_runs_prometheus_on_the_web_service_and_grafana_with_the_dashboard():
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    section = re.search(r"^services:\n(.*?)(?=^\S)", compose, flags=re.M | re.S).group(1)
    services = {
        block.split(":", 1)[0]: block for block in re.split(r"^  (?=\w)", section, flags=re.M)
    }
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml" in services["prometheus"]
    assert "./grafana-dashboard.json:" in services["grafana"]
    prometheus_ip = re.search(r"ipv4_address: ([\d.]+)", services["prometheus"]).group(1)
    allowed = re.search(r"AINODE_METRICS_ALLOWED_ADDRESSES: '(.*)'", services["web"]).group(1)
    assert prometheus_ip in json.loads(allowed)
    scrape_config = (ROOT / "docker" / "prometheus.yml").read_text()
    assert re.search(r"metrics_path: /metrics", scrape_config)
    assert '"web:8080"' in scrape_config
