"""The first ten minutes: `ainode serve --demo` on a fresh data folder shows phantom studies
go from C-STORE to SR with no PACS at hand; `ainode demo` runs again against it; a node with
no web UI account says how to make the first one (console only), or makes it."""

from __future__ import annotations

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

from node.records.db import Report, Study, User, make_engine, make_session_factory
from node.records.users import authenticate
from tests.config import write_config
from tests.peers import free_port, start_orthanc, wait_for_port

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
HINT = "no web UI account yet"


def ainode(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ainode.cli", "--config", str(config), *args]


class Serve:
    """`ainode serve …` in the background, its console (stdout) and log (stderr) in files."""

    def __init__(self, config: Path, folder: Path, *args: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "console.txt", folder / "log.txt"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                ainode(config, "serve", *args), stdout=out, stderr=err, env=ENV
            )

    def console(self) -> str:
        return self.out.read_text(encoding="utf-8", errors="replace")

    def log(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.console())) is None:
            assert self.process.poll() is None, self.console() + self.log()[-3000:]
            assert time.monotonic() < deadline, self.console() + self.log()[-3000:]
            time.sleep(0.5)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)


def review_in_chromium(url: str, password: str) -> None:
    """Sign in as the generated admin; the worklist holds the demo's four studies, each
    analysed and reported; a COVID study's page shows its answer, its sent SR and, on its
    first key slice, where the model looked. Screenshots go to test-artifacts/demo/ (the
    README's come from here)."""
    from playwright.sync_api import expect

    from tests.test_webui_browser import chromium_page, sign_in

    shots = Path(os.environ.get("AINODE_TEST_ARTIFACTS", "test-artifacts")) / "demo"
    shots.mkdir(parents=True, exist_ok=True)
    with chromium_page(width=1280, height=720) as page:
        sign_in(page, url, "admin", password)
        rows = page.locator("a[href^='/studies/']")
        expect(rows).to_have_count(4)
        body = page.locator("body")
        for answer in ("Covid_19", "Pneumonia", "Normal", "reported"):
            expect(body).to_contain_text(answer)
        page.screenshot(path=str(shots / "worklist.png"))
        page.locator("a[href^='/studies/']", has_text="COVID").last.click()  # 40 slices
        expect(page.locator("#result")).to_contain_text("Covid_19")
        expect(body).to_contain_text("ainode-demo")  # the SR's destination
        page.locator("button.key-slice").first.click()
        expect(page.locator("#heatmap-image")).to_be_visible()
        page.wait_for_function(
            "() => [document.querySelector('#slice-image'), "
            "document.querySelector('#heatmap-image')].every(i => i.complete && i.naturalWidth)"
        )
        page.screenshot(path=str(shots / "study.png"))


def sessions(settings):
    return make_session_factory(make_engine(settings.resolved_database_url))


