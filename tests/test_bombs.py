"""Decoding bombs: a file of a few hundred bytes whose header claims gigabytes of pixels is
refused before anything is decoded (imaging.check_decode_size), and each place that decodes
says so: the analysis skips the instance (or fails the study), the viewer answers 422, an
upload is refused and its job fails, the export leaves the instance out and records why."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from node import phantom  # noqa: E402
from node.analysis import imaging  # noqa: E402
from node.analysis.analyze import AnalysisOptions  # noqa: E402
from node.analysis.imaging import DecodeLimits, ImageTooLarge, ImagingError  # noqa: E402
from node.records import registry  # noqa: E402
from node.records.db import Analysis, Study, UploadJob, UploadStatus  # noqa: E402
from node.records.export import Pseudonymizer, export_bundle, export_salt  # noqa: E402
from node.records.labels import add_label  # noqa: E402
from node.settings import Settings  # noqa: E402
from node.workflow import uploads  # noqa: E402
from tests.webui import csrf_token  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # Keras 3.15 with NumPy 2, inside get_weights()
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

LIMITS = "limits: max_image_side 4096, max_frames 2048, max_decoded_mb 512"
HUGE = "65535×65535 pixels of 16 bits, 8,192 MB decoded"  # 65535² × 2 bytes = 8191.75 MB
SYNTAXES = {
    "native": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg": JPEGBaseline8Bit,
}
# A stream that is not what it claims: an RLE header of one segment, a JPEG start of image.
FRAGMENT = {
    RLELossless: struct.pack("<16I", 1, 64, *[0] * 14) + bytes(16),
    JPEGLSLossless: b"\xff\xd8\xff\xf7" + bytes(16),
    JPEGBaseline8Bit: b"\xff\xd8\xff\xc0" + bytes(16),
}


def bomb(source: Path, out: Path, syntax: str = ExplicitVRLittleEndian, **claims) -> Path:
    """A copy of a phantom slice (same study and series, a new instance) whose header claims
    ``claims`` (default 65535×65535) over a few bytes of pixel data: 1 kB uncompressed (far
    too few), or one encapsulated fragment that is not a real stream."""
    ds = dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows = ds.Columns = 65535
    for keyword, value in claims.items():
        setattr(ds, keyword, value)
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = bytes(1024)
    else:
        ds.PixelData = encapsulate([FRAGMENT[syntax]])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(out, enforce_file_format=True)
    assert out.stat().st_size < 20_000
    return out


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    """A small lung-bearing phantom series (64×64, 12 slices)."""
    spec = phantom.PhantomSpec(finding="covid", slices=12, rows=64, columns=64, seed=41)
    return phantom.write_series(spec, tmp_path_factory.mktemp("bomb-series"))


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True).get(keyword))


# --------------------------------------------------------------------------- the guard


@pytest.mark.parametrize(
    ("claims", "size"),
    [
        ({}, HUGE),
        ({"Rows": 512, "Columns": 512, "NumberOfFrames": 65535}, None),
    ],
    ids=["65535x65535", "65535-frames"],
)
@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=list(SYNTAXES))
def test_the_guard_refuses_a_bomb_without_allocating_it(series, tmp_path, syntax, claims, size):
    """Under a 1 GiB address-space limit, decoding the bomb as it is declared fails
    (pydicom allocates 8 GB up front); the guard answers first, naming the sizes."""
    path = bomb(series[0], tmp_path / "bomb.dcm", SYNTAXES[syntax], **claims)
    child = textwrap.dedent(
        f"""
        import resource, sys
        from pydicom import dcmread
        from node.analysis import imaging
        ds = dcmread({str(path)!r})
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))
        try:
            imaging.hounsfield_frames(ds)
        except BaseException as exc:
            print(type(exc).__name__, exc)
        """
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    # 512 × 512 × 65535 frames × 2 bytes = 32,767.5 MB
    expected = size or "512×512 pixels × 65535 frames of 16 bits, 32,768 MB decoded"
    assert done.stdout.strip() == f"ImageTooLarge image too large to decode: {expected} ({LIMITS})"


def header(rows: int, columns: int, frames: int | None = None, bits: int = 16, samples: int = 1):
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = rows, columns, bits, samples
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


@pytest.mark.parametrize(
    ("ds", "refused"),
    [
        (header(512, 512), None),  # one CT slice: 512 kB
        (header(4096, 4096), None),  # the side limit itself: 32 MB
        (header(2048, 2048, 64), None),  # 2048² × 64 × 2 bytes = 512 MB, the limit itself
        (header(4097, 512), "512×4097 pixels of 16 bits, 4.0 MB decoded"),  # side
        # 256² × 2049 × 2 bytes = 256.1 MB: under 512 MB, over 2048 frames
        (header(256, 256, 2049), "256×256 pixels × 2049 frames of 16 bits, 256 MB decoded"),
        # 2048² × 65 × 2 bytes = 520 MB: every side and the frames within their limits
        (header(2048, 2048, 65), "2048×2048 pixels × 65 frames of 16 bits, 520 MB decoded"),
        # 2048² × 33 × 4 bytes = 528 MB: Bits Allocated counts
        (header(2048, 2048, 33, 32), "2048×2048 pixels × 33 frames of 32 bits, 528 MB decoded"),
        # 4096² × 12 × 3 samples × 1 byte = 576 MB
        (
            header(4096, 4096, 12, 8, 3),
            "4096×4096 pixels × 12 frames × 3 samples of 8 bits, 576 MB decoded",
        ),
    ],
    ids=["ct", "side", "bytes-limit", "tall", "frames", "bytes", "32-bits", "samples"],
)
def test_the_limits_by_hand(ds, refused):
    if refused is None:
        imaging.check_decode_size(ds)
        return
    with pytest.raises(ImageTooLarge) as raised:
        imaging.check_decode_size(ds)
    assert str(raised.value) == f"image too large to decode: {refused} ({LIMITS})"
    assert (raised.value.size, raised.value.limits) == (refused, LIMITS)


def test_other_limits_are_named_and_bad_frame_counts_refused():
    limits = DecodeLimits(max_image_side=64, max_frames=4, max_decoded_mb=1)
    with pytest.raises(ImageTooLarge, match=r"^image too large to decode: 64×128 pixels of 16 "):
        imaging.check_decode_size(header(128, 64), limits)
    with pytest.raises(ImageTooLarge, match=r"16 KB decoded \(limits: max_image_side 64, "):
        imaging.check_decode_size(header(128, 64), limits)  # 128 × 64 × 2 = 16 KB
    imaging.check_decode_size(header(64, 64, 4), limits)
    with pytest.raises(ImagingError, match="Number of Frames -3 is not valid"):
        imaging.check_decode_size(header(64, 64, -3))


def test_the_settings_set_the_limits(monkeypatch):
    assert AnalysisOptions.from_settings(Settings()).limits == imaging.DEFAULT_LIMITS
    monkeypatch.setenv("AINODE_MAX_IMAGE_SIDE", "1024")
    monkeypatch.setenv("AINODE_MAX_FRAMES", "300")
    monkeypatch.setenv("AINODE_MAX_DECODED_MB", "64")
    assert AnalysisOptions.from_settings(Settings()).limits == DecodeLimits(1024, 300, 64)


# --------------------------------------------------------------------------- the analysis


@pytest.fixture(scope="module")
def bundle():
    from node.analysis.bundle import ModelBundle
    from node.settings import DEMO_MODEL_DIR

    return ModelBundle.load(DEMO_MODEL_DIR)


def queued_study(node, files) -> int:
    from node.records import lifecycle
    from node.records.db import StudyStatus

    for path in files:
        node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    with node.session_factory() as session, session.begin():
        study_id = session.scalars(select(Study.id)).one()
        assert lifecycle.move_where(session, study_id, {StudyStatus.RECEIVING}, StudyStatus.STABLE)
        assert lifecycle.move_where(session, study_id, {StudyStatus.STABLE}, StudyStatus.QUEUED)
    return study_id


def test_the_analysis_skips_a_bomb_in_the_series_and_says_why(node, bundle, series, tmp_path):
    from node.workflow import jobs

    planted = bomb(series[5], tmp_path / "bomb.dcm")
    study_id = queued_study(node, [*series, planted])
    jobs.run_analysis(node, bundle, study_id)
    with node.session_factory() as session:
        analysis = session.scalars(select(Analysis)).one()
        assert analysis.status == "done", analysis.error
        assert analysis.instances_skipped == {
            uid_of(planted): f"image too large to decode: {HUGE} ({LIMITS})"
        }
        assert analysis.slices_evaluated > 0
        assert session.get(Study, study_id).status == "analyzed"


def test_a_study_of_nothing_but_images_too_large_fails_with_the_reason(
    make_settings, bundle, series
):
    """The settings reach the worker: 64×64 slices are too large for a 32-pixel side."""
    from node.runtime import build_node
    from node.workflow import jobs

    node = build_node(make_settings(max_image_side=32), migrate=True)
    try:
        study_id = queued_study(node, series[:3])
        jobs.run_analysis(node, bundle, study_id)
        with node.session_factory() as session:
            study = session.get(Study, study_id)
            assert study.status == "failed"
            # 64 × 64 × 2 bytes = 8 KB
            reason = (
                "image too large to decode: 64×64 pixels of 16 bits, 8 KB decoded "
                "(limits: max_image_side 32, max_frames 2048, max_decoded_mb 512)"
            )
            assert study.status_reason == f"no axial CT image to analyse (3 × {reason})"
    finally:
        node.close()


# --------------------------------------------------------------------------- the viewer


def test_the_viewer_answers_422_for_a_bomb_and_shows_the_other_slices(
    client, web_node, series, tmp_path
):
    """The web UI shares the receiver's process: the slice is refused, not decoded."""
    ds = dcmread(series[0], stop_before_pixels=True)
    top = max(float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in series)
    position = [*ds.ImagePositionPatient[:2], top + 5]  # above the head: slice 0
    planted = bomb(series[0], tmp_path / "bomb.dcm", ImagePositionPatient=position)
    for path in [*series, planted]:
        web_node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    with web_node.session_factory() as session:
        study_id = session.scalars(select(Study.id)).one()

    answer = client.get(f"/studies/{study_id}/slices/0.png")
    assert answer.status_code == 422
    assert f"Slice 0 of study {study_id} cannot be shown: image too large to decode: " in (
        answer.text
    )
    assert HUGE in answer.text
    shown = client.get(f"/studies/{study_id}/slices/1.png")
    assert shown.status_code == 200 and shown.mimetype == "image/png"


