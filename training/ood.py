"""Out-of-distribution statistics, fitted at ``ainode train evaluate`` on the run's training
and validation images and carried by the bundle (applied by :mod:`node.analysis.ood`).

Feature statistics (Lee et al. 2018): class means of the penultimate-layer features of the
training images (originals only, not the balancing copies) and one covariance shared by the
classes, shrunk towards a scaled identity with the Ledoit-Wolf (2004) intensity. The
threshold is the ``1 - false_alarm_rate`` quantile of the distances of the **validation**
slices: patients the statistics never saw, so the false-alarm rate holds for new patients
(the training slices' own distances are far smaller: a threshold on them flags every new
study). The node flags a study whose median slice distance is above it, so a study is flagged
less often than a slice. The lung-window intensity histogram's reference is the training
images' mean histogram, its threshold the same quantile of the validation slices' distances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.analysis import ood

FILE = "ood.npz"
FALSE_ALARM_RATE = 0.01


def shrunk_covariance(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf covariance of rows already centred (on their class means), and the
    shrinkage intensity in 0..1."""
    x = np.asarray(centred, dtype=np.float64)
    n, p = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / p
    target_gap = sample - mu * np.eye(p)
    d2 = float((target_gap**2).sum()) / p
    # mean squared distance of each outer product to the sample covariance, in chunks
    b2 = 0.0
    for start in range(0, n, 256):
        chunk = x[start : start + 256]
        squares = (chunk**2).sum(axis=1)
        # ||x x^T - S||^2 = ||x||^4 - 2 x^T S x + ||S||^2
        b2 += float(
            (squares**2).sum()
            - 2 * np.einsum("ij,jk,ik->", chunk, sample, chunk)
            + len(chunk) * (sample**2).sum()
        )
    b2 = min(b2 / p / n / n, d2)
    shrinkage = b2 / d2 if d2 > 0 else 1.0
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(p), shrinkage


def fit_statistics(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    train_images: np.ndarray,
    val_images: np.ndarray,
    classes: int,
    false_alarm_rate: float = FALSE_ALARM_RATE,
) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, summary)``: the arrays of the statistics file and the figures beside them
    (threshold, histogram threshold, shrinkage, counts); no file is written."""
    if not 0 < false_alarm_rate < 0.5:
        raise ValueError(f"false_alarm_rate must be in (0, 0.5), got {false_alarm_rate}")
    features = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(train_labels, dtype=np.int64)
    if len(val_features) == 0:
        raise ValueError("no validation slices to choose the threshold on")
    missing = [k for k in range(classes) if not (labels == k).any()]
    if missing:
        raise ValueError(f"no training slices of class {missing}")
    means = np.stack([features[labels == k].mean(axis=0) for k in range(classes)])
    covariance, shrinkage = shrunk_covariance(features - means[labels])
    precision = np.linalg.inv(covariance)
    quantile = 1 - false_alarm_rate
    val_distances = ood.slice_distances(means, precision, val_features)
    train_distances = ood.slice_distances(means, precision, features)
    reference = ood.intensity_histograms(train_images).mean(axis=0)
    val_histogram = ood.histogram_distance(ood.intensity_histograms(val_images), reference)
    arrays = {
        "means": means.astype(np.float32),
        "precision": precision.astype(np.float32),
        "histogram": reference,
    }
    summary = {
        "threshold": float(np.quantile(val_distances, quantile)),
        "histogram_threshold": float(np.quantile(val_histogram, quantile)),
        "shrinkage": float(shrinkage),
        "features": int(features.shape[1]),
        "train_slices": int(len(features)),
        "validation_slices": int(len(val_distances)),
        "validation_distance_median": float(np.median(val_distances)),
        "train_distance_median": float(np.median(train_distances)),
    }
    return arrays, summary


def summary_entry(arrays_file: Path, figures: dict, false_alarm_rate: float) -> dict:
    """What ``model.json`` carries as ``ood``: method, threshold and how it was chosen, the
    statistics file and its SHA-256."""
    return {
        "method": ood.METHOD,
        "reference": "Lee et al. 2018 (Mahalanobis, shared covariance); Ledoit-Wolf shrinkage",
        "features": f"penultimate layer ({figures['features']} values per slice)",
        "study_score": "median of the slices' Mahalanobis distances to the nearest class mean",
        "threshold": figures["threshold"],
        "false_alarm_rate": false_alarm_rate,
        "threshold_chosen": (
            f"{1 - false_alarm_rate:.0%} quantile of the validation slices' distances "
            f"({figures['validation_slices']} slices of patients the statistics never saw)"
        ),
        "histogram_threshold": figures["histogram_threshold"],
        "histogram": f"lung-window intensity, {ood.HISTOGRAM_BINS} bins, total variation "
        "distance to the training images' mean; threshold: the same validation quantile",
        "header_checks": "documented adult chest-CT ranges (training images carry no header)",
        "shrinkage": figures["shrinkage"],
        "train_slices": figures["train_slices"],
        "validation_slices": figures["validation_slices"],
        "file": arrays_file.name,
        "sha256": ood.sha256_of(arrays_file),
    }


def split_features(feature_model, run, split: str, originals_only: bool, progress=None):
    """Penultimate features, labels and images of ``split``'s shards (balancing copies left
    out with ``originals_only``)."""
    features, labels, images = [], [], []
    for shard in run.read_shards(split):
        keep = ~shard["augmented"] if originals_only else np.ones(len(shard["labels"]), bool)
        batch = shard["images"][keep]
        if len(batch):
            features.append(feature_model.predict(batch, batch_size=32, verbose=0)[1])
            labels.append(shard["labels"][keep])
            images.append(batch[..., 0])
        if progress is not None:
            progress(len(shard["labels"]))
    if not features:
        raise ValueError(f"{run.folder}: the {split} split is empty")
    return np.concatenate(features), np.concatenate(labels), np.concatenate(images)


def fit_ood(
    model, run, out: Path, progress=None, false_alarm_rate: float = FALSE_ALARM_RATE
) -> tuple[dict, dict, list[Path]]:
    """``(ood, report, files)``: what ``model.json`` carries, what the evaluation report
    shows, and the files written in ``out`` that go into the bundle beside ``model.json``."""
    from node.analysis.keras_model import feature_model

    features_of = feature_model(model)
    train = split_features(features_of, run, "train", True, progress)
    val = split_features(features_of, run, "val", True, progress)
    arrays, figures = fit_statistics(
        train[0], train[1], val[0], train[2], val[2], len(run.info["classes"]), false_alarm_rate
    )
    path = Path(out) / FILE
    # the precision is symmetric: its lower triangle is all the file needs (the zeros above
    # compress to nothing: 3 MB instead of 6 for Lite0's 1,280 features)
    stored = {**arrays, "precision": np.tril(arrays["precision"])}
    with path.open("wb") as handle:
        np.savez_compressed(handle, **stored)
    entry = summary_entry(path, figures, false_alarm_rate)
    return entry, figures, [path]
