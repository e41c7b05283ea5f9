"""The out-of-distribution warning: fitted on the demo model's phantoms, it separates them from
photographs and noise, rarely warns on new phantoms, agrees across runtimes, and shows in the
worklist, the study page and the SR; a flagged study's SR can be held."""

from __future__ import annotations

import copy
import functools
import html
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from bench.ood import auroc, noise_and_blank, photographs, render
from node import phantom
from node.analysis import ood
from node.analysis.bundle import INFO_FILE, MODEL_FILE, ModelBundle, ModelInfo
from node.analysis.result import CLASSES, ModelIdentity, SliceResult, StudyResult
from node.records.db import Analysis, Report
from node.settings import DEMO_MODEL_DIR, Peer
from node.workflow import jobs
from tests.peers import free_port
from tests.test_pipeline import ingest_files, stable
from training.ood import FALSE_ALARM_RATE, fit_statistics, summary_entry


@functools.cache
def chest_header():
    """The header of a phantom chest CT (7.5 mm slices, 360 mm field of view)."""
    return phantom.generate_series(phantom.PhantomSpec(slices=40))[0]


@pytest.fixture(scope="module")
def phantoms():
    """Lung slices of demo training seeds (statistics), new seeds 3000+ (threshold, the
    validation split's role) and 2000+ (the test split), rendered as the demo renders them."""
    return {
        "train": render(range(1000, 1054, 9), stride=3),
        "val": render(range(3000, 3002)),
        "test": render(range(2000, 2002)),
    }


@pytest.fixture(scope="module")
def fitted(phantoms, tmp_path_factory, format1_bundle_dir) -> Path:
    """The demo model with OOD statistics fitted here on the phantoms (format 2)."""
    folder = tmp_path_factory.mktemp("ood-bundle")
    for name in (MODEL_FILE, INFO_FILE):
        shutil.copy2(format1_bundle_dir / name, folder / name)
    keras = ModelBundle.load(folder, runtime="keras")
    train, val = phantoms["train"], phantoms["val"]
    arrays, figures = fit_statistics(
        keras.predict_with_features(train[0])[1],
        train[1],
        keras.predict_with_features(val[0])[1],
        train[0],
        val[0],
        len(CLASSES),
    )
    np.savez_compressed(folder / "ood.npz", **arrays)
    entry = summary_entry(folder / "ood.npz", figures, FALSE_ALARM_RATE)
    keras.info.replace(format_version=2, ood=entry).to_json(folder / INFO_FILE)
    return folder


@pytest.fixture(scope="module")
def bundle(fitted) -> ModelBundle:
    return ModelBundle.load(fitted, runtime="keras")


def distances(bundle: ModelBundle, images: np.ndarray) -> np.ndarray:
    statistics = bundle.ood_statistics
    features = bundle.predict_with_features(images)[1]
    return ood.slice_distances(statistics.means, statistics.precision, features)


def test_the_score_separates_phantoms_from_photographs_and_noise(bundle, phantoms):
    inside = distances(bundle, phantoms["test"][0])
    for name, images in {"photographs": photographs(), "noise": noise_and_blank()}.items():
        outside = distances(bundle, images)
        assert auroc(inside, outside) >= 0.99, name
        assert (outside > bundle.ood_statistics.threshold).mean() >= 0.9, name


def test_new_phantom_studies_are_rarely_flagged(bundle, phantoms):
    images, _, studies, _ = phantoms["test"]
    scores = distances(bundle, images)
    # the threshold is the 99 % quantile of a few hundred validation slices: a new patient's
    # slices may exceed it a little more often, but no new study is flagged
    assert (scores > bundle.ood_statistics.threshold).mean() <= 5 * FALSE_ALARM_RATE
    header = chest_header()
    for study in dict.fromkeys(studies):
        rows = studies == study
        features = bundle.predict_with_features(images[rows])[1]
        assessed = ood.assess(bundle, features, [header], images[rows])
        assert not assessed["flagged"], (study, assessed["reasons"])
        assert assessed["score"] <= assessed["threshold"]


def test_keras_and_onnx_give_the_same_features_and_score(fitted, bundle, phantoms):
    onnx = ModelBundle.load(fitted, runtime="onnx")
    images = np.concatenate([phantoms["test"][0][:6], photographs()[:3]])
    probabilities, features = bundle.predict_with_features(images)
    onnx_probabilities, onnx_features = onnx.predict_with_features(images)
    assert np.allclose(probabilities, onnx_probabilities, atol=1e-4)
    assert np.allclose(features, onnx_features, atol=1e-3 * np.abs(features).max())
    statistics = bundle.ood_statistics
    scores = [
        ood.slice_distances(statistics.means, statistics.precision, f)
        for f in (features, onnx_features)
    ]
    assert np.allclose(*scores, rtol=1e-3)


