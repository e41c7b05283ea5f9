"""The evaluation report: Markdown, the one-line summary and figures of an evaluation result.

The metrics themselves are computed in :mod:`training.evaluate`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from node import atomic
from training.evaluate import CALIBRATION_BINS

SPLIT_BY_IMAGE_NOTE = (
    "The data has no patient keys: every image is its own patient, so the split and the "
    "confidence intervals are by image, and slices of one patient may be in both training "
    "and test (as in the seed paper), which makes these figures optimistic."
)
HISTORY_METRICS = ("accuracy", "loss")


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
        f"{counts['slices']} slices from {counts['studies']} studies of {counts['patients']} "
        f"patients; study and patient probabilities aggregated with the node's "
        f"`{result['rule']}` rule.",
        "",
    ]
    if result["split_by"] == "image":
        lines += [f"**Split by image.** {SPLIT_BY_IMAGE_NOTE}", ""]
    lines += _markdown_intervals(result)
    lines += _markdown_level(result["slice"], "Slice level")
    lines += _markdown_level(result["study"], f"Study level ({result['rule']})")
    lines += _markdown_level(
        result["patient"], f"Patient level ({result['rule']}, one case per patient and class)"
    )
    calibration = (result.get("trust_report") or {}).get("calibration")
    if calibration:
        lines += _markdown_calibration(calibration)
    return "\n".join(lines)


INTERVAL_ROWS = (
    ("accuracy", "accuracy"),
    ("macro F1", "macro_f1"),
    ("COVID-19 sensitivity", "covid_sensitivity"),
    ("COVID-19 PPV", "covid_ppv"),
)


def _with_interval(found: dict, resamples: int, digits: int = 4) -> str:
    """``value [low, high]``, with the resamples used when some were left out."""

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    text = f"{number(found['value'])} [{number(found['low'])}, {number(found['high'])}]"
    used = found["resamples_used"]
    return text if used == resamples else f"{text} ({used} of {resamples} resamples)"


def _markdown_intervals(result: dict) -> list[str]:
    """The table of each headline metric at each level with its bootstrap interval."""
    intervals = result["intervals"]
    unit = "images" if intervals["unit"] == "image" else "patients"
    resamples = intervals["resamples"]
    lines = [
        f"## Confidence intervals ({intervals['confidence']:.0%})",
        "",
        f"Value [low, high]: {intervals['method']} bootstrap over the {intervals['units']} "
        f"{unit}, {resamples} resamples (seed {intervals['seed']}); each resample draws "
        f"{unit} with replacement and takes all of their slices, studies and cases. A "
        "resample where a metric is undefined (no COVID-19 case drawn, or for PPV no COVID-19 "
        "prediction) is left out of that metric, and the count used is shown.",
        "",
        f"| metric | slice | study ({result['rule']}) | patient |",
        "|---|---:|---:|---:|",
    ]
    levels = intervals["levels"]
    for label, metric in INTERVAL_ROWS:
        cells = [_with_interval(levels[level][metric], resamples) for level in levels]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def summary_text(result: dict) -> str:
    """What ``ainode train evaluate`` prints: accuracy at each level and the slice-level
    COVID-19 sensitivity and PPV, each with its interval, and the note on a split by image."""
    intervals = result["intervals"]
    levels, resamples = intervals["levels"], intervals["resamples"]
    counts = result["counts"]
    unit = "images" if intervals["unit"] == "image" else "patients"

    def figure(level: str, metric: str) -> str:
        return _with_interval(levels[level][metric], resamples, digits=3)

    text = (
        f"{result.get('split', 'evaluation')}: "
        f"slice accuracy {figure('slice', 'accuracy')} ({counts['slices']} slices), "
        f"study accuracy {figure('study', 'accuracy')} ({counts['studies']} studies), "
        f"patient accuracy {figure('patient', 'accuracy')} ({counts['patient_cases']} cases "
        f"of {counts['patients']} patients), "
        f"slice COVID-19 sensitivity {figure('slice', 'covid_sensitivity')}, "
        f"PPV {figure('slice', 'covid_ppv')}; "
        f"{intervals['confidence']:.0%} intervals by bootstrap over {intervals['units']} {unit}"
    )
    if result["split_by"] == "image":
        text += f"\nsplit by image: {SPLIT_BY_IMAGE_NOTE}"
    return text


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
