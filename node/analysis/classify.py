"""Classify files given by hand: PNG/JPG slices, a DICOM file, or a series folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from node.analysis.analyze import AnalysisOptions, analyze_instances
from node.analysis.bundle import ModelBundle
from node.analysis.result import aggregate

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ClassifyError(ValueError):
    """An input that cannot be classified; the message names the file and the reason."""


@dataclass(frozen=True)
class Classification:
    """Per-slice probabilities (label, probabilities) and the study answer."""

    slices: list[tuple[str, tuple[float, ...]]]
    predicted_class: str
    probabilities: tuple[float, ...]
    classes: tuple[str, ...]
    skipped: dict[str, str]


def read_image(path: Path) -> np.ndarray:
    """An 8-bit grayscale image (already windowed, as the seed's app took them)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ClassifyError(f"{path}: not a readable PNG or JPEG image ({exc})") from exc


def classify_paths(
    paths: list[Path], bundle: ModelBundle, options: AnalysisOptions | None = None
) -> Classification:
    """Classify images (each its own slice) or DICOM files/folders (one study)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ClassifyError(f"{path}: no such file or folder")
    if not files:
        raise ClassifyError("nothing to classify")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if images and len(images) != len(files):
        raise ClassifyError("give either images (PNG/JPG) or DICOM files, not both")
    classes = bundle.info.classes
    if images:
        pixels = [read_image(p) for p in images]
        probs = np.concatenate([bundle.predict(p[np.newaxis]) for p in pixels])
        predicted, study = aggregate(probs, classes, rule="mean")
        labelled = [
            (p.name, tuple(float(v) for v in row)) for p, row in zip(images, probs, strict=False)
        ]
        return Classification(labelled, predicted, study, classes, {})
    outcome = analyze_instances(files, bundle, options)
    labelled = [
        (s.sop_instance_uid + (f"[{s.frame}]" if s.frame is not None else ""), s.probabilities)
        for s in outcome.result.slices
    ]
    result = outcome.result
    return Classification(
        labelled, result.predicted_class, result.probabilities, classes, outcome.skipped
    )
