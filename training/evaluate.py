"""Evaluation of a classifier: slice-, study- and patient-level metrics and calibration bins.

The report files written from these metrics live in :mod:`training.evaluation_report`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from node.analysis.result import CLASSES, aggregate
from training.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_intervals

COVID_CLASS = "Covid_19"
SPLIT_UNITS = ("patient", "image")


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ``numerator / denominator``, 0.0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _check_inputs(y_true, probs, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(labels, probabilities)`` arrays; ValueError naming the bad argument."""
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be at least two distinct names, got {tuple(classes)}")
    labels = np.asarray(y_true)
    scores = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"y_true holds class indices outside 0..{len(classes) - 1}")
    if scores.shape != (len(labels), len(classes)):
        raise ValueError(
            f"probs must have shape ({len(labels)}, {len(classes)}), got {scores.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("probs holds NaN or infinite values")
    return labels.astype(np.int64), scores


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    _, inverse, counts = np.unique(values[order], return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based position where each tie group starts
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = first[inverse] + (counts[inverse] + 1) / 2.0
    return ranks


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve: the Mann-Whitney U over positive-negative pairs (ties 1/2).

    Returns None when ``positive`` has no positives or no negatives.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def classification_metrics(y_true, probs, classes: Sequence[str] = CLASSES) -> dict:
    """Confusion matrix, per-class and averaged precision/recall/F1, accuracy and ROC AUC.

    Parameters
    ----------
    y_true : array of int, shape (N,)
        True class indices into ``classes``.
    probs : array of float, shape (N, C)
        Scores per class; the prediction is their argmax.
    classes : tuple of str
        Class names in column order.

    Returns
    -------
    dict
        JSON-serialisable: ``classes``, ``n``, ``confusion_matrix`` (rows true, columns
        predicted), ``per_class`` (name -> precision, recall, f1, support, auc), ``accuracy``,
        ``macro_avg`` and ``weighted_avg`` (precision, recall, f1), ``covid_sensitivity`` and
        ``covid_ppv`` (None without a ``Covid_19`` class), ``macro_auc`` (mean of the defined
        per-class AUCs, None when none is). Zero divisions give 0.0; an AUC is None when the
        class has no positives or no negatives in ``y_true``.
    """
    classes = tuple(classes)
    labels, scores = _check_inputs(y_true, probs, classes)
    matrix = confusion_matrix(labels, np.argmax(scores, axis=1), len(classes))
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = _safe_ratio(tp, matrix.sum(axis=0))
    recall = _safe_ratio(tp, support)
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    aucs = [roc_auc(labels == i, scores[:, i]) for i in range(len(classes))]
    defined = [a for a in aucs if a is not None]
    weights = support / support.sum()
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "auc": aucs[i],
        }
        for i, name in enumerate(classes)
    }
    covid = per_class.get(COVID_CLASS)
    return {
        "classes": list(classes),
        "n": int(len(labels)),
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "accuracy": float(tp.sum() / len(labels)),
        "macro_avg": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        },
        "weighted_avg": {
            "precision": float(weights @ precision),
            "recall": float(weights @ recall),
            "f1": float(weights @ f1),
        },
        "covid_sensitivity": covid["recall"] if covid else None,
        "covid_ppv": covid["precision"] if covid else None,
        "macro_auc": float(np.mean(defined)) if defined else None,
    }


