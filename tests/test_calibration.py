"""Calibrated probabilities and the COVID-19 operating point: fitted on validation, carried by
the bundle, applied to every answer, stated in the SR; a format-1 bundle answers as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from ainode.cli import main
from node import phantom
from node.analysis import calibration
from node.analysis.bundle import BUNDLE_FORMAT, BundleError, ModelBundle, ModelInfo
from node.analysis.classify import classify_slices
from node.analysis.result import CLASSES, ModelIdentity, SliceResult, StudyResult, aggregate
from node.reporting.sr import DECISION_METHOD, DeviceObserver, build_sr, read_sr_decision
from node.settings import DEMO_MODEL_DIR
from tests.config import format1
from training.calibration import FIGURES, choose_threshold, fit_calibration, fit_temperature
from training.evaluate import expected_calibration_error
from training.samples import Sample
from training.shards import PrepareOptions, prepare

COVID, NORMAL, PNEUMONIA = range(3)
DEMO_INFO = format1(ModelInfo.from_json(DEMO_MODEL_DIR / "model.json"))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def overconfident(rng, n: int, temperature: float = 3.0):
    """Labels drawn from softmax(z) and a model that says softmax(temperature · z)."""
    z = rng.normal(0, 1.5, (n, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(z)])
    return softmax(temperature * z), labels


def studies(rng, count: int, slices: int = 16, shift: float = 0.7):
    """Studies of a uniformly drawn class whose slices each show it weakly: slice scores
    ``z ~ N(shift · onehot, 1)`` and the slice model ``softmax(shift · z)``, the exact
    posterior of one slice, so slices are calibrated; a study holds 16 slices of evidence,
    which the top-mean rule does not add up, so study vectors are not."""
    probs, labels, keys = [], [], []
    for study in range(count):
        label = rng.integers(3)
        z = rng.normal(0, 1, (slices, 3))
        z[:, label] += shift
        probs.append(softmax(shift * z))
        labels += [label] * slices
        keys += [f"study-{study}"] * slices
    return np.concatenate(probs), np.array(labels), keys


def format2(calibration_: dict, operating_point: dict) -> ModelInfo:
    return DEMO_INFO.replace(
        format_version=BUNDLE_FORMAT, calibration=calibration_, operating_point=operating_point
    )


OPERATING_POINT = {
    "class": "Covid_19",
    "rule": "top-mean",
    "threshold": 0.3,
    "target_sensitivity": 0.95,
    "validation": {"sensitivity": 0.96, "specificity": 0.7, "studies": 40},
    "test": {
        "studies": 40,
        "positives": 12,
        "negatives": 28,
        "true_positives": 11,
        "false_negatives": 1,
        "true_negatives": 20,
        "false_positives": 8,
        "sensitivity": 11 / 12,
        "specificity": 20 / 28,
        "ppv": 11 / 19,
    },
}


def test_temperature_is_recovered_on_overconfident_predictions_and_ece_drops():
    rng = np.random.default_rng(7)
    probs, labels = overconfident(rng, 20000, temperature=3.0)
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    calibrated = calibration.temperature_scale(probs, temperature)
    before, after = (expected_calibration_error(labels, p) for p in (probs, calibrated))
    # measured: 0.19 → 0.009
    assert before > 0.1 and after < before / 5, (before, after)
    assert (calibrated.argmax(1) == probs.argmax(1)).all()  # the ranking never changes


def test_study_calibration_reduces_the_study_calibration_error():
    rng = np.random.default_rng(3)
    val, test = studies(rng, 600), studies(rng, 600)
    cal, _point, report = fit_calibration(val, test, "top-mean", 0.95)
    assert cal["slice"]["temperature"] == pytest.approx(1.0, abs=0.1)  # slices were calibrated
    assert cal["study"]["temperature"] < 0.5  # the top-mean study vectors were not
    slice_, study = report["slice"]["test"], report["study"]["test"]  # fitted on validation
    assert slice_["ece_after"] < 0.03
    assert study["ece_after"] < study["ece_before"] - 0.1, study  # measured: 0.29 → 0.07
    assert study["nll_after"] < study["nll_before"]


def test_the_operating_point_meets_the_target_sensitivity_on_validation():
    rng = np.random.default_rng(5)
    val, test = studies(rng, 300), studies(rng, 300)
    _cal, point, report = fit_calibration(val, test, "top-mean", 0.9)
    assert point["validation"]["sensitivity"] >= 0.9
    assert point["test"]["studies"] == 300 and point["test"]["positives"] > 0
    counts = point["test"]
    assert counts["true_positives"] + counts["false_negatives"] == counts["positives"]
    assert counts["ppv"] == pytest.approx(
        counts["true_positives"] / (counts["true_positives"] + counts["false_positives"])
    )
    assert report["served_test"]["n"] == 300


def test_the_threshold_is_the_highest_that_keeps_the_target():
    positive = np.array([True] * 10 + [False] * 3)
    scores = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.2, 0.45, 0.3, 0.1])
    # 90 %: 9 of 10 positives kept → at or below 0.5, above the next lower score (0.45)
    assert choose_threshold(scores, positive, 0.9) == pytest.approx(0.475)
    assert choose_threshold(scores, positive, 1.0) == pytest.approx(0.15)  # 0.2 kept, 0.1 not


def test_the_threshold_calls_covid_where_the_most_probable_class_is_another():
    info = format2({}, OPERATING_POINT)
    slices = np.array([[0.35, 0.5, 0.15]] * 8)
    # top-mean: Covid_19 0.35 / 1.15 = 0.30, Normal (1 - 0.35) / 1.15 = 0.57
    assert calibration.study_answer(slices, CLASSES, "top-mean", DEMO_INFO)[0] == "Normal"
    predicted, probs, raw, decision = calibration.study_answer(slices, CLASSES, "top-mean", info)
    assert predicted == "Covid_19" and probs[COVID] < max(probs)
    assert raw is None  # no study calibration in this bundle
    assert decision["method"] == "operating point"
    assert decision["threshold"] == 0.3 and decision["target_sensitivity"] == 0.95
    assert decision["covid_probability"] == pytest.approx(probs[COVID])
    assert decision["test"]["ppv"] == pytest.approx(11 / 19)
    below = np.array([[0.2, 0.5, 0.3]] * 8)  # under the threshold: the best of the others
    assert calibration.study_answer(below, CLASSES, "top-mean", info)[0] == "Normal"
    pneumonia = np.array([[0.2, 0.1, 0.7]] * 8)
    assert calibration.study_answer(pneumonia, CLASSES, "top-mean", info)[0] == "Pneumonia"
    # the point is for top-mean studies: a mean study is the most probable class, said so
    predicted, *_rest, decision = calibration.study_answer(slices, CLASSES, "mean", info)
    assert predicted == "Normal" and "for the top-mean rule" in decision["note"]


def test_a_calibrated_bundle_softens_the_study_the_top_mean_rule_makes_certain():
    slices = np.tile([0.69, 0.30, 0.01], (20, 1))  # mean Covid_19: 0.77
    slices[:5] = [0.999, 0.0005, 0.0005]  # a quarter of the slices very sure
    info = format2(
        {
            "method": "temperature",
            "slice": {"temperature": 1.5},
            "study": {"temperature": 2.5, "rule": "top-mean"},
        },
        {},
    )
    _c, plain, *_ = calibration.study_answer(slices, CLASSES, "top-mean", DEMO_INFO)
    calibrated = calibration.calibrate_slices(slices, info)
    predicted, probs, raw, decision = calibration.study_answer(
        calibrated, CLASSES, "top-mean", info
    )
    assert plain[COVID] > 0.985 and predicted == "Covid_19"
    assert raw[COVID] > probs[COVID] and probs[COVID] < 0.9
    assert decision == {
        "method": "most probable class",
        "calibrated": True,
        "study_calibrated": True,
        "rule": "top-mean",
    }


@pytest.mark.parametrize(
    ("calibration_", "operating_point", "message"),
    [
        ({"method": "isotonic"}, {}, "calibration.method must be 'temperature'"),
        ({"method": "temperature"}, {}, "calibration.slice must be a JSON object"),
        (
            {"method": "temperature", "slice": {"temperature": 0}},
            {},
            "calibration.slice.temperature must be a number in 0.01..100.0, got 0",
        ),
        (
            {"method": "temperature", "slice": {"temperature": 1}, "study": {"temperature": 2}},
            {},
            "calibration.study.rule must be one of ('mean', 'top-mean'), got None",
        ),
        ({}, OPERATING_POINT | {"class": "Normal"}, "operating_point.class must be 'Covid_19'"),
        ({}, OPERATING_POINT | {"threshold": 1.5}, "operating_point.threshold must be a number"),
        ({}, OPERATING_POINT | {"rule": "max"}, "operating_point.rule must be one of"),
        ({}, OPERATING_POINT | {"test": None}, "operating_point.test must be a JSON object"),
    ],
)
def test_a_bad_calibration_or_operating_point_is_refused_naming_the_field(
    calibration_, operating_point, message
):
    info = format2(calibration_, operating_point)
    with pytest.raises(BundleError, match="model.json: " + message.replace("(", r"\(")[:40]):
        calibration.check(info)
    with pytest.raises(BundleError):
        calibration.study_answer(np.full((2, 3), 1 / 3), CLASSES, "top-mean", info)


@pytest.fixture(scope="module")
def demo_bundle(format1_bundle_dir):
    """The demo model as a format-1 bundle (no calibration, no operating point)."""
    return ModelBundle.load(format1_bundle_dir, runtime="keras")


@pytest.fixture(scope="module")
def phantom_slices(demo_bundle):
    """Windowed slices of a COVID and a pneumonia phantom, as the worker feeds the model."""
    from node.analysis import imaging

    stacks = []
    for finding in ("covid", "pneumonia"):
        spec = phantom.PhantomSpec(finding=finding, slices=6, seed=4242, rows=128, columns=128)
        window = imaging.Window(demo_bundle.info.window_center, demo_bundle.info.window_width)
        pixels = [imaging.windowed_slices(ds, window)[0] for ds in phantom.generate_series(spec)]
        stacks.append((finding, np.stack(pixels)))
    return stacks


def test_a_format_1_bundle_answers_exactly_as_before(demo_bundle, phantom_slices):
    assert "format_version" not in json.loads((demo_bundle.folder / "model.json").read_text())
    assert demo_bundle.info.format_version == 1
    for label, slices in phantom_slices:
        raw = demo_bundle.predict(slices)
        before = aggregate(raw, CLASSES, "top-mean")
        found = classify_slices([(label, slices)], "top-mean", demo_bundle)
        assert (found.predicted_class, found.probabilities) == before
        assert [p for _name, p in found.slices] == [tuple(map(float, row)) for row in raw]
        assert found.raw_probabilities is None
        assert found.decision == {"method": "most probable class"}
        assert calibration.calibrate_slices(raw, demo_bundle.info) is raw


def test_the_upload_path_applies_the_bundles_calibration_and_operating_point(
    demo_bundle, phantom_slices
):
    info = format2(
        {
            "method": "temperature",
            "slice": {"temperature": 2.0},
            "study": {"temperature": 1.5, "rule": "top-mean"},
        },
        OPERATING_POINT,
    )
    calibrated_bundle = ModelBundle(info, demo_bundle._runner, demo_bundle.folder)
    for label, slices in phantom_slices:
        raw = demo_bundle.predict(slices)
        expected = calibration.study_answer(
            calibration.calibrate_slices(raw, info), CLASSES, "top-mean", info
        )
        found = classify_slices([(label, slices)], "top-mean", calibrated_bundle)
        assert found.predicted_class == expected[0]
        assert found.probabilities == pytest.approx(expected[1])
        assert found.decision["method"] == "operating point"
        assert found.raw_probabilities is not None


def test_the_sr_states_the_operating_point_and_the_calibration(tmp_path):
    files = phantom.write_series(
        phantom.PhantomSpec(finding="covid", slices=4, seed=11, rows=64, columns=64), tmp_path
    )
    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    info = format2({}, OPERATING_POINT)
    slice_probs = np.array([[0.35, 0.5, 0.15]] * 4)
    predicted, probs, raw, decision = calibration.study_answer(
        slice_probs, CLASSES, "top-mean", info
    )
    result = StudyResult(
        classes=CLASSES,
        probabilities=probs,
        predicted_class=predicted,
        rule="top-mean",
        slices=tuple(
            SliceResult(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, None, (1, 0, 0))
            for ds in headers
        ),
        model=ModelIdentity("test-model", "1.0.0"),
        raw_probabilities=raw,
        decision=decision,
    )
    observer = DeviceObserver("2.25.1234", "AINODE", "ainode", "ainode", "1")
    sr = build_sr(headers, result, observer)
    text = read_sr_decision(dcmread(_encoded(sr, tmp_path)))
    assert "reaches 30.0 %" in text and "sensitivity of 95.0 %" in text
    assert "this study: 30.4 %" in text
    assert "sensitivity 91.7 % (11/12)" in text and "PPV 57.9 %" in text
    # the same sentence, read with pydicom alone, in the finding's measurement group
    found = [
        item.TextValue
        for item in _walk(sr.ContentSequence)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeValue == DECISION_METHOD.value
    ]
    assert found == [text]


def _encoded(ds, folder: Path) -> Path:
    path = folder / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _walk(sequence):
    for item in sequence:
        yield item
        yield from _walk(item.get("ContentSequence", []))


# ------------------------------------------------------------------ through the training CLI


def signal_samples(root: Path) -> list[Sample]:
    """48 x 48 PNGs with a class signal (a bright blob, nothing, stripes) under noise: 12
    patients with a 4-slice study per class; p0-p3 validation, p4-p7 test, the rest train."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:48, :48]
    patterns = {
        "Covid_19": 120 * (((yy - 24) ** 2 + (xx - 20) ** 2) < 120),
        "Normal": np.zeros((48, 48)),
        "Pneumonia": 120 * ((yy // 6) % 2),
    }
    samples = []
    for p in range(12):
        patient = f"p{p}"
        split = "val" if p < 4 else "test" if p < 8 else "train"
        for label, pattern in patterns.items():
            (root / label).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                image = np.clip(60 + pattern + rng.normal(0, 45, (48, 48)), 0, 255)
                path = root / label / f"{patient}-{i}.png"
                Image.fromarray(image.astype(np.uint8)).save(path)
                samples.append(Sample(path, label, patient, f"{patient}/{label}", "t", split=split))
    return samples


def test_train_evaluate_and_register_make_a_calibrated_format_2_bundle(tmp_path, capsys):
    run, bundle_dir = tmp_path / "run", tmp_path / "bundle"
    prepare(signal_samples(tmp_path / "images"), run, PrepareOptions(image_size=32))
    fit = ["train", "fit", str(run), "--backbone", "EfficientNetLite0", "--input-size", "32"]
    assert main([*fit, "--batch-size", "16", "--epochs", "2", "--freeze-base", "--lr", "1e-2"]) == 0
    assert main(["train", "evaluate", str(run), "--target-sensitivity", "0.75"]) == 0
    assert main(["train", "register", str(run), "--name", "calibrated", "--version", "1.0.0",
                 "--out", str(bundle_dir)]) == 0  # fmt: skip
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    report = evaluation["trust_report"]["calibration"]
    for level in ("slice", "study"):
        for split in ("validation", "test"):
            figures = report[level][split]
            assert 0 <= figures["ece_after"] <= 1 and 0 <= figures["ece_before"] <= 1
        assert (run / "evaluation" / FIGURES[level]).stat().st_size > 5000
    markdown = (run / "evaluation" / "evaluation.md").read_text()
    assert "## Calibration" in markdown and "### Operating point" in markdown
    info = ModelInfo.from_json(bundle_dir / "model.json")
    assert info.format_version == 2
    assert info.calibration == evaluation["calibration"]
    assert info.calibration["study"]["studies"] == 12  # 4 validation patients x 3 studies
    point = info.operating_point
    assert point["target_sensitivity"] == 0.75 and point["validation"]["sensitivity"] >= 0.75
    assert point["test"]["studies"] == 12 and point["test"]["positives"] == 4
    served = ModelBundle.load(bundle_dir, runtime="keras")
    slices = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    found = classify_slices([("x", slices)], "top-mean", served)
    assert found.decision["method"] == "operating point"
    assert found.decision["threshold"] == pytest.approx(point["threshold"])


def test_the_study_page_says_how_the_class_was_decided(web_node, client, tmp_path):
    from sqlalchemy import select

    from node.records.db import Analysis, AnalysisStatus, Study, utcnow

    spec = phantom.PhantomSpec(finding="covid", slices=3, seed=12, rows=64, columns=64)
    for path in phantom.write_series(spec, tmp_path):
        web_node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    info = format2({"method": "temperature", "slice": {"temperature": 1.0}}, OPERATING_POINT)
    slices = np.array([[0.35, 0.5, 0.15]] * 3)
    predicted, probs, _raw, decision = calibration.study_answer(slices, CLASSES, "top-mean", info)
    with web_node.session_factory() as db:
        study_id = db.scalars(select(Study.id)).one()
        db.add(
            Analysis(
                study_id=study_id,
                model_name="calibrated",
                model_version="1.0.0",
                status=AnalysisStatus.DONE,
                finished_at=utcnow(),
                rule="top-mean",
                predicted_class=predicted,
                probabilities=dict(zip(CLASSES, probs, strict=True)),
                slices_evaluated=3,
                timings={},
                instances_skipped={},
                assessment={"raw_probabilities": [0.5, 0.3, 0.2], "decision": decision},
            )
        )
        db.commit()
    page = client.get(f"/studies/{study_id}")
    assert page.status_code == 200
    text = " ".join(page.text.split())
    assert "Covid_19 is called when its calibrated probability reaches 30.0 %" in text
    assert "this study: 30.4 %" in text and "specificity 71.4 % (20/28)" in text
    assert "Probabilities are calibrated" in text
    assert "Before study calibration" in text and "0.500" in text
