"""The web UI in a real headless Chromium against a real `ainode serve` (SCP, worker, web):
sign in → the worklist shows a phantom study a worker analysed → open it → scroll slices →
agree → tag COVID → export → upload and classify, with the Content-Security-Policy on (no
script or style is refused). Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from node import phantom
from node.analysis import imaging
from tests.config import write_config
from tests.peers import free_port, storescu, wait_for_port
from tests.test_analysis_e2e import studies

ARTIFACTS = Path(os.environ.get("AINODE_TEST_ARTIFACTS", "test-artifacts")) / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PASSWORD = "browser-pass-123"


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian package chromium is missing (./setup.sh test installs it)"
    return found


@pytest.fixture
def running_node(make_settings, tmp_path):
    """`ainode serve` on the embedded broker (its own worker) with the web UI, a user, and a
    COVID phantom study pushed by DCMTK storescu and analysed."""
    settings = make_settings(web_port=free_port(), study_stable_seconds=2)
    config = write_config(settings, tmp_path / "ainode.toml")
    env = {**os.environ, "E2E_PASSWORD": PASSWORD, "TF_CPP_MIN_LOG_LEVEL": "3"}
    base = [sys.executable, "-m", "ainode.cli", "--config", str(config)]
    subprocess.run(
        [*base, "user", "add", "dr.browser", "--name", "Dr Browser", "--password-env",
         "E2E_PASSWORD"], check=True, env=env, capture_output=True,
    )  # fmt: skip
    log = (tmp_path / "serve.log").open("ab")
    serve = subprocess.Popen([*base, "serve"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        wait_for_port("127.0.0.1", settings.web_port, 60)
        spec = phantom.PhantomSpec(finding="covid", slices=24, seed=22, patient_id="BROWSER22")
        files = phantom.write_series(spec, tmp_path / "phantom")
        storescu("127.0.0.1", settings.dicom_port, files[0].parent, called_ae=settings.ae_title)
        deadline = time.monotonic() + 300
        while not any(s["status"] == "analyzed" for s in studies(config)):
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        yield f"http://127.0.0.1:{settings.web_port}", files, config
    finally:
        serve.terminate()
        serve.wait(60)
        log.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def slice_png(files: list[Path], tmp_path: Path) -> Path:
    """A windowed slice of the phantom saved as PNG, for upload-and-classify."""
    from pydicom import dcmread

    datasets = [dcmread(p) for p in files]
    middle = datasets[imaging.slice_order(datasets)[len(datasets) // 2]]
    pixels = imaging.windowed_slices(middle)[0]
    path = tmp_path / "slice.png"
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def test_a_radiologist_reviews_labels_exports_and_classifies_in_chromium(running_node, tmp_path):
    url, files, config = running_node
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        console: list[str] = []  # Chromium reports each CSP refusal here
        page.on("console", lambda message: console.append(message.text))
        try:
            first_answer = page.goto(url + "/")
            assert "frame-ancestors 'none'" in first_answer.headers["content-security-policy"]
            expect(page).to_have_url(re.compile(r"/login"))
            page.fill("input[name=username]", "dr.browser")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.locator("body")).to_contain_text("Dr Browser")
            expect(page.locator("body")).to_contain_text("Covid_19")  # the worker's answer
            with page.expect_response(re.compile(r"/worklist\.json"), timeout=15_000) as poll:
                pass  # the page refreshes statuses on its own, without a reload
            assert poll.value.ok and poll.value.json()["rows"][0]["status"] == "analyzed"
            shot(page, "1-worklist")

            page.locator("a[href^='/studies/']").first.click()
            expect(page.locator("#result")).to_contain_text("Covid_19")
            expect(page.locator("#result")).to_contain_text("DEMO")
            first = page.locator("#slice-image").get_attribute("src")
            page.locator("#viewport").focus()
            for _ in range(5):
                page.keyboard.press("ArrowDown")
            expect(page.locator("#slice-index")).to_contain_text("Slice 6 /")
            page.locator("#viewport").hover()
            page.mouse.wheel(0, 300)
            expect(page.locator("#slice-image")).not_to_have_attribute("src", first)
            shot(page, "2-study")

            page.click("button[name=verdict][value=agree]")
            expect(page.locator("body")).to_contain_text("dr.browser")
            page.click("form.label-buttons button[value=COVID]")
            expect(page.locator("#labels")).to_contain_text("COVID")
            shot(page, "3-agreed-and-tagged")

            page.goto(url + "/exports")
            page.click("#export-start")
            expect(page.locator("#export-jobs")).to_contain_text("done", timeout=120_000)
            expect(page.locator("#export-jobs a", has_text="Download")).to_be_visible()
            shot(page, "4-export")

            page.goto(url + "/upload")
            upload = slice_png(files, tmp_path)
            page.set_input_files("#upload-file", str(upload))
            expect(page.locator("#upload-figure")).to_be_visible()
            page.click("#upload-recognise")
            expect(page.locator("#upload-answer")).to_be_visible(timeout=60_000)
            expect(page.locator("#upload-model")).to_contain_text("ainode-demo-phantom")
            shot(page, "5-upload")
            expect(page.locator("#upload-class")).to_have_text(cli_class(config, upload))
        finally:
            browser.close()
    assert errors == []  # no script failed on any page
    refused = [text for text in console if "Content Security Policy" in text]
    assert refused == []  # every script and style the pages use is allowed by the policy


def cli_class(config: Path, image: Path) -> str:
    """The class ``ainode classify --json`` gives ``image`` on the same node and model."""
    answer = subprocess.run(
        [sys.executable, "-m", "ainode.cli", "--config", str(config), "classify", "--json",
         str(image)], check=True, capture_output=True, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    return json.loads(answer.stdout)["predicted_class"]