def study_level(
    y_true,
    probs,
    study_keys: Sequence[str],
    rule: str = "top-mean",
    classes: Sequence[str] = CLASSES,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-study labels and probabilities, slices aggregated as the node does.

    Studies come in order of first appearance; each study's probabilities are
    ``node.analysis.result.aggregate(its slices, classes, rule)``. A study whose slices carry
    different true labels is a ValueError naming the study.
    """
    classes = tuple(classes)
    labels, scores = _check_inputs(y_true, probs, classes)
    keys = [str(k) for k in study_keys]
    if len(keys) != len(labels):
        raise ValueError(f"study_keys has {len(keys)} entries for {len(labels)} slices")
    rows: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    study_labels, study_probs = [], []
    for key, index in rows.items():
        found = np.unique(labels[index])
        if len(found) > 1:
            names = ", ".join(classes[j] for j in found)
            raise ValueError(f"study {key!r} has slices with different true labels: {names}")
        study_labels.append(int(found[0]))
        study_probs.append(aggregate(scores[index], classes, rule)[1])
    return np.array(study_labels, dtype=np.int64), np.array(study_probs), list(rows)


def evaluate_predictions(
    y_true,
    probs,
    study_keys: Sequence[str],
    classes: Sequence[str] = CLASSES,
    rule: str = "top-mean",
    patient_keys: Sequence[str] | None = None,
    split_by: str | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Slice-, study- and patient-level metrics with 95 % bootstrap intervals over patients.

    Parameters
    ----------
    y_true, probs, classes
        As for :func:`classification_metrics`, one row per slice.
    study_keys, patient_keys
        The study and the patient of each slice; a study belongs to one patient. Without
        ``patient_keys`` each study is taken as its own patient.
    rule
        How a study's (and a patient's) slices are aggregated, as the node does.
    split_by
        ``"patient"`` or ``"image"``: how the data was split into train/val/test. By default
        ``"image"`` when every slice is its own patient (no two slices share a patient key,
        as with class folders read without a patient pattern), else ``"patient"``.
    resamples, seed
        Of the bootstrap (:func:`training.bootstrap.bootstrap_intervals`).

    Returns
    -------
    dict
        ``slice``, ``study`` and ``patient`` (:func:`classification_metrics` each), ``rule``,
        ``split_by``, ``counts`` (slices, studies, patients, patient_cases) and ``intervals``
        (accuracy, macro F1, COVID-19 sensitivity and PPV at each level with their 95 %
        percentile interval over ``resamples`` draws of patients with replacement, each
        draw taking all of a patient's slices and studies).

    The patient level counts one case per patient *and true class*: a patient's slices of one
    class are aggregated with ``rule`` like a study's, so a patient with a COVID-19 study and
    a normal study is one COVID-19 case and one normal case, each judged on its own slices.
    One label per patient would need a rule for which finding wins, and the node answers per
    study; the bootstrap still draws the patient, so both cases always travel together.
    """
    classes = tuple(classes)
    labels, scores = _check_inputs(y_true, probs, classes)
    study_true, study_probs, studies = study_level(labels, scores, study_keys, rule, classes)
    study_keys = [str(k) for k in study_keys]
    patients = study_keys if patient_keys is None else [str(k) for k in patient_keys]
    if len(patients) != len(labels):
        raise ValueError(f"patient_keys has {len(patients)} entries for {len(labels)} slices")
    names, patient = np.unique(patients, return_inverse=True)
    if split_by is None:
        split_by = "image" if len(names) == len(labels) else "patient"
    elif split_by not in SPLIT_UNITS:
        raise ValueError(f"split_by must be one of {', '.join(SPLIT_UNITS)}, got {split_by!r}")
    study_patient = _patient_of_each_study(study_keys, patient, names, studies)
    # A case is a (patient, true class) pair, keyed by one integer so study_level can group it.
    case_keys = [str(k) for k in patient * len(classes) + labels]
    case_true, case_probs, cases = study_level(labels, scores, case_keys, rule, classes)
    case_patient = np.array([int(k) // len(classes) for k in cases], dtype=np.int64)
    intervals = bootstrap_intervals(
        {
            "slice": (labels, scores.argmax(axis=1), patient),
            "study": (study_true, study_probs.argmax(axis=1), study_patient),
            "patient": (case_true, case_probs.argmax(axis=1), case_patient),
        },
        len(names),
        len(classes),
        classes.index(COVID_CLASS) if COVID_CLASS in classes else None,
        resamples,
        seed,
    )
    return {
        "slice": classification_metrics(labels, scores, classes),
        "study": classification_metrics(study_true, study_probs, classes),
        "patient": classification_metrics(case_true, case_probs, classes),
        "rule": rule,
        "split_by": split_by,
        "counts": {
            "slices": int(len(labels)),
            "studies": len(studies),
            "patients": len(names),
            "patient_cases": len(cases),
        },
        "intervals": {**intervals, "unit": split_by},
    }


def _patient_of_each_study(
    study_keys: list[str], patient: np.ndarray, names: np.ndarray, studies: list[str]
) -> np.ndarray:
    """The patient index of each of ``studies``; a study of two patients is a ValueError."""
    owner: dict[str, int] = {}
    for key, index in zip(study_keys, patient.tolist(), strict=True):
        if owner.setdefault(key, index) != index:
            raise ValueError(
                f"study {key!r} has slices of two patients: "
                f"{str(names[owner[key]])!r} and {str(names[index])!r}"
            )
    return np.array([owner[key] for key in studies], dtype=np.int64)


# ---------------------------------------------------------------- calibration

CALIBRATION_BINS = 15


def reliability_bins(y_true, probs, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Top-label reliability: for each of ``bins`` equal-width confidence bins that holds
    predictions, their count, mean confidence and accuracy (Guo et al. 2017)."""
    labels, scores = _check_inputs(y_true, probs, [str(i) for i in range(np.shape(probs)[1])])
    confidence = scores.max(axis=1)
    correct = scores.argmax(axis=1) == labels
    # bin i holds (i/bins, (i+1)/bins]; a confidence of 0 falls in the first
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    found = []
    for i in range(bins):
        chosen = index == i
        if chosen.any():
            found.append(
                {
                    "low": i / bins,
                    "high": (i + 1) / bins,
                    "count": int(chosen.sum()),
                    "confidence": float(confidence[chosen].mean()),
                    "accuracy": float(correct[chosen].mean()),
                }
            )
    return found


def expected_calibration_error(y_true, probs, bins: int = CALIBRATION_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    found = reliability_bins(y_true, probs, bins)
    total = sum(b["count"] for b in found)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in found) / total)