def test_the_viewer_lists_a_bomb_of_many_frames_once(client, web_node, series, tmp_path):
    """A header claiming 100,000 frames (or two billion) is one entry in the slice list, not
    one per frame: listing it would otherwise be the bomb."""
    planted = bomb(series[0], tmp_path / "bomb.dcm", Rows=512, Columns=512, NumberOfFrames=100_000)
    for path in [*series, planted]:
        web_node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    with web_node.session_factory() as session:
        study_id = session.scalars(select(Study.id)).one()
    count = len(series) + 1
    beyond = client.get(f"/studies/{study_id}/slices/{count}.png")
    assert beyond.status_code == 404
    assert f"has no slice {count} ({count} slices to show)" in beyond.text
    answers = [client.get(f"/studies/{study_id}/slices/{n}.png") for n in range(count)]
    refused = [answer for answer in answers if answer.status_code != 200]
    assert [answer.status_code for answer in refused] == [422]
    # 512 × 512 × 100,000 frames × 2 bytes = 50,000 MB
    assert "512×512 pixels × 100000 frames of 16 bits, 50,000 MB decoded" in refused[0].text


# --------------------------------------------------------------------------- uploads


def rle_bomb_bytes(series: list[Path], tmp_path: Path) -> bytes:
    """8192×8192 RLE: 128 MB declared, within the upload's old 8192² pixel cap."""
    return bomb(
        series[4], tmp_path / "upload.dcm", RLELossless, Rows=8192, Columns=8192
    ).read_bytes()


