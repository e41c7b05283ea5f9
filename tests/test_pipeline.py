"""The analysis pipeline in process: skips, compressed studies, idempotency, the sweeper."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from node import phantom
from node.analysis import imaging
from node.analysis.bundle import ModelBundle
from node.records.db import Analysis, Report, Study, utcnow
from node.settings import DEMO_MODEL_DIR
from node.workflow import jobs as pipeline
from node.workflow import sweeper

DEMO = DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.load(DEMO)


def ingest_files(node, files) -> int:
    for path in files:
        node.ingestor.ingest_part10(Path(path).read_bytes(), "TESTSCU")
    with node.session_factory() as session:
        return session.scalars(select(Study.id)).one()


def stable(node, study_id, queued: bool = True) -> None:
    """Move a study on as the sweeper would: receiving -> stable (-> queued)."""
    from node.records import lifecycle
    from node.records.db import StudyStatus

    with node.session_factory() as session, session.begin():
        assert lifecycle.move_where(session, study_id, {StudyStatus.RECEIVING}, StudyStatus.STABLE)
        if queued:
            assert lifecycle.move_where(session, study_id, {StudyStatus.STABLE}, StudyStatus.QUEUED)


def odd_instances(folder: Path, source: Path) -> list[Path]:
    """A localizer, a pixel-less CT and an SR-class object in the same study/series."""
    folder.mkdir()
    made = []
    for name, change in {
        "localizer": lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        "no-pixels": lambda ds: delattr(ds, "PixelData"),
        "sr": lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.88.33"),
    }.items():
        ds = dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if name == "sr":
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
        change(ds)
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made.append(path)
    return made


def test_localizer_pixelless_and_non_ct_are_skipped_with_a_reason(node, bundle, tmp_path):
    spec = phantom.PhantomSpec(finding="covid", slices=16, seed=31)
    files = phantom.write_series(spec, tmp_path / "study")
    extra = odd_instances(tmp_path / "odd", files[8])
    study_id = ingest_files(node, files + extra)
    stable(node, study_id)
    pipeline.run_analysis(node, bundle, study_id)
    with node.session_factory() as session:
        analysis = session.scalars(select(Analysis)).one()
        assert analysis.status == "done"
        reasons = sorted(analysis.instances_skipped.values())
        assert analysis.predicted_class == "Covid_19"
    assert len(reasons) == 3
    assert any("localizer" in r for r in reasons)
    assert any("no pixel data" in r for r in reasons)
    assert any("not a CT image" in r for r in reasons)


@pytest.mark.parametrize("syntax", ["jpeg-lossless", "jpeg2000"])
def test_compressed_study_is_analysed_like_the_uncompressed_one(bundle, tmp_path, syntax):
    from node.analysis.analyze import analyze_instances

    spec = phantom.PhantomSpec(finding="pneumonia", slices=40, seed=32)
    plain = analyze_instances(phantom.write_series(spec, tmp_path / "plain"), bundle)
    packed = analyze_instances(
        phantom.write_series(spec, tmp_path / syntax, transfer_syntax=syntax), bundle
    )
    # Lossless compression must not change a single probability: same pixels, same answer.
    assert packed.result.predicted_class == plain.result.predicted_class
    np.testing.assert_allclose(packed.result.probabilities, plain.result.probabilities, atol=1e-5)


def test_a_repeated_message_does_nothing(node, bundle, tmp_path):
    files = phantom.write_series(phantom.PhantomSpec(slices=12, seed=33), tmp_path / "s")
    study_id = ingest_files(node, files)
    stable(node, study_id)
    pipeline.run_analysis(node, bundle, study_id)
    assert pipeline.run_analysis(node, bundle, study_id) is None
    with node.session_factory() as session:
        assert len(session.scalars(select(Analysis)).all()) == 1
        assert session.get(Study, study_id).status == "analyzed"


def test_study_without_lungs_fails_with_its_reason(node, bundle, tmp_path):
    spec = phantom.PhantomSpec(finding="normal", slices=40, seed=34)
    files = phantom.write_series(spec, tmp_path / "s")
    hu = phantom.generate_hu_volume(spec)
    lungless = [f for f, v in zip(files, hu, strict=True) if imaging.lung_fraction(v) < 0.01]
    assert lungless, "the phantom's lowest slices are abdominal"
    study_id = ingest_files(node, lungless)
    stable(node, study_id)
    pipeline.run_analysis(node, bundle, study_id)
    with node.session_factory() as session:
        study = session.get(Study, study_id)
        assert study.status == "failed"
        assert "shows lungs" in study.status_reason


def test_sweeper_queues_stable_studies_and_recovers_lost_work(make_settings, tmp_path):
    from node.runtime import build_node

    settings = make_settings(requeue_after_seconds=60, analysis_timeout_seconds=600)
    node = build_node(settings, migrate=True)
    files = phantom.write_series(phantom.PhantomSpec(slices=2, seed=35), tmp_path / "s")
    study_id = ingest_files(node, files)
    stable(node, study_id, queued=False)
    now = utcnow()
    assert sweeper.due_work(node, now).analyses == [study_id]  # stable -> queued
    assert sweeper.due_work(node, now + timedelta(seconds=30)).analyses == []
    assert sweeper.due_work(node, now + timedelta(seconds=61)).analyses == [study_id]  # lost
    with node.session_factory() as session, session.begin():
        session.get(Study, study_id).status = "analyzing"
        session.add(Analysis(study_id=study_id, model_name="m", model_version="1"))
    later = now + timedelta(seconds=61 + 601)
    assert sweeper.due_work(node, later).analyses == [study_id]  # the worker died
    with node.session_factory() as session:
        assert session.get(Study, study_id).status == "queued"
        assert session.scalars(select(Analysis.status)).one() == "abandoned"
        assert session.scalars(select(Report)).all() == []
    node.close()


def test_classify_command_on_png_and_dicom_folder(tmp_path, capsys):
    from ainode.cli import main

    spec = phantom.PhantomSpec(finding="covid", slices=30, seed=36)
    files = phantom.write_series(spec, tmp_path / "series")
    hu = phantom.generate_hu_volume(spec)
    png = tmp_path / "slice.png"
    png.write_bytes(imaging.to_png_bytes(imaging.apply_window(hu[20], imaging.LUNG)))
    assert main(["classify", str(png)]) == 0
    out = capsys.readouterr().out
    assert "DEMO" in out and "result: Covid_19" in out
    assert main(["classify", str(tmp_path / "series")]) == 0
    assert "result: Covid_19" in capsys.readouterr().out
    assert files


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not an image at all", "not a valid PNG or JPEG file"), (None, "no such file")],
)
def test_classify_explains_bad_input(tmp_path, capsys, content, message):
    from ainode.cli import main

    path = tmp_path / "upload.png"
    if content is not None:
        path.write_bytes(content)
    assert main(["classify", str(path)]) == 2
    assert message in capsys.readouterr().err
