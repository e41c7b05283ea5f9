"""`ainode scp` as a real process: restart mid-study, `ainode studies`, settings errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ainode.cli import main
from tests.config import write_config
from tests.peers import storescu, wait_for_port


def start_serve(config, log_path) -> subprocess.Popen:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "ainode.cli", "--config", str(config), "scp"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def studies_json(config) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "ainode.cli", "--config", str(config), "studies", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def wait_for_status(config, status, timeout=30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = studies_json(config)
        if rows and all(row["status"] == status for row in rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"studies never became {status}: {rows}")


def test_study_becomes_stable_across_a_node_restart(make_settings, chest_series, tmp_path):
    _spec, files = chest_series
    settings = make_settings(study_stable_seconds=3)
    config = write_config(settings, tmp_path / "ainode.toml")
    log = tmp_path / "serve.log"

    node = start_serve(config, log)
    try:
        wait_for_port("127.0.0.1", settings.dicom_port, timeout=30)
        assert storescu("127.0.0.1", settings.dicom_port, files[:30]).returncode == 0
    finally:
        node.send_signal(signal.SIGKILL)  # a crash, not a clean stop
        node.wait(10)
    [row] = studies_json(config)
    assert (row["status"], row["instance_count"]) == ("receiving", 30)

    node = start_serve(config, log)
    try:
        wait_for_port("127.0.0.1", settings.dicom_port, timeout=30)
        assert storescu("127.0.0.1", settings.dicom_port, files[30:]).returncode == 0
        [row] = wait_for_status(config, "stable")
    finally:
        node.terminate()
        node.wait(10)
    assert row["instance_count"] == 60
    assert row["modalities"] == "CT"
    assert row["series_count"] == 1
    assert node.returncode == 0, log.read_text()


def test_study_left_receiving_by_a_crash_becomes_stable_when_the_node_returns(
    make_settings, chest_series, tmp_path
):
    """The quiet period elapsed while the node was down: stable right after start."""
    settings = make_settings(study_stable_seconds=2)
    config = write_config(settings, tmp_path / "ainode.toml")
    node = start_serve(config, tmp_path / "serve.log")
    try:
        wait_for_port("127.0.0.1", settings.dicom_port, timeout=30)
        assert storescu("127.0.0.1", settings.dicom_port, chest_series[1][:3]).returncode == 0
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait(10)
    time.sleep(2.5)
    node = start_serve(config, tmp_path / "serve.log")
    try:
        wait_for_status(config, "stable", timeout=15)
    finally:
        node.terminate()
        node.wait(10)


def test_studies_table_lists_status_counts_and_description(
    make_settings, chest_series, tmp_path, capsys
):
    from node.dicom.scp import start_scp
    from node.runtime import build_node

    settings = make_settings()
    node = build_node(settings, migrate=True)
    server = start_scp(settings, node.ingestor)
    try:
        assert storescu("127.0.0.1", settings.dicom_port, chest_series[1][:4]).returncode == 0
    finally:
        server.shutdown()
        node.close()
    config = write_config(settings, tmp_path / "ainode.toml")
    assert main(["--config", str(config), "studies"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["STATUS", "MOD", "SERIES", "INST"]
    assert out[1].split()[:4] == ["receiving", "CT", "1", "4"]
    assert "Tórax Simple" in out[1]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AINODE_AE_TITLE": "WAY_TOO_LONG_AE_TITLE"}, "invalid setting ae_title"),
        ({"AINODE_DICOM_PORT": "70000"}, "invalid setting dicom_port"),
        ({"AINODE_STORE_URL": "s3://bucket/x"}, "store_url must be a file:// URL"),
        ({"AINODE_NO_SUCH_THING": "1"}, None),  # unknown env vars are ignored, not fatal
    ],
)
def test_bad_settings_give_one_clear_line(tmp_path, env, message):
    full_env = {
        **os.environ,
        "AINODE_DATA_DIR": str(tmp_path / "data"),
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", "ainode.cli", "db", "upgrade"],
        capture_output=True,
        text=True,
        env=full_env,
    )
    if message is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.toml"), "studies"]) == 2
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in capsys.readouterr().err


def test_studies_refuses_an_unmigrated_database(make_settings, tmp_path, capsys):
    config = write_config(make_settings(), tmp_path / "ainode.toml")
    assert main(["--config", str(config), "studies"]) == 2
    assert "run `ainode db upgrade`" in capsys.readouterr().err


def test_ainode_web_serves_the_web_ui_alone_and_stops_on_sigterm(make_settings, tmp_path):
    """`ainode web` is the web UI in its own process: it waits for the schema the node
    migrated, answers on web_port, does not listen for DICOM, and stops cleanly."""
    import urllib.request

    from node.runtime import build_node
    from tests.peers import free_port

    settings = make_settings(web_port=free_port())
    build_node(settings, migrate=True).close()  # as `ainode serve` or `ainode db upgrade` does
    config = write_config(settings, tmp_path / "ainode.toml")
    log = tmp_path / "web.log"
    with log.open("ab") as out:
        web = subprocess.Popen(
            [sys.executable, "-m", "ainode.cli", "--config", str(config), "web"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", settings.web_port, timeout=60)
        url = f"http://127.0.0.1:{settings.web_port}/login"
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"Sign in" in page.read()
        with pytest.raises(OSError):  # the SCP is not in this process
            socket.create_connection(("127.0.0.1", settings.dicom_port), timeout=2).close()
    finally:
        web.send_signal(signal.SIGTERM)
        assert web.wait(30) == 0, log.read_text()


def test_ainode_web_refuses_to_start_with_the_web_ui_turned_off(make_settings, capsys):
    settings = make_settings(web_port=0)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert main(["--config", str(write_config(settings, settings.data_dir / "a.toml")), "web"]) == 2
    assert "web_port is 0" in capsys.readouterr().err


def worker_pids(log_path) -> dict[str, int]:
    """The embedded workers `ainode serve` says it started: {queues: pid}, latest first."""
    found = {}
    for name, pid in re.findall(
        r"worker (\S+) (?:started|restarted) \(pid (\d+)\)", log_path.read_text(errors="replace")
    ):
        found[name] = int(pid)
    return found


def process_gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(condition, timeout: float, what: str, log_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(
        f"timed out waiting for {what}\n" + (log_path.read_text() if log_path else "")
    )


def test_serve_runs_reports_apart_from_analysis_and_its_workers_die_with_it(
    make_settings, tmp_path
):
    """The embedded workers: analysis and exports in one process, reports and uploads in
    another; SIGKILL of `ainode serve` leaves no orphan worker behind."""
    settings = make_settings()
    config = write_config(settings, tmp_path / "ainode.toml")
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "ainode.cli", "--config", str(config), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: log.read_text(errors="replace").count(" ready.") == 2, 120, "workers", log
        )
        pids = worker_pids(log)
        assert set(pids) == {"analysis,exports", "reports,uploads"}, log.read_text()
        for name, pid in pids.items():
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert f"--queues={name}".encode() in command
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)
        wait_until(
            lambda: all(process_gone(pid) for pid in pids.values()), 20, "workers to end", log
        )
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
        for pid in worker_pids(log).values():
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
