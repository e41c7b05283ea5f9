"""Percentile bootstrap confidence intervals of classification metrics, resampling patients.

Slices of one patient are not independent observations: they share the anatomy, the scanner
and usually the answer. The bootstrap therefore draws *patients* with replacement and takes
every slice, study and patient case of each drawn patient along (a cluster bootstrap), so an
interval reflects how many patients were tested, not how many slices.

The work is a matrix product: each level's items are counted per patient and confusion-matrix
cell, and a block of resamples (how often each patient is drawn) times those counts gives the
resamples' confusion matrices, from which the metrics follow without a Python loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

METRICS = ("accuracy", "macro_f1", "covid_sensitivity", "covid_ppv")
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
# resample x patient draw counts held at once: bounds memory (16 MB) for any number of patients
CHUNK_CELLS = 2_000_000


def resample_counts(n_units: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """How often each unit (patient) is drawn in each resample, in blocks of rows.

    Each resample draws ``n_units`` units uniformly with replacement; the blocks, stacked,
    are a ``(resamples, n_units)`` integer array whose rows each sum to ``n_units``. The same
    arguments always give the same draws.
    """
    if n_units < 1:
        raise ValueError(f"n_units must be >= 1, got {n_units}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_CELLS // n_units)
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        drawn = rng.integers(0, n_units, size=(size, n_units))
        drawn += np.arange(size)[:, None] * n_units  # row r counts into bins r*n_units...
        counts = np.bincount(drawn.ravel(), minlength=size * n_units)
        yield counts.reshape(size, n_units)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, undefined: float) -> np.ndarray:
    """``numerator / denominator``, ``undefined`` where the denominator is 0."""
    out = np.full(np.broadcast(numerator, denominator).shape, undefined, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def metrics_from_confusion(
    matrices: np.ndarray, required: np.ndarray, covid_class: int | None
) -> dict[str, np.ndarray]:
    """The :data:`METRICS` of each confusion matrix (rows true, columns predicted); NaN where
    a metric is undefined.

    Accuracy is undefined without items; macro F1 (the mean of every class's F1, 0 for a class
    neither present nor predicted, as :func:`training.evaluate.classification_metrics` counts
    it) when a ``required`` class has no true item; COVID-19 sensitivity without a COVID-19
    case and PPV without a COVID-19 prediction; both are NaN without ``covid_class``.
    """
    matrices = np.asarray(matrices, dtype=np.float64)
    tp = np.diagonal(matrices, axis1=1, axis2=2)
    support = matrices.sum(axis=2)
    predicted = matrices.sum(axis=1)
    precision = _ratio(tp, predicted, 0.0)
    recall = _ratio(tp, support, 0.0)
    f1 = _ratio(2 * precision * recall, precision + recall, 0.0)
    macro_f1 = f1.mean(axis=1)
    macro_f1[(support[:, required] == 0).any(axis=1)] = np.nan
    nan = np.full(len(matrices), np.nan)
    return {
        "accuracy": _ratio(tp.sum(axis=1), support.sum(axis=1), np.nan),
        "macro_f1": macro_f1,
        "covid_sensitivity": nan
        if covid_class is None
        else _ratio(tp[:, covid_class], support[:, covid_class], np.nan),
        "covid_ppv": nan
        if covid_class is None
        else _ratio(tp[:, covid_class], predicted[:, covid_class], np.nan),
    }


def _cells_per_unit(labels, predicted, units, n_units: int, n_classes: int) -> np.ndarray:
    """``(n_units, n_classes**2)`` counts of each unit's items per confusion-matrix cell."""
    labels, predicted, units = (np.asarray(a) for a in (labels, predicted, units))
    if not (labels.shape == predicted.shape == units.shape) or labels.ndim != 1:
        raise ValueError(
            f"labels, predicted and units must be 1-D of one length, got shapes "
            f"{labels.shape}, {predicted.shape}, {units.shape}"
        )
    for name, values, limit in (
        ("labels", labels, n_classes),
        ("predicted", predicted, n_classes),
        ("units", units, n_units),
    ):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must hold integer indices, got dtype {values.dtype}")
        if len(values) and (values.min() < 0 or values.max() >= limit):
            raise ValueError(f"{name} holds indices outside 0..{limit - 1}")
    cells = n_classes * n_classes
    flat = units.astype(np.int64) * cells + labels * n_classes + predicted
    return np.bincount(flat, minlength=n_units * cells).reshape(n_units, cells)


def _interval(values: np.ndarray, confidence: float) -> tuple[float | None, float | None, int]:
    """Percentile interval of the defined (finite) values, and how many there were."""
    defined = values[np.isfinite(values)]
    if len(defined) == 0:
        return None, None, 0
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(defined, [tail, 100.0 - tail])
    return float(low), float(high), int(len(defined))


def bootstrap_intervals(
    levels: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_units: int,
    n_classes: int,
    covid_class: int | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = CONFIDENCE,
) -> dict:
    """Percentile bootstrap intervals of :data:`METRICS` at each level, resampling units.

    Parameters
    ----------
    levels
        ``{level name: (labels, predicted, units)}``: per item of that level (a slice, a
        study, a patient case) its true and predicted class index and the index
        ``0..n_units-1`` of the unit (patient) it belongs to. Every level is computed on the
        same resamples, so a resample takes all of a drawn patient's items at every level.
    n_units
        How many units there are; each resample draws this many with replacement.
    n_classes
        How many classes the indices count.
    covid_class
        Index of the COVID-19 class; without one its sensitivity and PPV are undefined.
    resamples, seed, confidence
        How many resamples, the seed of their draws and the interval's coverage.

    Returns
    -------
    dict
        JSON-serialisable: ``method``, ``confidence``, ``resamples``, ``seed``, ``units``
        and ``levels``: ``{level: {metric: {"value", "low", "high", "resamples_used"}}}``.
        ``value`` is the metric on the data as given; a resample where a metric is undefined
        (no COVID-19 case drawn, say) is left out of that metric's interval and
        ``resamples_used`` says how many were used; a metric undefined everywhere has
        ``None`` for its value and bounds. No NaN: the dict can be written as strict JSON.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if covid_class is not None and not 0 <= covid_class < n_classes:
        raise ValueError(f"covid_class must be in 0..{n_classes - 1}, got {covid_class}")
    cells = {
        name: _cells_per_unit(labels, predicted, units, n_units, n_classes).astype(np.float64)
        for name, (labels, predicted, units) in levels.items()
    }
    shape = (n_classes, n_classes)
    required = {
        name: np.flatnonzero(c.sum(axis=0).reshape(shape).sum(axis=1)) for name, c in cells.items()
    }
    drawn: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in cells}
    for block in resample_counts(n_units, resamples, seed):
        block = block.astype(np.float64)  # exact for counts, and BLAS does the product
        for name, per_unit in cells.items():
            matrices = (block @ per_unit).reshape(len(block), *shape)
            drawn[name].append(metrics_from_confusion(matrices, required[name], covid_class))
    found = {}
    for name, per_unit in cells.items():
        whole = per_unit.sum(axis=0).reshape(1, *shape)
        values = metrics_from_confusion(whole, required[name], covid_class)
        found[name] = {}
        for metric in METRICS:
            value = float(values[metric][0])
            samples = np.concatenate([part[metric] for part in drawn[name]])
            low, high, used = _interval(samples, confidence)
            found[name][metric] = {
                "value": value if np.isfinite(value) else None,
                "low": low,
                "high": high,
                "resamples_used": used,
            }
    return {
        "method": "percentile",
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "units": n_units,
        "levels": found,
    }
