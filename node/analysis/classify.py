"""Classify images given by hand: PNG/JPG slices, a DICOM file, or a series folder.

The one path for ``ainode classify`` and the web upload: an input is read into windowed 8-bit
slices, or refused with a message for the user (:class:`ClassifyError`), then the model
answers. A PNG or JPEG is an already windowed 8-bit slice (as the seed's app took them) and is
classified as it is; a DICOM file goes through the node's own steps (axial CT check → HU →
lung-bearing slices → window), so it is judged as a stored study would be.

Decompression bombs are refused before their pixels are decoded: a PNG or JPEG may have at
most :data:`MAX_PIXELS` pixels, a DICOM file no more than the decode limits allow
(:func:`node.analysis.imaging.check_decode_size`, the ``max_image_side``, ``max_frames`` and
``max_decoded_mb`` settings).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.analysis import calibration, imaging
from node.analysis.analyze import (
    AnalysisError,
    AnalysisOptions,
    analyze_instances,
    windowed_lung_slices,
)
from node.analysis.bundle import ModelBundle
from node.analysis.result import ModelIdentity

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_PREFIX_AT, DICOM_PREFIX = 128, b"DICM"
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
MAX_PIXELS = 8192 * 8192  # per PNG or JPEG image (DICOM: imaging.DecodeLimits)
# What pydicom raises on a damaged file: it parses lazily, so reading values can fail too.
_DICOM_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    NotImplementedError,
    struct.error,
    OSError,
)


class ClassifyError(ValueError):
    """An input that cannot be classified; the message tells the user why."""


@dataclass(frozen=True)
class InputImage:
    """A readable input: its kind, the slices the model gets, and how they are combined."""

    kind: str  # "png", "jpeg" or "dicom"
    slices: np.ndarray  # (N, H, W) uint8, windowed
    rule: str  # how slice probabilities become one answer (node.analysis.result.aggregate)

    @property
    def suffix(self) -> str:
        """The usual file suffix of this kind (``.png``, ``.jpg``, ``.dcm``)."""
        return SUFFIXES[self.kind]


@dataclass(frozen=True)
class Classification:
    """Per-slice probabilities (label, probabilities) and the study answer, calibrated and
    decided as the worker does (:mod:`node.analysis.calibration`)."""

    slices: list[tuple[str, tuple[float, ...]]]
    predicted_class: str
    probabilities: tuple[float, ...]
    classes: tuple[str, ...]
    skipped: dict[str, str]
    raw_probabilities: tuple[float, ...] | None = None  # before study calibration
    decision: dict | None = None  # how the class was decided


# ---------------------------------------------------------------------------- reading


def file_kind(data: bytes) -> str:
    """``png``, ``jpeg`` or ``dicom`` from the first bytes; ClassifyError for anything else."""
    if not data:
        raise ClassifyError("The file is empty.")
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if data[DICOM_PREFIX_AT : DICOM_PREFIX_AT + 4] == DICOM_PREFIX:
        return "dicom"
    raise ClassifyError(
        "This is not an image: give a PNG, a JPEG or a DICOM file "
        "(a DICOM Part 10 file, with the 'DICM' prefix)."
    )


def read_input(data: bytes, options: AnalysisOptions) -> InputImage:
    """The slices of a file's contents as the model sees them (its type read from them)."""
    kind = file_kind(data)
    if kind != "dicom":
        return InputImage(kind, read_picture(data)[np.newaxis], "mean")
    ds = read_dicom(data, options.limits)
    with _decoding():
        _frames, slices = windowed_lung_slices([ds], options)
    return InputImage(kind, slices, options.rule)


