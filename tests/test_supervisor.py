"""The supervisor of `ainode serve`'s workers, on real child processes; the Celery app's
configuration holds none of the node's secrets."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from ainode.supervisor import Supervisor, _Child, exit_description
from node.settings import Peer, Settings
from node.workflow.queue import make_celery


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ainode.supervisor"]


def test_a_dying_worker_is_restarted_and_one_that_keeps_dying_is_named(caplog):
    caplog.set_level(logging.INFO, logger="ainode.supervisor")
    dying = [sys.executable, "-c", "import sys; sys.exit(3)"]
    supervisor = Supervisor({"reports": dying}, first_delay=0.05, max_delay=0.1, burst=2).start()
    try:
        wait_for(lambda: any("keeps dying" in m for m in messages(caplog)), 30, "the warning")
    finally:
        supervisor.stop()
    found = messages(caplog)
    assert found[0].startswith("worker reports started (pid ")
    assert any("ended unexpectedly (exit code 3); restarting it in" in m for m in found)
    assert any(m.startswith("worker reports restarted (pid ") for m in found)
    warning = next(m for m in found if "keeps dying" in m)
    assert warning.startswith("worker reports keeps dying: 3 times in the last 10 minutes")


def test_the_back_off_doubles_while_a_worker_keeps_dying_and_resets_after_the_window():
    now = [1000.0]
    supervisor = Supervisor({}, first_delay=1, max_delay=60, window=600, clock=lambda: now[0])
    child = _Child("analysis", ["true"])
    delays = []
    for _ in range(8):
        delays.append(supervisor._died(child))
        now[0] += 1
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    now[0] += 600  # ten quiet minutes
    assert supervisor._died(child) == 1


def test_stop_terminates_the_workers_and_kills_one_that_ignores_sigterm(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="ainode.supervisor")
    ready = tmp_path / "ready"
    stubborn = [
        sys.executable,
        "-c",
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(120)",
        str(ready),
    ]
    polite = [sys.executable, "-c", "import time; time.sleep(120)"]
    supervisor = Supervisor({"stubborn": stubborn, "polite": polite}, stop_timeout=2).start()
    wait_for(lambda: all(c.process for c in supervisor.children), 30, "both workers")
    processes = {c.name: c.process for c in supervisor.children}
    wait_for(ready.exists, 30, "the stubborn worker to ignore SIGTERM")
    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 15
    assert processes["polite"].returncode == -15  # SIGTERM
    assert processes["stubborn"].returncode == -9  # SIGKILL after stop_timeout
    assert any("did not stop in time; killing it" in m for m in messages(caplog))
    assert not any("unexpectedly" in m for m in messages(caplog))  # a stop is not a death


def test_exit_descriptions_read_as_a_person_would_say_them():
    assert exit_description(2) == "exit code 2"
    assert exit_description(-9) == "killed by SIGKILL"
    assert exit_description(-15) == "killed by SIGTERM"


def test_the_celery_configuration_holds_no_secret(tmp_path):
    """What `celery inspect conf` shows anyone on the broker: no salt, key, password or peer."""
    settings = Settings(
        data_dir=tmp_path,
        export_salt="export-salt-7f3c9a1e5b",
        web_secret_key="web-secret-key-" + "9" * 32,
        database_url="postgresql+psycopg://ainode:db-password-42@db.example/ainode",
        broker_url="redis://:broker-password-17@127.0.0.1:6379/0",
        peers=[
            Peer(
                name="pacs",
                ae_title="PACS",
                host="pacs.example",
                port=104,
                dicomweb_url="https://pacs.example/dicom-web",
            )
        ],
    )
    conf = make_celery(settings).conf
    everything = repr(conf.table(with_defaults=False, censored=False))
    for secret in (
        "export-salt-7f3c9a1e5b",
        "web-secret-key-",
        "db-password-42",
        "db.example",
        "pacs.example",
    ):
        assert secret not in everything, secret
    assert "ainode_settings" not in everything
    shown = repr(conf.table(with_defaults=True, censored=True))  # `celery inspect conf`
    assert "broker-password-17" not in shown
    assert conf.broker_url == settings.broker_url  # the one thing Celery must know


def test_ainode_worker_refuses_an_unknown_queue(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ainode.cli", "worker", "--queues", "analysis,reprots"],
        capture_output=True,
        text=True,
        env={**os.environ, "AINODE_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "--queues: unknown queue reprots" in result.stderr
