"""Evaluation of a classifier: slice- and study-level metrics and the report files."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from node import atomic
from node.analysis.result import CLASSES, aggregate

COVID_CLASS = "Covid_19"
HISTORY_METRICS = ("accuracy", "loss")


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
) -> dict:
    """Slice- and study-level metrics: ``{"slice", "study", "rule", "counts"}``."""
    study_true, study_probs, keys = study_level(y_true, probs, study_keys, rule, classes)
    return {
        "slice": classification_metrics(y_true, probs, classes),
        "study": classification_metrics(study_true, study_probs, classes),
        "rule": rule,
        "counts": {"slices": int(len(study_keys)), "studies": len(keys)},
    }


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


def reliability_figure(curves: dict[str, list[dict]], title: str) -> Figure:
    """Accuracy against confidence per bin for each labelled curve (``reliability_bins``),
    the diagonal being perfect calibration; bin counts below."""
    figure = Figure(figsize=(5.5, 6.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes, counts = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    width = 1.0 / CALIBRATION_BINS / (len(curves) + 1)
    for position, (label, found) in enumerate(curves.items()):
        confidence = [b["confidence"] for b in found]
        axes.plot(confidence, [b["accuracy"] for b in found], marker="o", label=label)
        centres = np.array([b["low"] for b in found]) + width * (position + 0.5)
        counts.bar(centres, [b["count"] for b in found], width=width, label=label)
    axes.set(ylabel="accuracy (fraction correct)", title=title, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    counts.set(xlabel="confidence (probability of the predicted class)", ylabel="count")
    counts.set_yscale("symlog")
    return figure


# ---------------------------------------------------------------- report writers


def _number(value: float | None) -> str:
    """A metric as the report shows it (four decimals; ``n/a`` when undefined)."""
    return "n/a" if value is None else f"{value:.4f}"


def _markdown_level(metrics: dict, heading: str) -> list[str]:
    """Markdown section of one level: metric table, headline numbers, confusion matrix."""
    lines = [f"## {heading}", "", "| class | precision | recall | F1-score | support | AUC |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, row in metrics["per_class"].items():
        cells = [_number(row[k]) for k in ("precision", "recall", "f1")]
        lines.append(f"| {name} | {' | '.join(cells)} | {row['support']} | {_number(row['auc'])} |")
    n = metrics["n"]
    lines.append(f"| accuracy | | | {_number(metrics['accuracy'])} | {n} | |")
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        cells = [_number(metrics[key][k]) for k in ("precision", "recall", "f1")]
        auc = _number(metrics["macro_auc"]) if key == "macro_avg" else ""
        lines.append(f"| {label} | {' | '.join(cells)} | {n} | {auc} |")
    lines += [
        "",
        f"- Accuracy: {_number(metrics['accuracy'])}",
        f"- COVID-19 sensitivity: {_number(metrics['covid_sensitivity'])}",
        f"- COVID-19 PPV: {_number(metrics['covid_ppv'])}",
        f"- Macro ROC AUC: {_number(metrics['macro_auc'])}",
        "",
        "Confusion matrix (rows: true class, columns: predicted class):",
        "",
        "| true \\ predicted | " + " | ".join(metrics["classes"]) + " |",
        "|---|" + "---:|" * len(metrics["classes"]),
    ]
    for name, counts in zip(metrics["classes"], metrics["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    return lines + [""]


def report_markdown(result: dict, title: str = "Evaluation") -> str:
    """The Markdown report of an ``evaluate_predictions`` result."""
    counts = result["counts"]
    lines = [
        f"# {title}",
        "",
        f"{counts['slices']} slices from {counts['studies']} studies; study probabilities "
        f"aggregated with the node's `{result['rule']}` rule.",
        "",
    ]
    lines += _markdown_level(result["slice"], "Slice level")
    lines += _markdown_level(result["study"], f"Study level ({result['rule']})")
    calibration = (result.get("trust_report") or {}).get("calibration")
    if calibration:
        lines += _markdown_calibration(calibration)
    return "\n".join(lines)


def _markdown_calibration(report: dict) -> list[str]:
    """Markdown of the calibration and operating-point report (training.calibration)."""
    lines = ["## Calibration (temperature scaling, fitted on the validation split)", ""]
    if report.get("not_fitted"):
        return lines + [f"Not fitted: {report['not_fitted']}", ""]
    lines += [
        "Expected calibration error (ECE, 15 bins; lower is better) before → after:",
        "",
        "| level | temperature | validation ECE | test ECE | test n |",
        "|---|---:|---:|---:|---:|",
    ]
    for level in ("slice", "study"):
        part = report.get(level)
        if not part:
            continue
        val, test = part["validation"], part.get("test") or {}
        cells = [
            f"{part['temperature']:.3f}",
            f"{_number(val['ece_before'])} → {_number(val['ece_after'])}",
            f"{_number(test.get('ece_before'))} → {_number(test.get('ece_after'))}",
            str(test.get("n", "")),
        ]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += ["", "Reliability diagrams: " + ", ".join(report.get("figures", [])), ""]
    point = report.get("operating_point")
    if point:
        val, test = point["validation"], point["test"]
        lines += [
            f"### Operating point ({point['class']}, {point['rule']} studies)",
            "",
            f"- Threshold on the calibrated study probability: {point['threshold']:.4f}, chosen "
            f"on {val['studies']} validation studies for a sensitivity of at least "
            f"{point['target_sensitivity']:.2f}",
            f"- Validation: sensitivity {_number(val['sensitivity'])}, specificity "
            f"{_number(val['specificity'])}",
            f"- Test ({test['studies']} studies): sensitivity {_number(test['sensitivity'])} "
            f"({test['true_positives']}/{test['positives']}), specificity "
            f"{_number(test['specificity'])} ({test['true_negatives']}/{test['negatives']}), "
            f"PPV {_number(test['ppv'])} ({test['true_positives']}/"
            f"{test['true_positives'] + test['false_positives']})",
            "",
        ]
    elif report.get("operating_point_not_fitted"):
        lines += [f"Operating point not fitted: {report['operating_point_not_fitted']}", ""]
    served = report.get("served_test")
    if served:
        lines += [
            "### Test studies as the node answers them (calibrated, operating point)",
            "",
            f"- Accuracy: {_number(served['accuracy'])} of {served['n']} studies",
            "",
            "| true \\ answered | " + " | ".join(served["classes"]) + " |",
            "|---|" + "---:|" * len(served["classes"]),
        ]
        for name, counts in zip(served["classes"], served["confusion_matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
        lines.append("")
    return lines


def _confusion_figure(metrics: dict, title: str) -> Figure:
    """A confusion-matrix heat map with the counts written in each cell."""
    matrix = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    figure = Figure(figsize=(5.5, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    figure.colorbar(image, ax=axes)
    ticks = np.arange(len(classes))
    axes.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes)
    axes.set(xlabel="Predicted class", ylabel="True class", title=title)
    threshold = matrix.max() / 2.0
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if count > threshold else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=colour)
    return figure


def read_history(history_csv: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a CSVLogger-style history as float arrays (blank cells as NaN)."""
    with open(history_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"history {os.fspath(history_csv)!r} has no rows")

    def value(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else np.nan
        except ValueError:
            return np.nan

    return {name: np.array([value(r.get(name)) for r in rows]) for name in rows[0]}


def _history_figure(history: dict[str, np.ndarray], source: str) -> Figure:
    """Accuracy and loss (train and validation) across the epochs of all shards."""
    metrics = [m for m in HISTORY_METRICS if m in history or f"val_{m}" in history]
    if not metrics:
        raise ValueError(f"history {source!r} has none of the columns {HISTORY_METRICS}")
    length = len(next(iter(history.values())))
    epochs = history.get("epoch")
    # Epochs restart when each shard is fitted separately: plot the running count then.
    if epochs is None or np.isnan(epochs).any() or np.any(np.diff(epochs) <= 0):
        x, x_label = np.arange(1, length + 1, dtype=np.float64), "epoch (all shards, in order)"
    else:
        x, x_label = epochs + 1, "epoch"  # Keras counts epochs from 0
    figure = Figure(figsize=(6.0 * len(metrics), 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for position, metric in enumerate(metrics, start=1):
        axes = figure.add_subplot(1, len(metrics), position)
        for column, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if column in history:
                axes.plot(x, history[column], marker=".", label=label)
        shards = history.get("shard")
        if shards is not None:
            for boundary in np.flatnonzero(np.diff(shards) != 0):
                axes.axvline(x[boundary] + 0.5, color="grey", linewidth=0.6, linestyle=":")
        axes.set(xlabel=x_label, ylabel=metric, title=f"{metric.capitalize()} across epochs")
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a figure as PNG atomically."""
    atomic.write_with(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path


def _write_text(path: Path, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    atomic.write_text(path, text)
    return path


def write_report(
    result: dict,
    folder: str | os.PathLike,
    history_csv: str | os.PathLike | None = None,
    title: str = "Evaluation",
) -> list[Path]:
    """Write the evaluation report files into ``folder``; return their paths.

    Writes ``evaluation.json``, ``evaluation.md``, ``confusion_matrix.png`` (slices),
    ``confusion_matrix_study.png`` and, when ``history_csv`` is given, ``history.png``
    (accuracy and loss, train and validation, across epochs).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    paths = [
        _write_text(folder / "evaluation.json", text),
        _write_text(folder / "evaluation.md", report_markdown(result, title)),
        save_figure(
            _confusion_figure(result["slice"], "Slice level"), folder / "confusion_matrix.png"
        ),
        save_figure(
            _confusion_figure(result["study"], f"Study level ({result['rule']})"),
            folder / "confusion_matrix_study.png",
        ),
    ]
    if history_csv is not None:
        history = read_history(history_csv)
        figure = _history_figure(history, os.fspath(history_csv))
        paths.append(save_figure(figure, folder / "history.png"))
    return paths