def test_serve_demo_on_a_fresh_folder_reports_every_phantom_and_runs_again(make_settings, tmp_path):
    # a laptop's first run: no account, no PACS, no allowed calling AE
    settings = make_settings(web_port=free_port(), demo_port=free_port(), allowed_calling_aes=[])
    config = write_config(settings, tmp_path / "ainode.toml")
    serve = Serve(config, tmp_path / "serve", "--demo")
    try:
        end = serve.wait_for(r"demo (finished|INCOMPLETE)[^\n]*\n", 420).group(0)
        console = serve.console()
        # what the person sees: a generated admin password, once, on the console only
        password = re.search(r"account created: admin \(admin\), password (\S+)", console)[1]
        assert console.count(password) == 1 and password not in serve.log()
        assert HINT not in console
        expected = {"COVID": "Covid_19", "PNEUMONIA": "Pneumonia", "NORMAL": "Normal"}
        for name, answer in expected.items():
            line = re.search(rf"DEMO\^{name} +{answer} [01]\.\d\d +\(as expected[^\n]*", console)
            assert line and f"http://127.0.0.1:{settings.web_port}/studies/" in line[0], console
        assert end.startswith("demo finished: 3/3 studies analysed (3 as the phantom's finding)")
        assert f"3 SRs received (in {settings.data_dir / 'demo-srs'})" in end
        assert f"Review them at http://127.0.0.1:{settings.web_port}/" in end

        # the same demo again, from a second terminal: new studies, reported too
        again = subprocess.run(
            ainode(config, "demo", "--studies", "1", "--slices", "16", "--no-progress"),
            capture_output=True, text=True, env=ENV, timeout=300,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert "demo finished: 1/1 studies analysed" in again.stdout

        # …and signs in with the printed password to review a result (the README's pictures)
        review_in_chromium(f"http://127.0.0.1:{settings.web_port}", password)
    finally:
        serve.stop()
    assert serve.process.returncode == 0

    with sessions(settings)() as session:
        studies = session.scalars(select(Study)).all()
        assert len(studies) == 4 and {s.status for s in studies} == {"reported"}
        reports = session.scalars(select(Report)).all()
        assert {(r.status, r.destination) for r in reports} == {("sent", "ainode-demo")}
        assert authenticate(session, "admin", password).role == "admin"
    srs = [dcmread(p) for p in sorted((settings.data_dir / "demo-srs").glob("*.dcm"))]
    assert sorted(sr.StudyInstanceUID for sr in srs) == sorted(
        s.study_instance_uid for s in studies
    )
    assert {sr.Modality for sr in srs} == {"SR"}
    # nothing left running: the demo's process ended, and its stand-in PACS port is free
    assert subprocess.run(["pgrep", "-f", "--", f"--config {config} demo"]).returncode == 1
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", settings.demo_port, 0.5)


def test_the_demo_reports_to_the_sites_pacs_and_finds_its_srs_there(make_settings, tmp_path):
    node_ae_port = free_port()
    pacs = start_orthanc(
        tmp_path / "orthanc", modalities={"AINODE": ("AINODE", "127.0.0.1", node_ae_port)}
    )
    try:
        from tests.conftest import orthanc_peer

        settings = make_settings(
            dicom_port=node_ae_port, web_port=0, demo_port=free_port(), peers=[orthanc_peer(pacs)]
        )
        config = write_config(settings, tmp_path / "ainode.toml")
        serve = Serve(config, tmp_path / "serve", "--demo")
        try:
            end = serve.wait_for(r"demo (finished|INCOMPLETE)[^\n]*\n", 420).group(0)
            assert "SRs → pacs" in serve.console()
            assert end.startswith("demo finished: 3/3") and "3 SRs found at pacs" in end
            wrong = subprocess.run(
                ainode(config, "demo", "--pacs", "ainode-demo"),
                capture_output=True, text=True, env=ENV,
            )  # fmt: skip
            assert wrong.returncode == 2
            assert "--pacs ainode-demo: the node sends its SRs to pacs" in wrong.stderr
            again = subprocess.run(
                ainode(config, "demo", "--pacs", "pacs", "--studies", "1", "--slices", "16"),
                capture_output=True, text=True, env=ENV, timeout=300,
            )  # fmt: skip
            assert again.returncode == 0, again.stdout + again.stderr
            assert "1 SR found at pacs" in again.stdout
        finally:
            serve.stop()
        srs = [
            pacs.get(f"/series/{s}")
            for s in pacs.get("/series")
            if pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality") == "SR"
        ]
        assert len(srs) == 4
    finally:
        pacs.stop(kill=True)


def test_the_first_account_hint_appears_exactly_when_there_is_no_account(make_settings, tmp_path):
    settings = make_settings(web_port=0)
    config = write_config(settings, tmp_path / "ainode.toml")

    def start(name: str, *args: str) -> Serve:
        serve = Serve(config, tmp_path / name, "--no-worker", *args)
        try:
            serve.wait_for(r"ainode \S+: AE ", 60)
            wait_for_port("127.0.0.1", settings.dicom_port, 60)
        finally:
            serve.stop()
        return serve

    first = start("first")
    assert first.console().count(HINT) == 1 and HINT not in first.log()
    assert f"--config {config} user add NAME --role admin" in first.console()

    made = start("bootstrap", "--bootstrap-admin", "chief")
    password = re.search(r"account created: chief \(admin\), password (\S+)", made.console())[1]
    assert password not in made.log() and HINT not in made.console()
    with sessions(settings)() as session:
        assert authenticate(session, "chief", password) is not None

    again = start("again", "--bootstrap-admin", "chief")  # made already: said once, then
    assert "password" not in again.console() and HINT not in again.console()
    other = start("other", "--bootstrap-admin", "deputy")
    assert "--bootstrap-admin deputy: web UI accounts exist; none created" in other.console()
    with sessions(settings)() as session:
        assert session.scalars(select(User.username)).all() == ["chief"]
    assert HINT not in start("with-account").console()


def test_the_demo_says_how_to_start_a_node_that_accepts_it(make_settings, tmp_path):
    settings = make_settings(web_port=0, demo_port=free_port())
    config = write_config(settings, tmp_path / "ainode.toml")
    demo = ainode(config, "demo", "--studies", "1", "--slices", "8", "--no-progress")

    nobody = subprocess.run(demo, capture_output=True, text=True, env=ENV)
    assert nobody.returncode == 2
    assert f"no node answers at AINODE@127.0.0.1:{settings.dicom_port}" in nobody.stderr
    assert "start it first with `ainode serve --demo`" in nobody.stderr

    serve = Serve(config, tmp_path / "serve", "--no-worker")  # not --demo
    try:
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        refused = subprocess.run(demo, capture_output=True, text=True, env=ENV)
    finally:
        serve.stop()
    assert refused.returncode == 2
    assert "rejected AE AINODE_DEMO: start it with `ainode serve --demo`" in refused.stderr
    assert "Traceback" not in refused.stderr
