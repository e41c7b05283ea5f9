"""Evaluation metrics against hand-computed values, study aggregation and the report files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from node.analysis.result import CLASSES, aggregate
from training.evaluate import (
    classification_metrics,
    evaluate_predictions,
    roc_auc,
    study_level,
    write_report,
)


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
    assert result["counts"] == {"slices": 6, "studies": 4}
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