def read_picture(source: bytes | Path) -> np.ndarray:
    """An 8-bit grayscale image from PNG or JPEG bytes or a file; at most MAX_PIXELS pixels."""
    try:
        image = Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source, formats=("PNG", "JPEG")
        )
    except Image.DecompressionBombError:  # PIL's own, far higher limit: refused unread
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ClassifyError(_too_large(f"The image claims more than {limit:,} pixels")) from None
    except (UnidentifiedImageError, OSError):
        raise ClassifyError(
            "The image cannot be read: it is not a valid PNG or JPEG file."
        ) from None
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ClassifyError(_too_large(f"The image is {width}×{height} pixels"))
        try:
            return np.asarray(image.convert("L"), dtype=np.uint8)
        except (OSError, ValueError) as exc:  # truncated or corrupt image data
            raise ClassifyError(f"The image data is damaged: {_short(exc)}.") from None


def read_dicom(data: bytes, limits: imaging.DecodeLimits = imaging.DEFAULT_LIMITS) -> Dataset:
    """A DICOM dataset that is an axial grayscale CT image with pixel data within ``limits``."""
    try:
        ds = dcmread(io.BytesIO(data))
        reason = imaging.skip_reason(ds)
    except _DICOM_ERRORS as exc:
        raise ClassifyError(f"The DICOM file cannot be read: {_short(exc)}.") from None
    if "SOPClassUID" not in ds:
        raise ClassifyError(
            "The DICOM file cannot be read: it has no SOP Class UID (damaged, or not an image)."
        )
    if reason == "no pixel data":
        raise ClassifyError("The DICOM file has no pixel data: it is not an image.")
    if reason is not None:
        raise ClassifyError(f"The DICOM file is not a CT slice that can be classified: {reason}.")
    check_dicom_size(ds, limits)
    return ds


def check_dicom_size(ds: Dataset, limits: imaging.DecodeLimits = imaging.DEFAULT_LIMITS) -> None:
    """Refuse a DICOM image whose pixel data declares more than ``limits`` before it is
    decoded (:func:`node.analysis.imaging.check_decode_size`)."""
    try:
        imaging.check_decode_size(ds, limits)
    except imaging.ImageTooLarge as exc:
        raise ClassifyError(
            f"The DICOM image is {exc.size}: too large to classify ({exc.limits})."
        ) from None
    except _DICOM_ERRORS as exc:  # an ImagingError too: the dimensions cannot be read
        raise ClassifyError(f"The DICOM file cannot be read: {_short(exc)}.") from None


def windowed_frames(
    ds: Dataset, window: imaging.Window, limits: imaging.DecodeLimits = imaging.DEFAULT_LIMITS
) -> np.ndarray:
    """All frames of a DICOM image read by :func:`read_dicom`, windowed (to show them)."""
    with _decoding():
        return imaging.windowed_slices(ds, window, limits)


@contextmanager
def _decoding() -> Iterator[None]:
    """Errors met decoding a DICOM image's pixels, as ClassifyError."""
    try:
        yield
    except AnalysisError as exc:
        raise ClassifyError(f"The DICOM image shows no lungs to classify: {exc}.") from None
    except imaging.ImagingError as exc:
        raise ClassifyError(f"The DICOM pixel data cannot be read: {exc}.") from None
    except _DICOM_ERRORS as exc:
        raise ClassifyError(f"The DICOM file is damaged: {_short(exc)}.") from None


@contextmanager
def _about(path: Path) -> Iterator[None]:
    """A ClassifyError met reading ``path``, with the path in front of its message."""
    try:
        yield
    except ClassifyError as exc:
        raise ClassifyError(f"{path}: {exc}") from None


def _check_dicom_file(path: Path, limits: imaging.DecodeLimits) -> None:
    """Refuse a DICOM file the pipeline would decode that is too large (headers only read)."""
    with _about(path):
        try:
            ds = dcmread(path, defer_size="1 KB")
            reason = imaging.skip_reason(ds)
        except _DICOM_ERRORS as exc:
            raise ClassifyError(f"The DICOM file cannot be read: {_short(exc)}.") from None
        if reason is None:  # a skipped file is never decoded
            check_dicom_size(ds, limits)


def _too_large(what: str) -> str:
    return f"{what}: too large to classify (at most {MAX_PIXELS:,} pixels are accepted)."


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).rstrip(".") or type(exc).__name__  # the caller ends the sentence
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- classifying


