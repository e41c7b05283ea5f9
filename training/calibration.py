"""Calibration and the operating point, fitted on the validation split at ``ainode train
evaluate`` and carried by the bundle (applied by :mod:`node.analysis.calibration`).

Slices: one temperature on the model's log-probabilities, minimising the negative
log-likelihood of the validation slices (Guo et al. 2017). Studies: the calibrated slices are
aggregated by the node's rule (:func:`node.analysis.result.aggregate`), then a second
temperature is fitted on the validation studies, so the study probability the worklist and the
SR show is calibrated too. A weak prior on the temperature (``log T ~ N(0, 1)``) keeps a
validation split the model gets all right (often, with a few dozen studies) from driving the
temperature to 0 and the answers to a certainty no finite sample supports.

Operating point: the highest COVID-19 threshold on the calibrated study probability whose
validation sensitivity reaches the target; the test split's sensitivity, specificity and PPV
at that threshold are recorded beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from node.analysis.calibration import (
    COVID_CLASS,
    METHOD,
    TEMPERATURE_RANGE,
    decide_at_threshold,
    temperature_scale,
)
from node.analysis.result import CLASSES
from training.evaluate import (
    confusion_matrix,
    expected_calibration_error,
    reliability_bins,
    study_level,
)
from training.evaluation_report import reliability_figure, save_figure

_FLOOR = 1e-12
FIGURES = {"slice": "reliability_slices.png", "study": "reliability_studies.png"}


def fit_temperature(probabilities, labels, prior_sd: float = 1.0) -> float:
    """The temperature minimising the NLL of ``labels`` under ``softmax(log(p) / T)``, with a
    weak log-normal prior on ``T`` (``log T ~ N(0, prior_sd²)``, a MAP estimate): on many
    samples the NLL alone decides; on a few dozen studies that the model gets all right, the
    NLL alone keeps falling as ``T`` goes to 0, and the prior stops it short of certainty."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _FLOOR, None))
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        nll = -log_softmax(logits / math.exp(log_t), axis=1)[rows, labels].mean()
        return float(nll + log_t**2 / (2 * prior_sd**2 * len(labels)))

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(found.x))


def negative_log_likelihood(probabilities, labels) -> float:
    """Mean NLL of ``labels`` under ``probabilities`` (floored at 1e-12)."""
    rows = np.arange(len(labels))
    return float(-np.log(np.clip(np.asarray(probabilities)[rows, labels], _FLOOR, None)).mean())