UPLOAD_REFUSAL = (
    "The DICOM image is 8192×8192 pixels of 16 bits, 128 MB decoded: too large to classify "
    f"({LIMITS})."
)


@pytest.mark.parametrize("url", ["/upload/classify", "/upload/preview"])
def test_an_upload_claiming_too_many_pixels_is_refused_undecoded(
    client, web_node, series, tmp_path, url
):
    data = rle_bomb_bytes(series, tmp_path)
    token = csrf_token(client.get("/upload").text)
    answer = client.post(
        url,
        data={"file": (io.BytesIO(data), "bomb.dcm")},
        headers={"X-CSRFToken": token},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 400
    assert answer.get_json() == {"error": UPLOAD_REFUSAL}
    with web_node.session_factory() as session:
        assert session.scalars(select(UploadJob)).all() == []


def test_an_upload_job_holding_a_bomb_fails_with_the_reason(web_node, series, tmp_path):
    """A job whose file got past the page (another web process, other limits) is failed by
    the worker with the reason, and its bytes removed."""
    data = rle_bomb_bytes(series, tmp_path)
    with web_node.session_factory() as session:
        job = uploads.submit(
            session,
            web_node.settings,
            data,
            kind="dicom",
            suffix=".dcm",
            file_name="bomb.dcm",
            requested_by="dr.rad",
            keep=True,
        )
        session.commit()
        job_id, pending = job.id, Path(job.pending)
    active = registry.ActiveBundle(web_node.settings)

    def bundle():
        with web_node.session_factory() as db:
            return active.current(db)

    assert uploads.classify_upload_job(web_node, bundle, job_id) == UploadStatus.FAILED
    with web_node.session_factory() as session:
        job = session.get(UploadJob, job_id)
        assert (job.status, job.error, job.kept) == (UploadStatus.FAILED, UPLOAD_REFUSAL, None)
    assert not pending.exists()


# --------------------------------------------------------------------------- the export


def test_the_export_leaves_a_bomb_out_and_records_why(node, series, tmp_path, caplog):
    planted = bomb(series[5], tmp_path / "bomb.dcm")
    for path in [*series, planted]:
        node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    study_uid = uid_of(series[0], "StudyInstanceUID")
    with node.session_factory() as session, session.begin():
        add_label(session, study_uid, "COVID", "dr.house")
    caplog.set_level(logging.WARNING, logger="node.records.export")

    summary = export_bundle(node, tmp_path / "bundle")
    keys = Pseudonymizer(export_salt(node.settings))
    reason = f"image too large to decode: {HUGE} ({LIMITS})"
    entry = {"study": keys.key(study_uid), "instance": keys.key(uid_of(planted)), "reason": reason}
    assert summary.skipped == [] and summary.studies["Covid_19"] == 1
    assert summary.skipped_instances == [entry]
    assert summary.images["Covid_19"] == len(list((tmp_path / "bundle").rglob("*.png"))) > 0
    info = json.loads((tmp_path / "bundle" / "export.json").read_text(encoding="utf-8"))
    assert info["skipped_instances"] == [entry]
    assert any(
        r.getMessage()
        == f"export: instance {entry['instance']} of study {entry['study']} left out: {reason}"
        for r in caplog.records
    )


def test_an_export_of_a_bomb_alone_skips_the_study_and_names_the_instance(node, series, tmp_path):
    planted = bomb(series[5], tmp_path / "bomb.dcm")
    node.ingestor.ingest_part10(planted.read_bytes(), "TESTSCU")
    study_uid = uid_of(planted, "StudyInstanceUID")
    with node.session_factory() as session, session.begin():
        add_label(session, study_uid, "COVID", "dr.house")
    summary = export_bundle(node, tmp_path / "bundle")
    keys = Pseudonymizer(export_salt(node.settings))
    assert summary.skipped == [{"study": keys.key(study_uid), "reason": "no usable CT series"}]
    assert [item["instance"] for item in summary.skipped_instances] == [keys.key(uid_of(planted))]
    assert sum(summary.images.values()) == 0
