"""The analysis pipeline: stored instances in, a study result out (no queue, no database).

Reads as its stages: load headers → skip what is not an axial CT image → pick the
series → order slices → HU → lung-bearing slices → window → model → aggregate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.analysis import calibration, evidence, imaging, ood
from node.analysis.result import SliceResult, StudyResult

if TYPE_CHECKING:
    from node.analysis.bundle import ModelBundle
    from node.settings import Settings

# Which of a study's eligible series to evaluate (each a list of headers, in the order first
# met): its index and why (said of the series left out), or None and why none will do.
SeriesChooser = Callable[[Sequence[Sequence[Dataset]]], tuple[int | None, str]]


class AnalysisError(RuntimeError):
    """The study cannot be analysed (nothing to evaluate); the message says why.

    ``skipped``: why each instance read so far was skipped (SOP Instance UID → reason).
    """

    def __init__(self, message: str, skipped: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.skipped = dict(skipped or {})


@dataclass
class AnalysisOutcome:
    """A study result plus what was skipped and how long each stage took (seconds)."""

    result: StudyResult
    evaluated: list[Dataset]
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisOptions:
    """How slices are chosen and windowed and how the study answer is formed."""

    window: imaging.Window = imaging.LUNG
    stride: int = 1
    min_lung_fraction: float = 0.05
    rule: str = "top-mean"
    batch_size: int | None = None  # slices per forward pass; None: the bundle's fastest
    limits: imaging.DecodeLimits = imaging.DEFAULT_LIMITS
    # the routing's series rules (node.records.routing); None: the largest series
    choose_series: SeriesChooser | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> AnalysisOptions:
        """The options the node's settings ask for (the workers, the CLI and the web UI)."""
        return cls(
            window=imaging.Window(settings.window_center, settings.window_width),
            stride=settings.slice_stride,
            min_lung_fraction=settings.min_lung_fraction,
            rule=settings.aggregation_rule,
            limits=imaging.DecodeLimits(
                settings.max_image_side, settings.max_frames, settings.max_decoded_mb
            ),
        )


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self._last, 4)
        self._last = now


def largest_series(series: Sequence[Sequence[Dataset]]) -> tuple[int | None, str]:
    """The default :data:`SeriesChooser`: the series with the most eligible instances (the
    first met of equals)."""
    return max(range(len(series)), key=lambda i: len(series[i])), "the largest is evaluated"


def eligible_series(
    paths: Sequence[Path],
    limits: imaging.DecodeLimits | None = None,
    choose: SeriesChooser | None = None,
) -> tuple[list[Dataset], dict[str, str]]:
    """Headers of the instances of the eligible series ``choose`` picks (default: the
    largest, :func:`largest_series`), and why others were skipped.

    With ``limits``, an instance whose pixel data declares more than they allow is skipped
    too (its reason starts with :data:`imaging.TOO_LARGE`), so it is never decoded; without,
    only the headers are judged (to list slices, each checked again when it is shown).
    Pixel data is read only when it is used.
    """
    by_series: dict[str, list[Dataset]] = {}
    skipped: dict[str, str] = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=False, defer_size="1 KB")
        ds.filename = str(path)
        reason = imaging.skip_reason(ds)
        if reason is None and limits is not None:
            reason = _size_reason(ds, limits)
        if reason:
            skipped[str(ds.SOPInstanceUID)] = reason
            continue
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not by_series:
        raise AnalysisError(
            "no axial CT image to analyse" + (f" ({_reasons(skipped)})" if skipped else ""),
            skipped,
        )
    candidates = list(by_series.values())
    index, why = (choose or largest_series)(candidates)
    if index is None:
        raise AnalysisError(f"no series to analyse: {why}", skipped)
    chosen = candidates[index]
    for uid, datasets in by_series.items():
        if datasets is not chosen:
            for ds in datasets:
                skipped[str(ds.SOPInstanceUID)] = f"other series {uid} ({why})"
    return [chosen[i] for i in imaging.slice_order(chosen)], skipped


def _size_reason(ds: Dataset, limits: imaging.DecodeLimits) -> str | None:
    """Why the pixel data of ``ds`` is not decoded under ``limits``, or None."""
    try:
        imaging.check_decode_size(ds, limits)
    except imaging.ImagingError as exc:
        return str(exc)
    return None


def _reasons(skipped: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in skipped.values():
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} × {reason}" for reason, n in counts.items())


def windowed_lung_slices(
    datasets: Sequence[Dataset], options: AnalysisOptions, skipped: dict[str, str] | None = None
) -> tuple[list[tuple[Dataset, int]], np.ndarray]:
    """(dataset, frame) of the lung-bearing slices chosen, and their windowed uint8 pixels.

    With ``skipped``, an instance whose pixels cannot be used (corrupt, truncated) is left
    out with its reason there, and the rest of the series is still read; without it the
    first such instance raises :class:`~node.analysis.imaging.ImagingError`.
    """
    frames: list[tuple[Dataset, int]] = []
    images: list[np.ndarray] = []
    fractions: list[float] = []
    for ds in datasets:
        try:
            hu = imaging.hounsfield_frames(ds, options.limits)
        except imaging.ImagingError as exc:
            if skipped is None:
                raise
            skipped[str(ds.SOPInstanceUID)] = str(exc)
            continue
        for index, frame in enumerate(hu):
            frames.append((ds, index))
            fractions.append(imaging.lung_fraction(frame))
            images.append(imaging.apply_window(frame, options.window))
    if not frames and skipped:
        raise AnalysisError(f"no slice could be decoded ({_reasons(skipped)})", skipped)
    chosen = imaging.select_slices(fractions, options.stride, options.min_lung_fraction)
    if not chosen:
        raise AnalysisError(
            f"none of {len(frames)} slices shows lungs "
            f"(lung fraction < {options.min_lung_fraction})"
        )
    return [frames[i] for i in chosen], np.stack([images[i] for i in chosen])


def analyze_instances(
    paths: Sequence[Path], bundle: ModelBundle, options: AnalysisOptions | None = None
) -> AnalysisOutcome:
    """Run the whole pipeline over a study's stored instance files."""
    options = options or AnalysisOptions()
    clock = _Clock()
    datasets, skipped = eligible_series(paths, options.limits, options.choose_series)
    clock.lap("load")
    frames, pixels = windowed_lung_slices(datasets, options, skipped)
    clock.lap("preprocess")
    raw, features = bundle.predict_with_features(pixels, batch_size=options.batch_size)
    clock.lap("inference")
    info, classes = bundle.info, bundle.info.classes
    probabilities = calibration.calibrate_slices(raw, info)
    predicted, study_probabilities, uncalibrated, decision = calibration.study_answer(
        probabilities, classes, options.rule, info
    )
    outside = ood.assess(bundle, features, datasets, pixels)
    clock.lap("aggregate")
    slices = tuple(
        SliceResult(
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            frame=frame if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None,
            probabilities=tuple(float(p) for p in row),
        )
        for (ds, frame), row in zip(frames, probabilities, strict=True)
    )
    result = StudyResult(
        classes=classes,
        probabilities=study_probabilities,
        predicted_class=predicted,
        rule=options.rule,
        slices=slices,
        model=info.identity(),
        raw_probabilities=uncalibrated,
        decision=decision,
        ood=outside,
        key_slices=evidence.key_slices(probabilities, classes, predicted),
    )
    evaluated: dict[str, Dataset] = {}
    for ds, _frame in frames:
        evaluated.setdefault(str(ds.SOPInstanceUID), ds)
    return AnalysisOutcome(result, list(evaluated.values()), skipped, clock.timings)