def test_an_onnx_file_of_the_one_output_export_is_exported_again(fitted, tmp_path):
    import onnx

    folder = tmp_path / "bundle"
    shutil.copytree(fitted, folder)
    ModelBundle.load(folder, runtime="onnx")  # cached from the fixture's copy, or exported
    proto = onnx.load_model(folder / "model.onnx")
    del proto.graph.output[1:]  # what the old export cached: probabilities only, no marker
    kept = [p for p in proto.metadata_props if p.key != "ainode.export"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save_model(proto, folder / "model.onnx")
    probabilities, features = ModelBundle.load(folder, runtime="onnx").predict_with_features(
        np.zeros((1, 64, 64), np.uint8)
    )
    assert probabilities.shape == (1, 3) and features.shape[0] == 1 and features.shape[1] > 3
    assert len(onnx.load_model(folder / "model.onnx").graph.output) == 2


def test_a_bundle_without_statistics_cannot_warn(format1_bundle_dir):
    old = ModelBundle.load(format1_bundle_dir, runtime="keras")
    assert old.info.format_version == 1 and not old.info.ood
    slices = np.zeros((2, 64, 64), np.uint8)
    _, features = old.predict_with_features(slices)
    assert ood.assess(old, features, [], slices) is None


def test_an_altered_statistics_file_is_refused(fitted, tmp_path):
    from node.analysis.bundle import BundleError

    folder = tmp_path / "bundle"
    shutil.copytree(fitted, folder, ignore=shutil.ignore_patterns("model.onnx"))
    with (folder / "ood.npz").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="SHA-256"):
        ModelBundle.load(folder)


@pytest.mark.parametrize(
    ("attribute", "value", "reason"),
    [
        ("BodyPartExamined", "HEAD", "body part examined is HEAD"),
        ("ContrastBolusAgent", "IOHEXOL", "contrast-enhanced"),
        ("ConvolutionKernel", "H30s", "head kernel"),
        ("SliceThickness", "20", "slice thickness"),
        ("ReconstructionDiameter", "180", "field of view"),
    ],
)
def test_headers_outside_chest_ct_ranges_are_reasons(attribute, value, reason):
    header = copy.deepcopy(chest_header())
    assert not any(check["outside"] for check in ood.header_checks([header]))
    setattr(header, attribute, value)
    outside = [check for check in ood.header_checks([header]) if check["outside"]]
    assert len(outside) == 1 and reason in outside[0]["reason"]


# ----------------------------------------------------------------- where the flag shows


FLAGGED = {
    "method": ood.METHOD,
    "score": 5123.0,
    "threshold": 41.0,
    "false_alarm_rate": 0.01,
    "flagged": True,
    "reasons": ["the images are unlike the training images to the model (score 5123)"],
    "checks": [],
    "slices_above": 1.0,
}


def study_result(assessed) -> StudyResult:
    return StudyResult(
        classes=CLASSES,
        probabilities=(0.9, 0.05, 0.05),
        predicted_class="Covid_19",
        rule="top-mean",
        slices=(
            SliceResult("1.2.3.1", "1.2.3", "1.2.840.10008.5.1.4.1.1.2", None, (0.9, 0.05, 0.05)),
        ),  # fmt: skip
        model=ModelIdentity("effnet", "1.2"),
        ood=assessed,
    )


@pytest.mark.parametrize(
    ("assessed", "meaning"),
    [
        (FLAGGED, "Outside the model's experience"),
        ({**FLAGGED, "flagged": False, "reasons": []}, "Within the model's experience"),
        (None, "Not assessed (the model bundle cannot warn)"),
    ],
)
def test_the_sr_carries_the_assessment_as_a_qualitative_evaluation(assessed, meaning, tmp_path):
    from node.reporting import sr

    spec = phantom.PhantomSpec(slices=2, rows=64, columns=64)
    series = phantom.write_series(spec, tmp_path)
    evaluated = [dcmread(path) for path in series]
    result = StudyResult(
        **{
            **study_result(assessed).__dict__,
            "slices": tuple(
                SliceResult(
                    str(ds.SOPInstanceUID),
                    str(ds.SeriesInstanceUID),
                    str(ds.SOPClassUID),
                    None,
                    (0.9, 0.05, 0.05),
                )  # fmt: skip
                for ds in evaluated
            ),
        }
    )
    written = sr.build_sr(evaluated, result, sr.DeviceObserver(uid="1.2.826.0.1.3680043.8.498.1"))
    assert sr.read_sr_summary(written)["finding"] == "COVID-19"
    expected_reasons = FLAGGED["reasons"] if assessed is FLAGGED else []
    assert sr.read_sr_experience(written) == (meaning, expected_reasons)


