"""How unlike the model's training data a study is (out-of-distribution warning).

The score is the Mahalanobis distance of a slice's penultimate-layer features to the nearest
class mean under one covariance shared by the classes (Lee, Lee, Lee & Shin, "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018),
the covariance shrunk towards a scaled identity (Ledoit & Wolf 2004) because a few thousand
slices cannot fill 1,280 dimensions. The study score is the median of its slices' distances,
so a few odd slices do not flag a study and a study unlike the training data is flagged
whatever its slices' answers. The threshold was chosen at training time on held-out validation
slices for a stated false-alarm rate (``training.ood``).

Beside the score, checks of the input itself: the lung-window intensity histogram against the
training images' (fitted at training time), and DICOM header checks against documented adult
chest-CT ranges (the training images are PNG slices without headers, so what the model saw
cannot be read from them). Each check outside its range is a reason in plain words.

A bundle of format 2 carries the statistics (``model.json``: ``ood``, and the file it names);
a bundle without them cannot say, and :func:`assess` returns None.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

METHOD = "mahalanobis-shared-covariance/1"
HISTOGRAM_BINS = 32  # of the windowed uint8 pixels
# Documented adult chest-CT ranges (used because training images carry no DICOM header):
# thin-section 0.5-1.5 mm to routine 5 mm reconstructions, and the 10 mm of older protocols
# (Fleischner Society 2020 / RSNA consensus on COVID-19 chest CT: thin-section, unenhanced);
# a chest field of view of about 300-450 mm for adults (AAPM adult routine chest protocols).
SLICE_THICKNESS_MM = (0.5, 10.0)
FIELD_OF_VIEW_MM = (250.0, 550.0)
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHESTABDOMEN", "TORSO"})
# Head kernels (Siemens H.. / Hr.., and names that say head or brain): a head reconstruction.
_HEAD_KERNEL = re.compile(r"^(H[a-z]?\d{2}|.*\b(HEAD|BRAIN|NEURO)\b)", re.IGNORECASE)


class OodError(ValueError):
    """Statistics that cannot be used (a missing or altered file, a bad ``ood`` entry)."""


@dataclass(frozen=True)
class OodStatistics:
    """What :func:`assess` needs, read from the bundle's statistics file."""

    means: np.ndarray  # (classes, features) class-conditional feature means
    precision: np.ndarray  # (features, features) inverse of the shrunk shared covariance
    threshold: float  # study score above which the study is flagged
    histogram: np.ndarray  # (HISTOGRAM_BINS,) mean histogram of the training images
    histogram_threshold: float  # total-variation distance above which intensity is unusual
    summary: Mapping  # model.json's ``ood``


def sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of a file."""
    with Path(path).open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def read_statistics(folder: Path, summary: Mapping) -> OodStatistics | None:
    """The statistics ``summary`` (model.json's ``ood``) names in ``folder``; None when the
    bundle has none. Raises :class:`OodError` naming what is wrong."""
    if not summary:
        return None
    if summary.get("method") != METHOD:
        raise OodError(f"ood.method must be {METHOD!r}, got {summary.get('method')!r}")
    for key in ("threshold", "histogram_threshold"):
        value = summary.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise OodError(f"ood.{key} must be a number > 0, got {value!r}")
    name = summary.get("file")
    if not isinstance(name, str) or Path(name).name != name or not name:
        raise OodError(f"ood.file must be a file name in the bundle, got {name!r}")
    path = Path(folder) / name
    if not path.is_file():
        raise OodError(f"{path}: missing (model.json's ood names it)")
    if sha256_of(path) != summary.get("sha256"):
        raise OodError(f"{path}: SHA-256 differs from model.json's ood.sha256 (altered?)")
    with np.load(path) as arrays:
        means = np.asarray(arrays["means"], dtype=np.float64)
        lower = np.tril(np.asarray(arrays["precision"], dtype=np.float64))
        precision = lower + np.tril(lower, -1).T  # stored as its lower triangle (symmetric)
        histogram = np.asarray(arrays["histogram"], dtype=np.float64)
    if means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
        raise OodError(f"{path}: means {means.shape} and precision {precision.shape} disagree")
    if histogram.shape != (HISTOGRAM_BINS,):
        raise OodError(f"{path}: histogram must have {HISTOGRAM_BINS} bins")
    return OodStatistics(
        means,
        precision,
        float(summary["threshold"]),
        histogram,
        float(summary["histogram_threshold"]),
        dict(summary),
    )


def slice_distances(means: np.ndarray, precision: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each feature row to its nearest class mean, ``(N,)``."""
    features = np.asarray(features, dtype=np.float64)
    # (d @ P) * d summed: the same as einsum("ij,jk,ik->i"), which numpy would loop over
    # without BLAS (8 s instead of 0.5 s for 251 B7 slices of 2,560 features)
    squared = np.stack([((d := features - mean) @ precision * d).sum(axis=1) for mean in means])
    return np.sqrt(np.clip(squared.min(axis=0), 0.0, None))


def study_score(distances: np.ndarray) -> float:
    """The study's score: the median of its slices' distances."""
    return float(np.median(distances))


def intensity_histograms(pixels: np.ndarray) -> np.ndarray:
    """Per slice, the normalised histogram of windowed uint8 pixels, ``(N, HISTOGRAM_BINS)``."""
    flat = np.asarray(pixels, dtype=np.uint8).reshape(len(pixels), -1)
    bins = (flat.astype(np.int64) * HISTOGRAM_BINS) >> 8
    counts = np.stack([np.bincount(row, minlength=HISTOGRAM_BINS) for row in bins])
    return counts / counts.sum(axis=1, keepdims=True)


def histogram_distance(histograms: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Total-variation distance (0 same, 1 disjoint) of each histogram row to ``reference``."""
    return 0.5 * np.abs(np.atleast_2d(histograms) - reference).sum(axis=1)


def assess(
    bundle, features: np.ndarray | None, datasets: Sequence[Dataset], pixels: np.ndarray
) -> Mapping | None:
    """The study's out-of-distribution assessment, or None when the bundle has no statistics.

    Returns
    -------
    Mapping or None
        ``method``, ``score`` (median Mahalanobis distance of the slices; None where the
        runtime gave no features), ``threshold``, ``flagged`` (score above the threshold or a
        check outside its range), ``reasons`` (plain words, one per cause), ``checks`` (each:
        ``name``, ``value``, ``expected``, ``outside``: True/False, or None when not known,
        ``basis``: what the range comes from) and ``slices_above`` (fraction of slices whose
        own distance is above the threshold).
    """
    statistics = getattr(bundle, "ood_statistics", None)
    if statistics is None:
        return None
    reasons: list[str] = []
    score = slices_above = None
    if features is not None and len(features):
        distances = slice_distances(statistics.means, statistics.precision, features)
        score = study_score(distances)
        slices_above = float((distances > statistics.threshold).mean())
        if score > statistics.threshold:
            reasons.append(
                f"the images are unlike the training images to the model (score {score:.0f}, "
                f"above {statistics.threshold:.0f}; {slices_above:.0%} of slices above)"
            )
    checks = [_histogram_check(statistics, pixels), *header_checks(datasets)]
    reasons += [check["reason"] for check in checks if check["outside"]]
    return {
        "method": METHOD,
        "score": _finite(score),
        "threshold": statistics.threshold,
        "false_alarm_rate": statistics.summary.get("false_alarm_rate"),
        "flagged": bool(reasons),
        "reasons": reasons,
        "checks": [{k: v for k, v in check.items() if k != "reason"} for check in checks],
        "slices_above": slices_above,
    }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _histogram_check(statistics: OodStatistics, pixels: np.ndarray) -> dict:
    study = intensity_histograms(pixels).mean(axis=0)
    distance = float(histogram_distance(study, statistics.histogram)[0])
    return _check(
        "intensity histogram",
        round(distance, 4),
        f"<= {statistics.histogram_threshold:.3f} (distance to the training images')",
        distance > statistics.histogram_threshold,
        "training images",
        "the brightness of the lung-window images is unlike the training images' "
        "(another scanner, dose, reconstruction or body part)",
    )


def _check(name, value, expected, outside, basis, reason) -> dict:
    return {
        "name": name,
        "value": value,
        "expected": expected,
        "outside": outside,
        "basis": basis,
        "reason": reason,
    }


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def header_checks(datasets: Sequence[Dataset]) -> list[dict]:
    """Checks of the evaluated series' headers against documented adult chest-CT ranges
    (its first instance speaks for the series)."""
    if not datasets:
        return []
    ds = datasets[0]
    basis = "documented chest-CT range (training images carry no DICOM header)"
    checks = []
    thickness = _number(ds, "SliceThickness")
    low, high = SLICE_THICKNESS_MM
    checks.append(
        _check(
            "slice thickness",
            thickness,
            f"{low:g}-{high:g} mm",
            None if thickness is None else not low <= thickness <= high,
            basis,
            f"slice thickness {thickness} mm is outside chest CT's {low:g}-{high:g} mm",
        )
    )
    kernel = " ".join(str(k) for k in np.atleast_1d(ds.get("ConvolutionKernel") or [])) or None
    checks.append(
        _check(
            "convolution kernel",
            kernel,
            "a body or lung kernel",
            None if kernel is None else bool(_HEAD_KERNEL.match(kernel)),
            basis,
            f"the reconstruction kernel {kernel} is a head kernel",
        )
    )
    fov = _field_of_view(ds)
    low, high = FIELD_OF_VIEW_MM
    checks.append(
        _check(
            "field of view",
            fov,
            f"{low:g}-{high:g} mm",
            None if fov is None else not low <= fov <= high,
            basis,
            f"the field of view ({fov:.0f} mm) is not a chest's {low:g}-{high:g} mm"
            if fov is not None
            else "",
        )
    )
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    checks.append(
        _check(
            "contrast",
            agent or "none recorded",
            "unenhanced (COVID-19 chest-CT protocols are unenhanced)",
            bool(agent),
            basis,
            f"the study is contrast-enhanced ({agent}); the model knows unenhanced chest CT",
        )
    )
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    checks.append(
        _check(
            "body part",
            part or None,
            "chest",
            None if not part else part not in CHEST_BODY_PARTS,
            "DICOM Body Part Examined",
            f"the body part examined is {part}, not the chest",
        )
    )
    return checks


def _field_of_view(ds: Dataset) -> float | None:
    """Reconstruction Diameter, else Pixel Spacing x the larger side (mm)."""
    diameter = _number(ds, "ReconstructionDiameter")
    if diameter:
        return diameter
    spacing = ds.get("PixelSpacing")
    try:
        return float(spacing[0]) * max(int(ds.Rows), int(ds.Columns))
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
