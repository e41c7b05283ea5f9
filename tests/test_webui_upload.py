"""Upload & classify: PNG, JPEG and DICOM judged by the active model, bad files refused."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import time
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import MRImageStorage
from sqlalchemy import select

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ainode.cli import main  # noqa: E402
from node import phantom  # noqa: E402
from node.analysis import imaging  # noqa: E402
from node.analysis.bundle import (
    BundleError,  # noqa: E402
    ModelInfo,  # noqa: E402
)
from node.analysis.classify import MAX_PIXELS  # noqa: E402
from node.analysis.result import CLASSES  # noqa: E402
from node.records import registry  # noqa: E402
from node.records.db import AuditEvent, UploadJob, UploadStatus, utcnow  # noqa: E402
from node.workflow import uploads  # noqa: E402
from node.workflow.sweeper import due_work  # noqa: E402
from tests.config import write_config  # noqa: E402
from tests.webui import csrf_token, running_worker, sign_in  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings(  # Keras 3.15 with NumPy 2, inside get_weights()
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning"),
]
DEMO = ModelInfo.from_json(registry.BUILTIN_DIR / "model.json")


@pytest.fixture(scope="module")
def ct_slice(tmp_path_factory) -> Path:
    """One lung-bearing slice of a COVID phantom, as a DICOM Part 10 file."""
    spec = phantom.PhantomSpec(finding="covid", slices=3, rows=128, columns=128, seed=3)
    return phantom.write_series(spec, tmp_path_factory.mktemp("upload-ct"))[1]


def windowed(ct_slice: Path, window: imaging.Window) -> np.ndarray:
    return imaging.windowed_slices(dcmread(ct_slice), window)[0]


def picture(ct_slice: Path, kind: str) -> bytes:
    """The slice windowed as the node windows it, saved as PNG or JPEG."""
    pixels = windowed(ct_slice, imaging.LUNG)
    out = io.BytesIO()
    Image.fromarray(pixels).convert("RGB" if kind == "JPEG" else "L").save(out, kind)
    return out.getvalue()


def dicom_bytes(ct_slice: Path, change=None) -> bytes:
    ds = dcmread(ct_slice)
    if change is not None:
        change(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims ``width`` × ``height`` gray pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(bytes(width + 1))  # one row; a decoder would inflate them all
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _huge(ds):
    ds.Rows = ds.Columns = 16384  # Pixel Data left as it is: never decoded


TOO_LARGE = f"too large to classify (at most {MAX_PIXELS:,} pixels are accepted)"
DICOM_TOO_LARGE = (  # 16384² × 2 bytes = 512 MB; the side is over the limit
    "16384×16384 pixels of 16 bits, 512 MB decoded: too large to classify "
    "(limits: max_image_side 4096, max_frames 2048, max_decoded_mb 512)"
)


def post_file(client, url: str, data: bytes, name: str = "slice", **fields):
    token = csrf_token(client.get("/upload").text)
    return client.post(
        url,
        data={"file": (io.BytesIO(data), name), **fields},
        headers={"X-CSRFToken": token},
        content_type="multipart/form-data",
    )


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def classified(client, node, answer) -> dict:
    """What the page is shown once a worker has answered a 202: the workers' own function
    (:func:`node.workflow.uploads.classify_upload_job`) runs here on the queued job; the
    Celery transport in between is tested with a worker process below."""
    assert answer.status_code == 202, answer.text
    queued = answer.get_json()
    assert queued["status"] == "queued" and "notice" not in queued
    assert client.get(queued["status_url"]).get_json()["status"] == "queued"
    active = registry.ActiveBundle(node.settings)

    def bundle():
        with node.session_factory() as db:
            return active.current(db)

    uploads.classify_upload_job(node, bundle, queued["id"])
    return client.get(queued["status_url"]).get_json()


def test_page_names_the_active_model_and_marks_the_demo(client):
    page = client.get("/upload")
    assert page.status_code == 200
    assert f"{DEMO.name}:{DEMO.version}" in page.text
    assert "DEMO" in page.text


def cli_answer(settings, path: Path, tmp_path: Path, capsys) -> dict:
    """What ``ainode classify --json`` says of ``path`` on the same node (same model)."""
    config = write_config(settings, tmp_path / "cli.toml")
    capsys.readouterr()
    assert main(["--config", str(config), "classify", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("kind", "name"), [("png", "slice.png"), ("jpeg", "slice.jpg"), ("dicom", "IM0001")]
)
def test_upload_is_classified_by_the_active_model_and_not_stored(
    client, web_node, ct_slice, kind, name, tmp_path, capsys
):
    data = dicom_bytes(ct_slice) if kind == "dicom" else picture(ct_slice, kind.upper())
    client.environ_base["REMOTE_ADDR"] = "192.0.2.55"
    answer = post_file(client, "/upload/classify", data, name)
    result = classified(client, web_node, answer)
    assert result["status"] == "done"
    assert (result["kind"], result["file"], result["kept"], result["slices"]) == (
        kind,
        name,
        None,
        1,
    )
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / name).write_bytes(data)
    cli = cli_answer(web_node.settings, tmp_path / "cli" / name, tmp_path, capsys)
    assert result["predicted_class"] == cli["predicted_class"]  # the same answer as the CLI
    assert list(result["probabilities"]) == list(cli["probabilities"]) == list(CLASSES)
    for class_name, probability in cli["probabilities"].items():
        assert result["probabilities"][class_name] == pytest.approx(probability, abs=1e-5)
    assert cli["model"] == result["model"]["label"]
    with web_node.session_factory() as db:
        events = db.scalars(select(AuditEvent).where(AuditEvent.action == "upload")).all()
    assert [(e.username, e.client_address, e.detail) for e in events] == [
        (
            "dr.rad",
            "192.0.2.55",
            {"job": answer.get_json()["id"], "file": name, "kind": kind, "keep": False},
        )
    ]
    assert result["model"] == {
        "name": DEMO.name,
        "version": DEMO.version,
        "demo": True,
        "label": DEMO.identity().label,
    }
    assert files_under(web_node.settings.data_dir / "uploads") == set()  # answered: gone


def test_keep_stores_under_a_generated_name_never_the_clients(client, web_node, ct_slice, tmp_path):
    data = picture(ct_slice, "PNG")
    answer = post_file(client, "/upload/classify", data, "../../etc/passwd", keep="1")
    result = classified(client, web_node, answer)
    assert result["file"] == "passwd"  # shown only
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{16}\.png", result["kept"])
    kept = web_node.settings.data_dir / "uploads" / result["kept"]
    assert kept.read_bytes() == data
    assert oct(kept.stat().st_mode & 0o777) == "0o600"
    assert files_under(web_node.settings.data_dir / "uploads") == {result["kept"]}
    assert not any(p.name == "passwd" for p in tmp_path.rglob("*"))


def test_dicom_preview_is_the_slice_windowed_as_the_node_windows_it(client, web_node, ct_slice):
    answer = post_file(client, "/upload/preview", dicom_bytes(ct_slice), "IM0001")
    assert answer.status_code == 200, answer.text
    assert answer.mimetype == "image/png"
    settings = web_node.settings
    expected = windowed(ct_slice, imaging.Window(settings.window_center, settings.window_width))
    with Image.open(io.BytesIO(answer.data)) as shown:
        np.testing.assert_array_equal(np.asarray(shown), expected)


def _no_pixels(ds):
    del ds.PixelData


def _mr(ds):
    ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda ct: b"", "The file is empty.", id="empty"),
        pytest.param(lambda ct: b"root:x:0:0:root:/root\n", "This is not an image", id="text"),
        pytest.param(lambda ct: b"GIF89a" + bytes(200), "This is not an image", id="gif"),
        pytest.param(
            lambda ct: dicom_bytes(ct)[:-4000],
            "The DICOM pixel data cannot be read",
            id="truncated",
        ),
        pytest.param(
            lambda ct: bytes(128) + b"DICM" + b"\xff" * 300,
            "The DICOM file cannot be read",
            id="garbage-dicom",
        ),
        pytest.param(
            lambda ct: dicom_bytes(ct, _no_pixels),
            "The DICOM file has no pixel data",
            id="no-pixels",
        ),
        pytest.param(
            lambda ct: dicom_bytes(ct, _mr),
            "not a CT slice that can be classified: not a CT image (MR)",
            id="mr",
        ),
        pytest.param(
            lambda ct: picture(ct, "PNG")[:60],
            "The image data is damaged: image file is truncated.",
            id="truncated-png",
        ),
        pytest.param(
            lambda ct: b"\x89PNG\r\n\x1a\n" + bytes(40),
            "not a valid PNG or JPEG file",
            id="bad-png",
        ),
        pytest.param(
            lambda ct: png_claiming(40000, 40000),
            f"The image claims more than 178,956,970 pixels: {TOO_LARGE}",
            id="png-bomb",
        ),
        pytest.param(
            lambda ct: png_claiming(9000, 9000),
            f"The image is 9000×9000 pixels: {TOO_LARGE}",
            id="png-over-the-limit",
        ),
        pytest.param(
            lambda ct: dicom_bytes(ct, _huge),
            f"The DICOM image is {DICOM_TOO_LARGE}.",
            id="dicom-bomb",
        ),
    ],
)
@pytest.mark.parametrize("url", ["/upload/classify", "/upload/preview"])
def test_bad_files_are_refused_with_a_clear_message(client, web_node, ct_slice, make, message, url):
    before = files_under(web_node.settings.data_dir)
    answer = post_file(client, url, make(ct_slice), "../../etc/passwd", keep="1")
    assert answer.status_code == 400
    assert message in answer.get_json()["error"]
    assert files_under(web_node.settings.data_dir) == before


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_a_decompression_bomb_is_refused_by_the_cli_and_the_upload(
    client, web_node, ct_slice, tmp_path, monkeypatch, capsys, kind
):
    """``ainode classify`` and the upload share one reader: neither decodes the bomb."""
    from ainode.cli import main

    if kind == "png":
        data, message = png_claiming(40000, 40000), "The image claims more than"
        path, too_large = tmp_path / "bomb.png", TOO_LARGE
    else:
        data, message = dicom_bytes(ct_slice, _huge), "The DICOM image is 16384×16384 pixels"
        path, too_large = tmp_path / "series" / "IM0001", DICOM_TOO_LARGE
        path.parent.mkdir()
    assert len(data) < 200_000
    path.write_bytes(data)

    answer = post_file(client, "/upload/classify", data, path.name)
    assert answer.status_code == 400
    assert answer.get_json()["error"].startswith(message)
    assert too_large in answer.get_json()["error"]

    monkeypatch.setenv("AINODE_DATA_DIR", str(web_node.settings.data_dir))
    capsys.readouterr()
    assert main(["classify", str(path if kind == "png" else path.parent)]) == 2
    err = capsys.readouterr().err
    assert f"ainode: {path}: {message}" in err
    assert too_large in err


def test_no_file_field_is_refused(client):
    token = csrf_token(client.get("/upload").text)
    answer = client.post("/upload/classify", data={}, headers={"X-CSRFToken": token})
    assert answer.status_code == 400
    assert answer.get_json()["error"].startswith("No file was sent")


def test_oversized_upload_is_a_json_413(app, client, ct_slice):
    app.config["MAX_CONTENT_LENGTH"] = 4096
    answer = post_file(client, "/upload/classify", dicom_bytes(ct_slice), "IM0001")
    assert answer.status_code == 413
    assert answer.get_json()["error"] == "The file is too large: at most 4 KB may be uploaded."


def test_upload_without_csrf_token_is_refused(client, ct_slice):
    answer = client.post(
        "/upload/classify",
        data={"file": (io.BytesIO(picture(ct_slice, "PNG")), "slice.png")},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 400
    assert "CSRF" in answer.get_json()["error"]


def test_a_newly_activated_model_answers_the_next_upload(client, web_node, ct_slice):
    data = picture(ct_slice, "PNG")
    first = classified(client, web_node, post_file(client, "/upload/classify", data, "a.png"))
    assert first["model"]["name"] == DEMO.name
    folder = registry.bundle_folder(web_node.settings, "covid-ct", "2.0")
    shutil.copytree(registry.BUILTIN_DIR, folder)
    renamed = DEMO.replace(name="covid-ct", version="2.0", demo=False)
    renamed.to_json(folder / "model.json")
    with web_node.session_factory() as db, db.begin():
        registry.activate(web_node.settings, db, "covid-ct:2.0", "ad.min")
    second = classified(client, web_node, post_file(client, "/upload/classify", data, "a.png"))
    assert (second["model"]["name"], second["model"]["version"]) == ("covid-ct", "2.0")
    assert second["model"]["demo"] is False
    assert "covid-ct:2.0" in client.get("/upload").text


def test_anonymous_is_sent_to_sign_in(anonymous):
    assert anonymous.get("/upload").headers["Location"].startswith("/login")
    token = csrf_token(anonymous.get("/login").text)
    for url in ("/upload/classify", "/upload/preview"):
        answer = anonymous.post(url, data={}, headers={"X-CSRFToken": token})
        assert answer.status_code == 302
        assert answer.headers["Location"].startswith("/login")


def test_a_worker_process_answers_the_upload_the_page_polls(
    client, web_node, ct_slice, tmp_path, capsys
):
    """The whole path: the web UI queues the file, a real ``ainode worker`` process (the
    only one holding the model) classifies it, the page's status URL gives the answer."""
    with running_worker(web_node.settings, tmp_path / "worker"):
        answer = post_file(client, "/upload/classify", dicom_bytes(ct_slice), "IM0001")
        assert answer.status_code == 202, answer.text
        url = answer.get_json()["status_url"]
        deadline = time.monotonic() + 120
        while (result := client.get(url).get_json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, result
            time.sleep(0.2)
    assert result["status"] == "done", result
    cli = cli_answer(web_node.settings, ct_slice, tmp_path, capsys)
    assert (result["predicted_class"], result["model"]["label"]) == (
        cli["predicted_class"],
        cli["model"],
    )
    assert result["probabilities"] == pytest.approx(cli["probabilities"], abs=1e-5)
    assert files_under(web_node.settings.data_dir / "uploads") == set()


def test_an_upload_is_shown_only_to_who_sent_it(app, client, web_node, ct_slice):
    answer = post_file(client, "/upload/classify", picture(ct_slice, "PNG"), "mine.png")
    url = answer.get_json()["status_url"]
    other = sign_in(app.test_client(), "admin")
    assert other.get(url).status_code == 404
    assert client.get(url).status_code == 200


def test_a_model_that_cannot_be_loaded_fails_the_upload_with_the_reason(client, web_node, ct_slice):
    answer = post_file(client, "/upload/classify", picture(ct_slice, "PNG"), "a.png")
    job_id = answer.get_json()["id"]

    def broken():
        raise BundleError("model.keras: cannot be read")

    assert uploads.classify_upload_job(web_node, broken, job_id) == "failed"
    result = client.get(answer.get_json()["status_url"]).get_json()
    assert result == {
        "id": job_id,
        "file": "a.png",
        "kind": "png",
        "status": "failed",
        "error": "The active model cannot be loaded: model.keras: cannot be read",
    }
    assert files_under(web_node.settings.data_dir / "uploads") == set()


def test_an_upload_whose_worker_died_is_failed_and_its_bytes_removed(client, web_node, ct_slice):
    answer = post_file(client, "/upload/classify", picture(ct_slice, "PNG"), "a.png")
    job_id = answer.get_json()["id"]
    with web_node.session_factory() as db, db.begin():
        db.get(UploadJob, job_id).status = UploadStatus.RUNNING  # claimed by a worker...
    later = utcnow() + timedelta(seconds=web_node.settings.analysis_timeout_seconds + 1)
    due_work(web_node, later)  # ...that never answered
    result = client.get(answer.get_json()["status_url"]).get_json()
    assert result["status"] == "failed" and result["error"].startswith("interrupted")
    assert files_under(web_node.settings.data_dir / "uploads") == set()
