"""Study results: per-slice probabilities aggregated into one study-level answer."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

CLASSES = ("Covid_19", "Normal", "Pneumonia")
RULES = ("mean", "top-mean")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a result: travels with every result and every SR."""

    name: str
    version: str
    demo: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("model name and version are required")

    @property
    def label(self) -> str:
        """``name version`` as shown to radiologists (with the demo warning when it is one)."""
        text = f"{self.name} {self.version}"
        return text + " (DEMO, synthetic phantoms, not for clinical use)" if self.demo else text


@dataclass(frozen=True)
class SliceResult:
    """One evaluated slice: which instance (and frame) and its probabilities in class order."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    frame: int | None
    probabilities: tuple[float, ...]


@dataclass(frozen=True)
class StudyResult:
    """The study-level answer: class, probabilities in class order, how it was reached."""

    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    predicted_class: str
    rule: str
    slices: tuple[SliceResult, ...]
    model: ModelIdentity
    # What a radiologist needs to check and trust the answer (issue "answers a radiologist can
    # check"); each part is a JSON-clean mapping, stored as it is with the analysis:
    # - raw_probabilities: the study probabilities before study-level calibration (None: the
    #   bundle has no calibration, ``probabilities`` are the aggregate as it is)
    # - decision: how the class was chosen from the probabilities (node.analysis.calibration)
    # - ood: how unlike the training data the study is (node.analysis.ood; None: not assessed)
    # - key_slices: the slices that drive the answer, highest class evidence first
    #   (node.analysis.evidence)
    raw_probabilities: tuple[float, ...] | None = None
    decision: Mapping | None = None
    ood: Mapping | None = None
    key_slices: tuple[Mapping, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.probabilities):
            raise ValueError("classes and probabilities differ in length")
        if self.predicted_class not in self.classes:
            raise ValueError(f"predicted_class {self.predicted_class!r} not in {self.classes}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")

    @property
    def probability(self) -> float:
        """Probability of the predicted class."""
        return self.probabilities[self.classes.index(self.predicted_class)]

    @property
    def outside_experience(self) -> bool:
        """Whether the study was judged unlike anything the model was trained on."""
        return bool(self.ood and self.ood.get("flagged"))

    def assessment(self) -> dict:
        """The trust parts as stored with the analysis (``Analysis.assessment``)."""
        return {
            "raw_probabilities": list(self.raw_probabilities)
            if self.raw_probabilities is not None
            else None,
            "decision": dict(self.decision) if self.decision is not None else None,
            "ood": dict(self.ood) if self.ood is not None else None,
            "key_slices": [dict(k) for k in self.key_slices],
        }


def aggregate(
    slice_probabilities: np.ndarray,
    classes: tuple[str, ...],
    rule: str = "top-mean",
    top_fraction: float = 0.25,
) -> tuple[str, tuple[float, ...]]:
    """Study class and probabilities from per-slice probabilities (rows in class order).

    ``mean``: the mean over slices. ``top-mean`` (default): for each disease class
    the mean of its highest ``top_fraction`` of slice probabilities (the top
    ``ceil(top_fraction × slices)``, at least one), because a finding that fills a
    quarter of the lungs is a finding even when the other slices look normal;
    ``Normal`` is then what the disease classes leave (1 - the largest disease score,
    floored at 0), and the vector is normalised.

    The class is the most probable one; a tie goes to a disease class before ``Normal``
    (a study on the edge is shown for review, whatever the order of the model's
    classes), then to the first in class order.

    Raises
    ------
    ValueError
        On a bad shape, rule or fraction, or probabilities that are not finite and >= 0.
    """
    probs = np.asarray(slice_probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or len(probs) == 0:
        raise ValueError(f"need (slices, {len(classes)}) probabilities, got {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("slice probabilities must be finite and >= 0 (a broken model?)")
    if rule == "mean":
        study = probs.mean(axis=0)
    elif rule == "top-mean":
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        # rounded first: 0.56 × 25 is 14.000000000000002 in floating point, and 14 are meant
        k = max(1, math.ceil(round(top_fraction * len(probs), 9)))
        study = np.sort(probs, axis=0)[-k:].mean(axis=0)
        if "Normal" in classes:
            normal = classes.index("Normal")
            disease = [i for i in range(len(classes)) if i != normal]
            study[normal] = max(0.0, 1.0 - study[disease].max()) if disease else study[normal]
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    total = study.sum()
    if not total > 0:
        raise ValueError("slice probabilities are all 0: nothing to normalise")
    study = study / total
    tied = [i for i in range(len(classes)) if study[i] == study.max()]
    best = next((i for i in tied if classes[i] != "Normal"), tied[0])
    return classes[best], tuple(float(p) for p in study)