def classify_slices(
    stacks: Sequence[tuple[str, np.ndarray]],
    rule: str,
    bundle: ModelBundle,
    batch_size: int = 16,
) -> Classification:
    """The model's answer per slice and combined by ``rule`` (node.analysis.result.aggregate),
    calibrated and decided by the bundle's calibration and operating point as in the worker.

    ``stacks`` are (label, (N, H, W) uint8 windowed slices) pairs; the slices of a stack are
    predicted in batches, so they share a size, stacks may differ. A stack of more than one
    slice labels them ``label[i]``.
    """
    raw = np.concatenate(
        [bundle.predict(slices, batch_size=batch_size) for _label, slices in stacks]
    )
    probabilities = calibration.calibrate_slices(raw, bundle.info)
    labels = [
        label if len(slices) == 1 else f"{label}[{index}]"
        for label, slices in stacks
        for index in range(len(slices))
    ]
    classes = bundle.info.classes
    predicted, combined, uncalibrated, decision = calibration.study_answer(
        probabilities, classes, rule, bundle.info
    )
    labelled = [
        (label, tuple(float(v) for v in row))
        for label, row in zip(labels, probabilities, strict=True)
    ]
    return Classification(
        labelled, predicted, tuple(combined), classes, {}, uncalibrated, dict(decision)
    )


def classify_image(image: InputImage, bundle: ModelBundle, batch_size: int = 16) -> Classification:
    """The model's answer for one input read by :func:`read_input`."""
    return classify_slices([(image.kind, image.slices)], image.rule, bundle, batch_size)


def classify_paths(
    paths: list[Path], bundle: ModelBundle, options: AnalysisOptions | None = None
) -> Classification:
    """Classify images (each its own slice) or DICOM files/folders (one study)."""
    options = options or AnalysisOptions()
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
    if images:
        stacks = []
        for path in images:
            with _about(path):
                stacks.append((path.name, read_picture(path)[np.newaxis]))
        return classify_slices(stacks, "mean", bundle, options.batch_size)
    for path in files:
        _check_dicom_file(path, options.limits)
    outcome = analyze_instances(files, bundle, options)
    labelled = [
        (s.sop_instance_uid + (f"[{s.frame}]" if s.frame is not None else ""), s.probabilities)
        for s in outcome.result.slices
    ]
    result = outcome.result
    return Classification(
        labelled,
        result.predicted_class,
        result.probabilities,
        result.classes,
        outcome.skipped,
        result.raw_probabilities,
        dict(result.decision) if result.decision is not None else None,
    )


@dataclass(frozen=True)
class ImageAnswer:
    """The model's answer for one image given by hand, with the model that gave it (what the
    web upload shows and keeps)."""

    predicted_class: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    slices: int
    model: ModelIdentity
    raw_probabilities: tuple[float, ...] | None = None  # before study calibration
    decision: dict | None = None  # how the class was decided (node.analysis.calibration)

    def as_dict(self) -> dict:
        raw = self.raw_probabilities
        return {
            "predicted_class": self.predicted_class,
            "probabilities": dict(zip(self.classes, self.probabilities, strict=True)),
            "uncalibrated_probabilities": None
            if raw is None
            else dict(zip(self.classes, raw, strict=True)),
            "decision": self.decision,
            "decided_by": calibration.describe(self.decision),
            "classes": list(self.classes),
            "slices": self.slices,
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "demo": self.model.demo,
                "label": self.model.label,
            },
        }


def answer_image(image: InputImage, bundle: ModelBundle, batch_size: int = 16) -> ImageAnswer:
    """The model's class and probabilities for one input (slices combined by ``image.rule``)."""
    found = classify_image(image, bundle, batch_size)
    return ImageAnswer(
        predicted_class=found.predicted_class,
        classes=found.classes,
        probabilities=found.probabilities,
        slices=len(found.slices),
        model=bundle.info.identity(),
        raw_probabilities=found.raw_probabilities,
        decision=found.decision,
    )
