"""Upload & classify: PNG, JPEG and DICOM judged by the active model, bad files refused."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import MRImageStorage

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from node import phantom  # noqa: E402
from node.analysis import imaging  # noqa: E402
from node.analysis.bundle import ModelInfo  # noqa: E402
from node.analysis.result import CLASSES  # noqa: E402
from node.records import registry  # noqa: E402
from tests.webui import csrf_token  # noqa: E402

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


def test_page_names_the_active_model_and_marks_the_demo(client):
    page = client.get("/upload")
    assert page.status_code == 200
    assert f"{DEMO.name}:{DEMO.version}" in page.text
    assert "DEMO" in page.text


@pytest.mark.parametrize(
    ("kind", "name"), [("png", "slice.png"), ("jpeg", "slice.jpg"), ("dicom", "IM0001")]
)
def test_upload_is_classified_by_the_active_model_and_not_stored(
    client, web_node, ct_slice, kind, name
):
    data = dicom_bytes(ct_slice) if kind == "dicom" else picture(ct_slice, kind.upper())
    before = files_under(web_node.settings.data_dir)
    answer = post_file(client, "/upload/classify", data, name)
    assert answer.status_code == 200, answer.text
    result = answer.get_json()
    assert (result["kind"], result["file"], result["kept"], result["slices"]) == (
        kind,
        name,
        None,
        1,
    )
    assert result["predicted_class"] in CLASSES
    assert list(result["probabilities"]) == list(CLASSES)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert result["predicted_class"] == max(
        result["probabilities"], key=result["probabilities"].get
    )
    assert result["model"] == {
        "name": DEMO.name,
        "version": DEMO.version,
        "demo": True,
        "label": DEMO.identity().label,
    }
    assert files_under(web_node.settings.data_dir) == before


def test_keep_stores_under_a_generated_name_never_the_clients(client, web_node, ct_slice, tmp_path):
    data = picture(ct_slice, "PNG")
    answer = post_file(client, "/upload/classify", data, "../../etc/passwd", keep="1")
    assert answer.status_code == 200, answer.text
    result = answer.get_json()
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
    ],
)
@pytest.mark.parametrize("url", ["/upload/classify", "/upload/preview"])
def test_bad_files_are_refused_with_a_clear_message(client, web_node, ct_slice, make, message, url):
    before = files_under(web_node.settings.data_dir)
    answer = post_file(client, url, make(ct_slice), "../../etc/passwd", keep="1")
    assert answer.status_code == 400
    assert message in answer.get_json()["error"]
    assert files_under(web_node.settings.data_dir) == before


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
    first = post_file(client, "/upload/classify", data, "a.png").get_json()
    assert first["model"]["name"] == DEMO.name
    folder = registry.bundle_folder(web_node.settings, "covid-ct", "2.0")
    shutil.copytree(registry.BUILTIN_DIR, folder)
    renamed = dataclasses.replace(DEMO, name="covid-ct", version="2.0", demo=False)
    renamed.to_json(folder / "model.json")
    with web_node.session_factory() as db, db.begin():
        registry.activate(web_node.settings, db, "covid-ct:2.0", "ad.min")
    second = post_file(client, "/upload/classify", data, "a.png").get_json()
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