def add_study_with_result(node, assessed) -> int:
    from tests.test_webui_worklist import add_analysis, add_study

    with node.session_factory() as db, db.begin():
        study = add_study(db, 1, patient_name="DOE^JOHN")
        add_analysis(
            db,
            study,
            "Covid_19",
            0.97,
            assessment={"ood": assessed},
            outside_experience=bool(assessed and assessed["flagged"]),
        )
        return study.id


def test_a_flagged_study_is_marked_in_the_worklist_and_warned_on_its_page(web_node, client):
    study_id = add_study_with_result(web_node, FLAGGED)
    worklist = html.unescape(client.get("/").text)
    assert "outside the model's experience" in worklist
    rows = client.get("/worklist.json").get_json()["rows"]
    assert [row["outside_experience"] for row in rows] == [True]
    page = html.unescape(client.get(f"/studies/{study_id}").text)
    assert "Outside the model's experience." in page
    assert "the images are unlike the training images to the model (score 5123)" in page


def test_a_study_within_experience_has_no_mark(web_node, client):
    study_id = add_study_with_result(web_node, {**FLAGGED, "flagged": False, "reasons": []})
    assert "outside the model" not in client.get("/").text
    page = html.unescape(client.get(f"/studies/{study_id}").text)
    assert "Within the model's experience" in page and 'role="alert"' not in page


def test_the_study_page_says_a_bundle_without_statistics_cannot_warn(web_node, client):
    study_id = add_study_with_result(web_node, None)
    page = client.get(f"/studies/{study_id}").text
    assert "cannot warn when a study is unlike" in page


# ----------------------------------------------------------------- holding the SR


@pytest.fixture(scope="module")
def head_series(tmp_path_factory) -> list[Path]:
    """A phantom study whose header says it is a head CT (so it is flagged)."""
    files = phantom.write_series(
        phantom.PhantomSpec(slices=8, seed=2000), tmp_path_factory.mktemp("head")
    )
    for path in files:
        ds = dcmread(path)
        ds.BodyPartExamined = "HEAD"
        ds.save_as(path)
    return files


@pytest.mark.parametrize("hold", [True, False])
def test_a_flagged_study_s_sr_is_held_when_the_setting_asks(make_node, bundle, head_series, hold):
    from node.analysis.analyze import analyze_instances

    peer = Peer(name="archive", ae_title="ARCHIVE", port=free_port())
    node = make_node(peers=[peer], report_peer="archive", report_hold_outside_experience=hold)
    study_id = ingest_files(node, head_series)
    stable(node, study_id)
    analysis_id = jobs.claim_study(node, study_id, bundle.info.identity(), "w1")
    outcome = analyze_instances(jobs.instance_paths(node, study_id), bundle)
    assert outcome.result.outside_experience
    assert any("HEAD" in reason for reason in outcome.result.ood["reasons"])
    report_id = jobs._record(node, study_id, analysis_id, outcome)
    with node.session_factory() as session:
        assert session.get(Analysis, analysis_id).outside_experience
        reports = session.scalars(select(Report)).all()
    assert (report_id is None) is hold
    assert len(reports) == (0 if hold else 1)


# ----------------------------------------------------------------- training writes it


def test_fit_ood_on_a_prepared_run_makes_statistics_a_bundle_serves(tmp_path):
    from node.analysis import imaging
    from node.analysis.bundle import write_bundle
    from tests.test_calibration import signal_samples
    from training.model import make_model
    from training.ood import FILE, fit_ood
    from training.shards import PreparedRun, PrepareOptions, prepare

    run = tmp_path / "run"
    prepare(signal_samples(tmp_path / "images"), run, PrepareOptions(image_size=32))
    model = make_model("EfficientNetLite0", 32)
    entry, report, files = fit_ood(model, PreparedRun.open(run), tmp_path)
    assert files == [tmp_path / FILE] and entry["file"] == FILE
    assert entry["sha256"] == ood.sha256_of(tmp_path / FILE)
    assert entry["threshold"] > 0 and entry["false_alarm_rate"] == FALSE_ALARM_RATE
    assert report["validation_slices"] == 48  # 4 validation patients x 3 studies x 4 slices
    old = ModelInfo.from_json(DEMO_MODEL_DIR / INFO_FILE)
    info = old.replace(
        input_size=32, preprocessing_version=imaging.PREPROCESSING_VERSION,
        format_version=2, ood=entry, gate={},
    )  # fmt: skip
    served = ModelBundle.load(write_bundle(model, info, tmp_path / "bundle", extra_files=files))
    noise = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    _, features = served.predict_with_features(noise)
    assessed = ood.assess(served, features, [chest_header()], noise)
    assert assessed["threshold"] == entry["threshold"] and assessed["score"] > 0
    assert {check["name"] for check in assessed["checks"]} >= {"intensity histogram", "contrast"}
