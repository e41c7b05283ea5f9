"""The web UI in a real headless Chromium against a real `ainode serve` (SCP, worker, web):
sign in → the worklist shows a phantom study a worker analysed → open it → scroll slices →
agree → tag COVID → export → upload and classify, with the Content-Security-Policy on (no
script or style is refused). Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 900):
    """A page in headless Chromium; on leaving: no script failed on any page, and the
    Content-Security-Policy refused nothing (Chromium reports each refusal on the console)."""
    errors: list[str] = []
    console: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: console.append(message.text))
        try:
            yield page
        finally:
            browser.close()
    assert errors == []
    assert [text for text in console if "Content Security Policy" in text] == []


def sign_in(page, url: str, username: str, password: str = PASSWORD, go: bool = True) -> None:
    """Sign in on the login page (``go``: open it first)."""
    if go:
        page.goto(url + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


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
    with chromium_page(width=1400, height=900) as page:
        first_answer = page.goto(url + "/")
        assert "frame-ancestors 'none'" in first_answer.headers["content-security-policy"]
        expect(page).to_have_url(re.compile(r"/login"))
        sign_in(page, url, "dr.browser", go=False)
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


def cli_class(config: Path, image: Path) -> str:
    """The class ``ainode classify --json`` gives ``image`` on the same node and model."""
    answer = subprocess.run(
        [sys.executable, "-m", "ainode.cli", "--config", str(config), "classify", "--json",
         str(image)], check=True, capture_output=True, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    return json.loads(answer.stdout)["predicted_class"]


def test_an_admin_tests_edited_routing_rules_on_a_stored_study_in_chromium(running_node):
    """Issue 15: the routing tester on the analysed phantom study, with a rule added and
    moved first in the browser (the page's script), evaluated before anything is saved."""
    from pydicom import dcmread

    url, files, config = running_node
    env = {**os.environ, "E2E_PASSWORD": PASSWORD, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run(
        [sys.executable, "-m", "ainode.cli", "--config", str(config), "user", "add",
         "dr.rules", "--role", "admin", "--name", "Dr Rules", "--password-env", "E2E_PASSWORD"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with chromium_page(width=1600, height=900) as page:
        sign_in(page, url, "dr.rules")
        page.goto(url + "/admin/routing")
        study_rows = page.locator("#study-rules tbody tr")
        blank = study_rows.last
        blank.locator("input[aria-label=Name]").fill("Chest CT")
        blank.locator("select[aria-label=Action]").select_option("analyze")
        blank.locator("input[aria-label='Study description']").fill("TÓRAX simple")
        blank.locator("button.move[data-move='-1']").click()  # above the default rule
        expect(study_rows.first.locator("input[aria-label=Name]")).to_have_value("Chest CT")
        page.locator("select[name=recent]").select_option(index=1)
        page.click("#test-rules")
        expect(page.locator("#tester-study-rule")).to_contain_text(
            "Study rule Chest CT matches: the study is analysed"
        )
        expect(page.locator("#tester-series")).to_contain_text(series_uid)
        expect(page.locator("#tester-series")).to_contain_text("Largest axial CT series")
        shot(page, "6-routing-tester")
        page.goto(url + "/admin/routing")  # nothing was saved
        names = page.locator("#study-rules input[aria-label=Name]")
        expect(names.first).to_have_value("Analyse every study")
        expect(names).to_have_count(2)  # the default rule and the blank row


def test_a_radiologist_suspends_resumes_and_retries_a_failed_study_on_the_dashboard(
    running_node, tmp_path
):
    """Issue 15: the queue dashboard's counts (refreshed in place) and its actions, on a study
    that fails (a localizer-only series: nothing axial to analyse) beside the analysed one."""
    import tomllib

    from pydicom import dcmread

    url, _files, config = running_node
    spec = phantom.PhantomSpec(slices=2, rows=64, columns=64, seed=23, patient_id="BROWSER23")
    scouts = phantom.write_series(spec, tmp_path / "scout")
    for path in scouts:
        scout = dcmread(path)
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.save_as(path)
    written = tomllib.loads(config.read_text(encoding="utf-8"))
    storescu("127.0.0.1", written["dicom_port"], scouts[0].parent, called_ae=written["ae_title"])
    deadline = time.monotonic() + 120
    while not any(s["status"] == "failed" for s in studies(config)):
        assert time.monotonic() < deadline, studies(config)
        time.sleep(1)
    with chromium_page(width=1400, height=900) as page:
        sign_in(page, url, "dr.browser")
        page.click("nav a:has-text('Queue')")
        expect(page.locator("#count-analyzed")).to_have_text("1")
        expect(page.locator("#count-failed")).to_have_text("1")
        failed = page.locator("#failed tbody tr").first
        expect(failed).to_contain_text("no axial CT image to analyse")
        expect(page.locator("button", has_text="Discard")).to_have_count(0)  # admins only
        shot(page, "7-dashboard")

        failed.locator("button", has_text="Suspend").click()
        expect(page.locator("p[role=alert]")).to_contain_text("is suspended (it was failed)")
        expect(page.locator("#count-suspended")).to_have_text("1")
        page.locator("#suspended tbody tr").first.locator("button", has_text="Resume").click()
        expect(page.locator("p[role=alert]")).to_contain_text("is resumed: failed")
        page.locator("#failed tbody tr").first.locator("button", has_text="Retry").click()
        expect(page.locator("p[role=alert]")).to_contain_text("is queued for analysis again")
        # the worker tries again and fails again: the counts follow without a reload
        with page.expect_response(re.compile(r"/dashboard\.json"), timeout=15_000) as poll:
            pass
        assert poll.value.ok
        for status in ("queued", "analyzing"):
            expect(page.locator(f"#count-{status}")).to_have_text("0", timeout=60_000)
        expect(page.locator("#count-failed")).to_have_text("1")
        page.reload()
        expect(page.locator("#failed tbody tr").first.locator("td.num")).to_have_text("2")
        shot(page, "8-dashboard-retried")


def test_the_heatmap_overlay_of_key_slices_is_toggled_and_faded_in_chromium(running_node, tmp_path):
    """Issue 16: the study page marks the key slices; jumping to one shows its Grad-CAM map
    (served by the heatmap route) over the slice; the opacity slider fades it, the toggle hides
    it; the upload page lays the worker's map over an uploaded slice; no script error, no CSP
    refusal."""
    url, files, _config = running_node
    with chromium_page(width=1400, height=900) as page:
        sign_in(page, url, "dr.browser")
        page.locator("a[href^='/studies/']").first.click()
        keys = page.locator("button.key-slice")
        expect(keys).to_have_count(3)
        with page.expect_response(re.compile(r"/heatmaps/\d+\.png")) as served:
            keys.first.click()
        assert served.value.ok and served.value.headers["content-type"] == "image/png"
        overlay = page.locator("#heatmap-image")
        expect(overlay).to_be_visible()
        expect(keys.first).to_have_class(re.compile(r"\bcurrent\b"))
        n = int(keys.first.get_attribute("data-n"))
        expect(page.locator("#slice-index")).to_contain_text(f"Slice {n + 1} /")
        page.wait_for_function("document.getElementById('heatmap-image').naturalWidth > 0")
        assert overlay.evaluate("e => getComputedStyle(e).opacity") == "0.5"
        page.locator("#heatmap-opacity").fill("80")
        assert overlay.evaluate("e => getComputedStyle(e).opacity") == "0.8"
        shot(page, "6-heatmap")
        page.uncheck("#heatmap-toggle")
        expect(overlay).to_be_hidden()
        page.check("#heatmap-toggle")
        expect(overlay).to_be_visible()
        page.locator("#viewport").focus()
        page.keyboard.press("Home")  # a slice that is not a key slice has no map
        if n != 0 and 0 not in [int(k.get_attribute("data-n")) for k in keys.all()]:
            expect(overlay).to_be_hidden()
            expect(page.locator("#heatmap-note")).to_contain_text("only key slices")

        page.goto(url + "/upload")
        page.set_input_files("#upload-file", str(slice_png(files, tmp_path)))
        page.click("#upload-recognise")
        expect(page.locator("#upload-answer")).to_be_visible(timeout=60_000)
        expect(page.locator("#upload-heatmap")).to_be_visible()
        page.locator("#upload-heatmap-opacity").fill("30")
        upload_overlay = page.locator("#upload-heatmap")
        assert upload_overlay.evaluate("e => getComputedStyle(e).opacity") == "0.3"
        page.uncheck("#upload-heatmap-toggle")
        expect(upload_overlay).to_be_hidden()
        shot(page, "7-upload-heatmap")