def choose_threshold(scores, positive, target_sensitivity: float) -> float:
    """The highest threshold ``t`` with ``mean(scores[positive] >= t) >= target_sensitivity``,
    placed halfway down to the next lower score (so a score a hair under the last positive
    kept is not a different answer)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    ranked = np.sort(scores[positive])[::-1]
    if len(ranked) == 0:
        raise ValueError("no positive studies to choose a threshold on")
    keep = max(1, math.ceil(round(target_sensitivity * len(ranked), 9)))
    threshold = float(ranked[keep - 1])
    below = scores[scores < threshold]
    return (threshold + float(below.max())) / 2 if len(below) else threshold


def binary_figures(scores, positive, threshold: float) -> dict:
    """Counts, sensitivity, specificity and PPV of ``scores >= threshold`` (None where
    undefined)."""
    called = np.asarray(scores) >= threshold
    positive = np.asarray(positive, dtype=bool)
    tp, fp = int((called & positive).sum()), int((called & ~positive).sum())
    fn, tn = int((~called & positive).sum()), int((~called & ~positive).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "studies": len(positive),
        "positives": tp + fn,
        "negatives": tn + fp,
        "true_positives": tp,
        "false_negatives": fn,
        "true_negatives": tn,
        "false_positives": fp,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
    }


def calibration_figures(labels, before, after) -> dict:
    """ECE and NLL before and after, and the reliability bins of both."""
    return {
        "n": int(len(labels)),
        "ece_before": expected_calibration_error(labels, before),
        "ece_after": expected_calibration_error(labels, after),
        "nll_before": negative_log_likelihood(before, labels),
        "nll_after": negative_log_likelihood(after, labels),
        "bins_before": reliability_bins(labels, before),
        "bins_after": reliability_bins(labels, after),
    }


def fit_calibration(val: tuple, test: tuple, rule: str, target_sensitivity: float) -> tuple:
    """``(calibration, operating_point, report)`` from validation and test predictions, each
    ``(slice probabilities, labels, study keys)``."""
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    val_probs, val_labels, _studies = val
    slice_t = fit_temperature(val_probs, val_labels)
    levels = {}
    study_sets = {}
    for name, (probs, labels, studies) in (("validation", val), ("test", test)):
        calibrated = temperature_scale(probs, slice_t)
        study_labels, raw, _keys = study_level(labels, probs, studies, rule)
        _labels, aggregated, _keys = study_level(labels, calibrated, studies, rule)
        study_sets[name] = (study_labels, raw, aggregated)
        levels.setdefault("slice", {})[name] = calibration_figures(labels, probs, calibrated)
    val_study_labels, _raw, val_aggregated = study_sets["validation"]
    study_t = fit_temperature(val_aggregated, val_study_labels)
    study_probs = {}
    for name, (labels, raw, aggregated) in study_sets.items():
        study_probs[name] = temperature_scale(aggregated, study_t)
        levels.setdefault("study", {})[name] = calibration_figures(labels, raw, study_probs[name])
    calibration = {
        "method": METHOD,
        "fitted_on": "validation split",
        "slice": {"temperature": slice_t, "slices": int(len(val_labels))},
        "study": {"temperature": study_t, "rule": rule, "studies": int(len(val_study_labels))},
    }
    report = {
        "slice": {"temperature": slice_t, **levels["slice"]},
        "study": {"temperature": study_t, "rule": rule, **levels["study"]},
    }
    covid = CLASSES.index(COVID_CLASS)
    val_scores, test_scores = study_probs["validation"][:, covid], study_probs["test"][:, covid]
    test_study_labels = study_sets["test"][0]
    if not (val_study_labels == covid).any():
        report["operating_point_not_fitted"] = "no COVID-19 study in the validation split"
        return calibration, {}, report
    threshold = choose_threshold(val_scores, val_study_labels == covid, target_sensitivity)
    operating_point = {
        "class": COVID_CLASS,
        "rule": rule,
        "threshold": threshold,
        "target_sensitivity": float(target_sensitivity),
        "chosen_on": "validation studies",
        "validation": binary_figures(val_scores, val_study_labels == covid, threshold),
        "test": binary_figures(test_scores, test_study_labels == covid, threshold),
    }
    report["operating_point"] = operating_point
    answered = [
        CLASSES.index(decide_at_threshold(row, CLASSES, threshold)) for row in study_probs["test"]
    ]
    matrix = confusion_matrix(test_study_labels, np.array(answered, dtype=np.int64), len(CLASSES))
    report["served_test"] = {
        "classes": list(CLASSES),
        "n": int(len(answered)),
        "accuracy": float(np.trace(matrix) / len(answered)),
        "confusion_matrix": matrix.tolist(),
    }
    return calibration, operating_point, report


def write_figures(report: dict, out: Path) -> list[Path]:
    """Reliability diagrams of the test split before and after calibration, per level."""
    files = []
    for level, name in FIGURES.items():
        test = report[level]["test"]
        curves = {
            "uncalibrated": test["bins_before"],
            f"calibrated (T = {report[level]['temperature']:.2f})": test["bins_after"],
        }
        title = (
            f"Reliability, test {level}s (ECE {test['ece_before']:.3f} → {test['ece_after']:.3f})"
        )
        files.append(save_figure(reliability_figure(curves, title), out / name))
    report["figures"] = [path.name for path in files]
    return files


def fit_on_validation(
    model, run, rule: str, target_sensitivity: float, out: Path, progress=None, test=None
) -> tuple[dict, dict, dict, list[Path]]:
    """``(calibration, operating_point, report, files)`` for ``run``'s model: what
    ``model.json`` carries, what the evaluation report shows, the files written in ``out``.

    ``test``: the test split's ``(probabilities, labels, samples.csv rows)`` when already
    predicted. Empty dicts: nothing fitted (the bundle then answers uncalibrated).
    """
    from training.scoring import predict_split  # scoring calls this module

    samples = run.samples()

    def with_studies(probs, labels, rows):
        return probs, labels, [samples[row].study for row in rows]

    try:
        val = with_studies(*predict_split(model, run, "val", progress=progress))
    except ValueError as exc:  # an empty validation split
        return {}, {}, {"not_fitted": str(exc)}, []
    test = with_studies(*(test or predict_split(model, run, "test", progress=progress)))
    calibration, operating_point, report = fit_calibration(val, test, rule, target_sensitivity)
    return calibration, operating_point, report, write_figures(report, Path(out))
