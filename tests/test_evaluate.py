"""Evaluation metrics against hand-computed values, study aggregation and the report files."""

from __future__ import annotations

import json
import re
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from ainode.cli import main
from node.analysis.result import CLASSES, aggregate
from training import bootstrap
from training.evaluate import (
    classification_metrics,
    evaluate_predictions,
    roc_auc,
    study_level,
)
from training.evaluation_report import report_markdown, summary_text, write_report


def one_hot(predicted: list[int], n_classes: int = 3) -> np.ndarray:
    """Probabilities that put 0.8 on the predicted class and split the rest."""
    probs = np.full((len(predicted), n_classes), 0.2 / (n_classes - 1))
    probs[np.arange(len(predicted)), predicted] = 0.8
    return probs


def brute_force_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of positive-negative pairs ordered correctly, ties counting one half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


def test_metrics_match_hand_computed_values():
    # true:      C C C C N N P P
    # predicted: C C C N N N P N
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    metrics = classification_metrics(y_true, one_hot([0, 0, 0, 1, 1, 1, 2, 1]), CLASSES)
    assert metrics["confusion_matrix"] == [[3, 1, 0], [0, 2, 0], [0, 1, 1]]
    covid, normal, pneumonia = (metrics["per_class"][c] for c in CLASSES)
    assert (covid["precision"], covid["recall"], covid["support"]) == (1.0, 0.75, 4)
    assert covid["f1"] == pytest.approx(6 / 7)
    assert (normal["precision"], normal["recall"], normal["support"]) == (0.5, 1.0, 2)
    assert normal["f1"] == pytest.approx(2 / 3)
    assert (pneumonia["precision"], pneumonia["recall"], pneumonia["support"]) == (1.0, 0.5, 2)
    assert pneumonia["f1"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == 0.75
    assert metrics["n"] == 8
    assert metrics["macro_avg"] == pytest.approx(
        {"precision": 5 / 6, "recall": 0.75, "f1": 46 / 63}
    )
    assert metrics["weighted_avg"] == pytest.approx(
        {"precision": 7 / 8, "recall": 0.75, "f1": 16 / 21}
    )
    assert (metrics["covid_sensitivity"], metrics["covid_ppv"]) == (0.75, 1.0)
    json.dumps(metrics, allow_nan=False)  # plain Python values only


def test_auc_matches_hand_computed_pairs():
    classes = ("Covid_19", "Normal")
    y_true = np.array([0, 0, 1, 1])
    covid = np.array([0.9, 0.4, 0.6, 0.2])  # pairs: 0.9>0.6, 0.9>0.2, 0.4<0.6, 0.4>0.2
    metrics = classification_metrics(y_true, np.c_[covid, 1 - covid], classes)
    assert metrics["per_class"]["Covid_19"]["auc"] == 0.75
    assert metrics["per_class"]["Normal"]["auc"] == 0.75
    assert metrics["macro_auc"] == 0.75
    tied = np.array([0.5, 0.5, 0.5, 0.2])  # pairs: tie, 1, tie, 1 -> (0.5 + 1 + 0.5 + 1) / 4
    tied_metrics = classification_metrics(y_true, np.c_[tied, 1 - tied], classes)
    assert tied_metrics["per_class"]["Covid_19"]["auc"] == 0.75


def test_perfect_predictions():
    y_true = np.array([0, 1, 2, 2, 1, 0])
    metrics = classification_metrics(y_true, one_hot(list(y_true)), CLASSES)
    assert metrics["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert metrics["accuracy"] == 1.0
    for row in metrics["per_class"].values():
        assert (row["precision"], row["recall"], row["f1"], row["auc"]) == (1.0, 1.0, 1.0, 1.0)
    assert metrics["macro_auc"] == 1.0


def test_all_wrong_predictions_are_zero_without_warnings():
    y_true = np.array([0, 1, 2, 0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(y_true, one_hot([1, 2, 0, 1, 2, 0]), CLASSES)
    assert metrics["confusion_matrix"] == [[0, 2, 0], [0, 0, 2], [2, 0, 0]]
    assert metrics["accuracy"] == 0.0
    for row in metrics["per_class"].values():
        assert (row["precision"], row["recall"], row["f1"]) == (0.0, 0.0, 0.0)
    assert metrics["macro_avg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_class_absent_from_truth_has_no_auc_and_no_warnings():
    y_true = np.array([0, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(y_true, one_hot([0, 2, 1, 1]), CLASSES)
    pneumonia = metrics["per_class"]["Pneumonia"]
    assert pneumonia == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "auc": None}
    assert metrics["per_class"]["Covid_19"]["auc"] == 0.75
    assert metrics["per_class"]["Normal"]["auc"] == 1.0
    assert metrics["macro_auc"] == pytest.approx(0.875)
    assert metrics["weighted_avg"]["recall"] == metrics["accuracy"] == 0.75


def test_no_auc_at_all_when_truth_has_one_class():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(np.array([1, 1]), one_hot([1, 0]), CLASSES)
    assert all(row["auc"] is None for row in metrics["per_class"].values())
    assert metrics["macro_auc"] is None


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_fraction_of_correctly_ordered_pairs(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, size=60)
    probs = np.round(rng.random((60, 3)), 1)  # one decimal: many ties
    metrics = classification_metrics(y_true, probs, CLASSES)
    for i, name in enumerate(CLASSES):
        expected = brute_force_auc(y_true == i, probs[:, i])
        assert metrics["per_class"][name]["auc"] == pytest.approx(expected)


def test_constant_scores_give_auc_one_half():
    assert roc_auc(np.array([True, False, True, False, False]), np.full(5, 0.3)) == 0.5


@pytest.mark.parametrize(
    ("y_true", "probs", "message"),
    [
        (np.array([0, 1]), np.ones((3, 3)), r"probs must have shape \(2, 3\)"),
        (np.array([0, 3]), np.ones((2, 3)), r"outside 0\.\.2"),
        (np.array([], dtype=int), np.ones((0, 3)), "non-empty"),
        (np.array([0.0, 1.0]), np.ones((2, 3)), "integer class indices"),
        (np.array([0, 1]), np.array([[0.1, np.nan, 0.3]] * 2), "NaN"),
    ],
)
def test_bad_inputs_are_rejected(y_true, probs, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, probs, CLASSES)


@pytest.mark.parametrize("rule", ["mean", "top-mean"])
def test_study_level_equals_node_aggregation(rule):
    rng = np.random.default_rng(7)
    keys = ["b", "a", "b", "c", "a", "b", "c", "b"]
    labels = {"a": 0, "b": 2, "c": 1}
    y_true = np.array([labels[k] for k in keys])
    probs = rng.dirichlet(np.ones(3), size=len(keys))
    study_true, study_probs, study_keys = study_level(y_true, probs, keys, rule)
    assert study_keys == ["b", "a", "c"]
    assert study_true.tolist() == [2, 0, 1]
    for key, row in zip(study_keys, study_probs, strict=True):
        slices = probs[[i for i, k in enumerate(keys) if k == key]]
        assert row == pytest.approx(aggregate(slices, CLASSES, rule)[1])


def test_conflicting_study_labels_are_rejected():
    with pytest.raises(ValueError, match="study 's2' has slices with different true labels"):
        study_level(np.array([0, 0, 1, 2]), one_hot([0, 0, 1, 2]), ["s1", "s1", "s2", "s2"])


def test_study_keys_must_match_slices():
    with pytest.raises(ValueError, match="study_keys has 1 entries for 2 slices"):
        study_level(np.array([0, 1]), one_hot([0, 1]), ["s1"])


def test_evaluate_predictions_reports_both_levels():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    probs = one_hot([0, 1, 1, 1, 2, 0])
    result = evaluate_predictions(y_true, probs, ["a", "a", "b", "b", "c", "d"], CLASSES, "mean")
    assert result["rule"] == "mean"
    # without patient keys each study stands for its patient
    assert result["counts"] == {"slices": 6, "studies": 4, "patients": 4, "patient_cases": 4}
    assert result["slice"]["accuracy"] == pytest.approx(4 / 6)
    # Study "a" is the mean of one right and one wrong slice: a tie, argmax takes Covid_19.
    assert result["study"]["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


@pytest.fixture
def result() -> dict:
    """An evaluation of the hand-computed case, one study per two slices."""
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    probs = one_hot([0, 0, 0, 1, 1, 1, 2, 1])
    keys = ["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4"]
    return evaluate_predictions(y_true, probs, keys, CLASSES, "top-mean")


def assert_png(path) -> None:
    """The file is a PNG image of a readable, non-trivial size."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width >= 300 and image.height >= 300


def write_history(path, header: str, rows: list[str]) -> None:
    """A CSVLogger-style history file."""
    path.write_text("\n".join([header, *rows]) + "\n")


def test_report_files_are_written_and_valid(tmp_path, result):
    paths = write_report(result, tmp_path / "report", title="Batch 8")
    names = [p.name for p in paths]
    assert names == [
        "evaluation.json",
        "evaluation.md",
        "confusion_matrix.png",
        "confusion_matrix_study.png",
    ]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(names)
    assert json.loads(paths[0].read_text()) == result
    assert_png(paths[2])
    assert_png(paths[3])
    markdown = paths[1].read_text()
    assert markdown.startswith("# Batch 8")
    assert "| Covid_19 | 1.0000 | 0.7500 | 0.8571 | 4 |" in markdown
    assert "| Normal | 0.5000 | 1.0000 | 0.6667 | 2 |" in markdown
    assert "| accuracy | | | 0.7500 | 8 | |" in markdown
    assert "| Covid_19 | 3 | 1 | 0 |" in markdown  # slice confusion matrix row
    assert "## Study level (top-mean)" in markdown
    assert "- COVID-19 sensitivity: 0.7500" in markdown


@pytest.mark.parametrize(
    ("header", "rows"),
    [
        (
            "epoch,accuracy,learning_rate,loss,shard,val_accuracy,val_loss",
            [
                "0,0.50,0.001,1.10,1,0.45,1.20",
                "1,0.60,0.001,0.90,1,0.55,1.00",
                "0,0.65,0.0009,0.80,2,0.60,0.95",
                "1,0.70,0.0009,0.70,2,,",
            ],
        ),
        ("epoch,accuracy,loss", ["0,0.5,1.1", "1,0.6,0.9", "2,0.7,0.8"]),
        ("epoch,loss,val_loss", ["0,1.1,1.2", "1,0.9,1.0"]),
    ],
    ids=["with-val-and-shards", "without-val", "loss-only"],
)
def test_history_plot_from_csv(tmp_path, result, header, rows):
    history = tmp_path / "history.csv"
    write_history(history, header, rows)
    paths = write_report(result, tmp_path / "report", history_csv=history)
    assert paths[-1].name == "history.png"
    assert_png(paths[-1])


def test_history_without_metrics_is_rejected(tmp_path, result):
    history = tmp_path / "history.csv"
    write_history(history, "epoch,learning_rate", ["0,0.001"])
    with pytest.raises(ValueError, match="has none of the columns"):
        write_report(result, tmp_path / "report", history_csv=history)


# ---------------------------------------------------------------- patients and intervals


def interval(result: dict, level: str, metric: str) -> tuple[float, float]:
    found = result["intervals"]["levels"][level][metric]
    return found["low"], found["high"]


def width(result: dict, level: str, metric: str = "accuracy") -> float:
    low, high = interval(result, level, metric)
    return high - low


def patients_with_slices(correct: list[bool], slices: int, label: int = 0):
    """``(y_true, probs, study_keys, patient_keys)``: one study of ``slices`` slices per
    patient, every slice of a patient predicted right or every one wrong."""
    y_true = np.full(len(correct) * slices, label)
    wrong = (label + 1) % 3
    probs = one_hot([label if ok else wrong for ok in correct for _ in range(slices)])
    keys = [f"p{i}" for i in range(len(correct)) for _ in range(slices)]
    return y_true, probs, [f"{k}/s" for k in keys], keys


def resampled_metrics(y_true, probs, studies, patients, counts, rule) -> dict[str, dict]:
    """The metrics of one resample built literally: each drawn patient's slices copied as
    often as drawn (studies and cases renamed per copy), then scored from scratch."""
    names = sorted(set(patients))
    index = [[i for i, p in enumerate(patients) if p == name] for name in names]
    taken, study_keys, case_keys = [], [], []
    for unit, times in enumerate(counts):
        for copy in range(times):
            taken += index[unit]
            study_keys += [f"{studies[i]}#{copy}" for i in index[unit]]
            case_keys += [f"{patients[i]}#{copy}/{y_true[i]}" for i in index[unit]]
    y, p = y_true[taken], probs[taken]
    study_true, study_probs, _ = study_level(y, p, study_keys, rule)
    case_true, case_probs, _ = study_level(y, p, case_keys, rule)
    return {
        "slice": classification_metrics(y, p),
        "study": classification_metrics(study_true, study_probs),
        "patient": classification_metrics(case_true, case_probs),
    }


def slow_intervals(y_true, probs, studies, patients, resamples, seed, rule) -> dict:
    """Percentile intervals from a Python loop over resamples, a metric left out of a
    resample where its denominator is 0 (macro F1: a class of the data not drawn)."""
    whole = resampled_metrics(y_true, probs, studies, patients, [1] * len(set(patients)), rule)
    values = {(level, m): [] for level in whole for m in bootstrap.METRICS}
    rows = np.concatenate(list(bootstrap.resample_counts(len(set(patients)), resamples, seed)))
    for counts in rows:
        found = resampled_metrics(y_true, probs, studies, patients, counts, rule)
        for level, metrics in found.items():
            present = [c for c in CLASSES if whole[level]["per_class"][c]["support"]]
            covid = metrics["per_class"]["Covid_19"]
            predicted_covid = np.array(metrics["confusion_matrix"])[:, 0].sum()
            values[level, "accuracy"].append(metrics["accuracy"])
            if all(metrics["per_class"][c]["support"] for c in present):
                values[level, "macro_f1"].append(metrics["macro_avg"]["f1"])
            if covid["support"]:
                values[level, "covid_sensitivity"].append(covid["recall"])
            if predicted_covid:
                values[level, "covid_ppv"].append(covid["precision"])
    return {key: (*np.percentile(found, [2.5, 97.5]), len(found)) for key, found in values.items()}


@pytest.mark.parametrize("chunk_cells", [bootstrap.CHUNK_CELLS, 25])  # one block, many blocks
def test_intervals_equal_a_slow_loop_over_resampled_patients(monkeypatch, chunk_cells):
    monkeypatch.setattr(bootstrap, "CHUNK_CELLS", chunk_cells)
    rng = np.random.default_rng(3)
    # 9 patients, two with COVID-19 (so some resamples draw none), p1 with a COVID-19 and a
    # normal study, p4 with two pneumonia studies; 2-4 slices a study.
    plan = {
        "p0": [0], "p1": [0, 1], "p2": [1], "p3": [1, 1], "p4": [2, 2],
        "p5": [2], "p6": [1], "p7": [2], "p8": [1],
    }  # fmt: skip
    y_true, studies, patients = [], [], []
    for patient, labels in plan.items():
        for number, label in enumerate(labels):
            count = int(rng.integers(2, 5))
            y_true += [label] * count
            studies += [f"{patient}/s{number}"] * count
            patients += [patient] * count
    y_true = np.array(y_true)
    probs = rng.dirichlet(np.ones(3), size=len(y_true))
    probs[np.arange(len(y_true)), y_true] += rng.random(len(y_true))  # mostly right
    probs /= probs.sum(axis=1, keepdims=True)

    result = evaluate_predictions(
        y_true, probs, studies, CLASSES, "top-mean", patients, resamples=300, seed=5
    )
    expected = slow_intervals(y_true, probs, studies, patients, 300, 5, "top-mean")
    used = []
    for (level, metric), (low, high, count) in expected.items():
        found = result["intervals"]["levels"][level][metric]
        assert (found["low"], found["high"]) == pytest.approx((low, high), abs=1e-12)
        assert found["resamples_used"] == count
        used.append(count)
    assert min(used) < 300  # the case of a resample without COVID-19 was met
    for level in ("slice", "study", "patient"):
        metrics, found = result[level], result["intervals"]["levels"][level]
        assert found["accuracy"]["value"] == pytest.approx(metrics["accuracy"])
        assert found["macro_f1"]["value"] == pytest.approx(metrics["macro_avg"]["f1"])
        assert found["covid_sensitivity"]["value"] == pytest.approx(metrics["covid_sensitivity"])
    assert result["counts"] == {
        "slices": len(y_true), "studies": 12, "patients": 9, "patient_cases": 10,
    }  # fmt: skip


def test_two_patients_one_right_one_wrong_by_hand():
    # A (COVID-19) is read right, B (Normal) as Pneumonia. A resample is AA, AB, BA or BB,
    # each with probability 1/4: slice accuracy 1, 1/2, 1/2, 0, so the 95 % interval is
    # [0, 1]. COVID-19 sensitivity and PPV are 1 wherever A is drawn and undefined in BB
    # (about 250 resamples left out); macro F1 needs both classes, so only AB and BA count
    # (about 500), and is (1 + 0 + 0) / 3 there.
    y_true = np.array([0, 1])
    result = evaluate_predictions(y_true, one_hot([0, 2]), ["a", "b"], CLASSES, "mean", ["A", "B"])
    levels = result["intervals"]["levels"]
    for level in ("slice", "study", "patient"):
        assert interval(result, level, "accuracy") == (0.0, 1.0)
        assert levels[level]["accuracy"]["resamples_used"] == 1000
        for metric in ("covid_sensitivity", "covid_ppv"):
            assert interval(result, level, metric) == (1.0, 1.0)
            assert 700 < levels[level][metric]["resamples_used"] < 800
        assert interval(result, level, "macro_f1") == pytest.approx((1 / 3, 1 / 3))
        assert 440 < levels[level]["macro_f1"]["resamples_used"] < 560


def test_a_perfect_classifier_has_intervals_of_one():
    y_true = np.repeat([0, 1, 2, 0, 1, 2], 3)
    keys = [f"p{i // 3}" for i in range(len(y_true))]
    result = evaluate_predictions(y_true, one_hot(list(y_true)), keys, CLASSES, "top-mean", keys)
    for level, metrics in result["intervals"]["levels"].items():
        for metric, found in metrics.items():
            assert (found["value"], found["low"], found["high"]) == (1.0, 1.0, 1.0), (level, metric)
        # 6 patients: about 9 % of resamples draw no COVID-19 case and 26 % miss a class
        assert metrics["accuracy"]["resamples_used"] == 1000
        assert 850 < metrics["covid_sensitivity"]["resamples_used"] < 960
        assert 650 < metrics["macro_f1"]["resamples_used"] < 820


def test_intervals_widen_with_fewer_patients():
    # the same 80 % of patients read right, three slices each
    y_true, probs, studies, patients = patients_with_slices([True] * 16 + [False] * 4, 3)
    few = evaluate_predictions(y_true, probs, studies, patient_keys=patients)
    y_true, probs, studies, patients = patients_with_slices([True] * 160 + [False] * 40, 3)
    many = evaluate_predictions(y_true, probs, studies, patient_keys=patients)
    for level in ("slice", "study", "patient"):
        assert few[level]["accuracy"] == many[level]["accuracy"] == 0.8
        assert width(few, level) > 2 * width(many, level)  # about sqrt(10) wider
        low, high = interval(many, level, "accuracy")
        assert low < 0.8 < high


def test_resampling_is_by_patient_not_by_slice():
    # 30 patients of 10 slices: a patient's slices are all right or all wrong, so the data
    # holds 30 observations, not 300. Resampling slices as if independent (each slice its
    # own patient) gives an interval about sqrt(10) too narrow.
    correct = [True, True, False] * 10
    y_true, probs, studies, patients = patients_with_slices(correct, 10)
    by_patient = evaluate_predictions(y_true, probs, studies, CLASSES, "mean", patients)
    slice_ids = [f"slice{i}" for i in range(len(y_true))]
    naive = evaluate_predictions(y_true, probs, slice_ids, CLASSES, "mean", slice_ids)
    assert by_patient["slice"]["accuracy"] == naive["slice"]["accuracy"] == pytest.approx(2 / 3)
    assert by_patient["intervals"]["units"] == 30 and naive["intervals"]["units"] == 300
    assert width(by_patient, "slice") > 2 * width(naive, "slice")


def test_a_patient_with_studies_of_two_classes_is_one_case_per_class():
    # P1 has a COVID-19 study (read right) and a normal study (read as pneumonia); P2 one
    # normal study read right.
    y_true = np.array([0, 0, 1, 1, 1, 1])
    probs = one_hot([0, 0, 2, 2, 1, 1])
    studies = ["c1", "c1", "n1", "n1", "n2", "n2"]
    result = evaluate_predictions(y_true, probs, studies, CLASSES, "mean", ["P1"] * 4 + ["P2"] * 2)
    assert result["counts"] == {"slices": 6, "studies": 3, "patients": 2, "patient_cases": 3}
    assert result["patient"]["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert result["split_by"] == "patient"


def test_patient_cases_aggregate_all_their_studies_with_the_node_rule():
    rng = np.random.default_rng(11)
    y_true = np.array([2, 2, 2, 2, 2, 0, 0])
    probs = rng.dirichlet(np.ones(3), size=7)
    studies = ["s1", "s1", "s2", "s2", "s2", "s3", "s3"]  # P has two pneumonia studies
    result = evaluate_predictions(
        y_true, probs, studies, CLASSES, "top-mean", ["P"] * 5 + ["Q"] * 2
    )
    cases = [aggregate(probs[:5], CLASSES, "top-mean")[1], aggregate(probs[5:], CLASSES)[1]]
    assert result["patient"] == classification_metrics(np.array([2, 0]), np.array(cases))
    assert result["counts"]["patient_cases"] == 2 and result["study"]["n"] == 3


@pytest.mark.parametrize(
    ("studies", "patients", "split_by", "message"),
    [
        (
            ["s1", "s1", "s2"],
            ["A", "B", "B"],
            None,
            "study 's1' has slices of two patients: 'A' and 'B'",
        ),
        (["s1", "s1", "s2"], ["A", "A"], None, "patient_keys has 2 entries for 3 slices"),
        (
            ["s1", "s1", "s2"],
            ["A", "A", "B"],
            "study",
            "split_by must be one of patient, image, got 'study'",
        ),
    ],
)
def test_bad_patient_inputs_are_rejected(studies, patients, split_by, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate_predictions(
            np.array([0, 0, 1]), one_hot([0, 0, 1]), studies, CLASSES, "mean", patients, split_by
        )


def test_a_split_by_image_says_so(tmp_path):
    y_true = np.array([0, 0, 1, 1, 2, 2])
    keys = [f"Covid_19/img{i}" for i in range(6)]  # class folders without a patient pattern
    result = evaluate_predictions(y_true, one_hot([0, 1, 1, 1, 2, 2]), keys, CLASSES, "mean", keys)
    assert result["split_by"] == result["intervals"]["unit"] == "image"
    [_, markdown_file, *_] = write_report(result, tmp_path)
    markdown = markdown_file.read_text()
    assert (
        "**Split by image.** The data has no patient keys: every image is its own patient"
        in markdown
    )
    assert "bootstrap over the 6 images" in markdown
    summary = summary_text(result)
    assert "95% intervals by bootstrap over 6 images" in summary
    assert "\nsplit by image: The data has no patient keys" in summary
    assert "slices of one patient may be in both training and test" in summary


def test_a_split_by_patient_has_no_image_note(result):
    assert result["split_by"] == "patient"
    assert "no patient keys" not in report_markdown(result)
    assert "no patient keys" not in summary_text(result)
    # the caller knows better than the evaluated slices: a run split by image stays so
    y_true, probs, keys = np.array([0, 0]), one_hot([0, 0]), ["a", "a"]
    told = evaluate_predictions(y_true, probs, keys, CLASSES, "mean", keys, split_by="image")
    assert told["split_by"] == "image"


def test_interval_table_and_summary_show_value_low_and_high(tmp_path):
    y_true, probs, studies, patients = patients_with_slices([True] * 15 + [False] * 5, 2)
    result = evaluate_predictions(y_true, probs, studies, CLASSES, "mean", patients)
    markdown = report_markdown(result)
    low, high = interval(result, "slice", "accuracy")
    study_low, study_high = interval(result, "study", "accuracy")
    assert "## Confidence intervals (95%)" in markdown
    assert "| metric | slice | study (mean) | patient |" in markdown
    assert (
        f"| accuracy | 0.7500 [{low:.4f}, {high:.4f}] | 0.7500 [{study_low:.4f}, "
        f"{study_high:.4f}] | 0.7500 [{study_low:.4f}, {study_high:.4f}] |"
    ) in markdown
    # all true COVID-19, nothing predicted otherwise: sensitivity defined everywhere
    assert f"| COVID-19 sensitivity | 0.7500 [{low:.4f}, {high:.4f}] |" in markdown
    assert "## Patient level (mean, one case per patient and class)" in markdown
    assert summary_text(result).startswith(
        f"evaluation: slice accuracy 0.750 [{low:.3f}, {high:.3f}] (40 slices), "
        f"study accuracy 0.750 [{study_low:.3f}, {study_high:.3f}] (20 studies), "
        f"patient accuracy 0.750 [{study_low:.3f}, {study_high:.3f}] (20 cases of 20 patients)"
    )


def test_undefined_metrics_are_null_in_json_not_nan(tmp_path):
    # no COVID-19 case and no COVID-19 prediction: sensitivity and PPV undefined everywhere
    y_true = np.array([1, 1, 2, 2])
    result = evaluate_predictions(
        y_true, one_hot([1, 2, 2, 2]), ["a", "a", "b", "b"], CLASSES, "mean", ["A", "A", "B", "B"]
    )
    found = result["intervals"]["levels"]["slice"]["covid_sensitivity"]
    assert found == {"value": None, "low": None, "high": None, "resamples_used": 0}
    [json_file, markdown_file, *_] = write_report(result, tmp_path)
    text = json_file.read_text()
    assert "NaN" not in text and json.loads(text) == result
    assert "| COVID-19 PPV | n/a [n/a, n/a] (0 of 1000 resamples) |" in markdown_file.read_text()


def test_bootstrap_of_ten_thousand_slices_takes_well_under_a_second():
    rng = np.random.default_rng(0)
    patient = rng.integers(0, 1000, 10_000)
    labels = rng.integers(0, 3, 1000)[patient]
    predicted = np.where(rng.random(10_000) < 0.8, labels, rng.integers(0, 3, 10_000))
    start = time.perf_counter()
    found = bootstrap.bootstrap_intervals({"slice": (labels, predicted, patient)}, 1000, 3, 0)
    assert time.perf_counter() - start < 1.5  # about 0.05 s on one core
    accuracy = found["levels"]["slice"]["accuracy"]
    assert accuracy["low"] < accuracy["value"] < accuracy["high"]
    assert accuracy["high"] - accuracy["low"] < 0.03


# ---------------------------------------------------------------- a prepared run, end to end


def write_class_folders(root, per_class: int, slices: int) -> None:
    """Random 48 x 48 PNGs named ``<patient>_<slice>.png`` in the seed paper's folders."""
    rng = np.random.default_rng(0)
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for patient in range(per_class):
            for number in range(slices):
                pixels = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                Image.fromarray(pixels).save(root / label / f"{label}{patient}_{number}.png")


@pytest.mark.parametrize(
    ("pattern", "split_by"), [(None, "image"), (r"^([A-Za-z_]+\d+)_", "patient")]
)
def test_train_evaluate_reports_patients_or_says_the_split_is_by_image(
    tmp_path, capsys, pattern, split_by
):
    import keras

    from training.samples import read_samples

    write_class_folders(tmp_path / "images", per_class=7, slices=3)
    run = tmp_path / "run"
    prepare_args = ["train", "prepare", "--folders", str(tmp_path / "images"), "--out", str(run)]
    prepare_args += ["--image-size", "32", "--no-balance"]
    assert main(prepare_args + (["--patient-pattern", pattern] if pattern else [])) == 0
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((32, 32, 1)), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")]
    )
    (run / "fit").mkdir()
    model.save(run / "fit" / "best.keras")
    capsys.readouterr()

    assert main(["train", "evaluate", str(run), "--split", "val"]) == 0

    printed = capsys.readouterr().out
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    val = [s for s in read_samples(run / "samples.csv") if s.split == "val"]
    patients = len({s.patient for s in val})
    assert evaluation["split_by"] == split_by
    assert evaluation["counts"]["patients"] == evaluation["patients"] == patients
    assert evaluation["intervals"]["units"] == patients
    assert evaluation["counts"]["slices"] == len(val) == patients * (3 if pattern else 1)
    unit = "images" if split_by == "image" else "patients"
    assert f"95% intervals by bootstrap over {patients} {unit}" in printed
    markdown = (run / "evaluation" / "evaluation.md").read_text()
    assert ("no patient keys" in printed) == ("no patient keys" in markdown) == (pattern is None)
    for level in ("slice", "study", "patient"):
        found = evaluation["intervals"]["levels"][level]["accuracy"]
        assert found["low"] <= found["value"] <= found["high"]
