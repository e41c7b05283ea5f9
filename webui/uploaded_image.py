"""One uploaded file, in memory: what it is, its slices as the model sees them, the model's answer.

A PNG or JPEG is an already windowed 8-bit slice (as the seed's app took them) and is
classified as it is; a DICOM file goes through the node's own steps (axial CT check → HU →
lung-bearing slices → window), so an upload is judged as a stored study would be. The file's
type is read from its contents, never from its name.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.analysis import imaging
from node.analysis.analyze import AnalysisError, AnalysisOptions, windowed_lung_slices
from node.analysis.bundle import ModelBundle
from node.analysis.result import ModelIdentity, aggregate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_PREFIX_AT, DICOM_PREFIX = 128, b"DICM"
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
MAX_IMAGE_SIDE = 8192  # a decompression bomb is refused before it is decoded
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


class UploadError(ValueError):
    """An upload that cannot be classified; the message tells the user why."""


@dataclass(frozen=True)
class UploadedImage:
    """A readable upload: its kind, the slices the model gets, and how they are combined."""

    kind: str  # "png", "jpeg" or "dicom"
    slices: np.ndarray  # (N, H, W) uint8, windowed
    rule: str  # how slice probabilities become one answer (node.result.aggregate)

    @property
    def suffix(self) -> str:
        """The file suffix a kept copy gets."""
        return SUFFIXES[self.kind]


@dataclass(frozen=True)
class UploadResult:
    """The model's answer for an upload, with the identity of the model that gave it."""

    predicted_class: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]
    slices: int
    model: ModelIdentity

    def as_dict(self) -> dict:
        return {
            "predicted_class": self.predicted_class,
            "probabilities": dict(zip(self.classes, self.probabilities, strict=True)),
            "classes": list(self.classes),
            "slices": self.slices,
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "demo": self.model.demo,
                "label": self.model.label,
            },
        }


def file_kind(data: bytes) -> str:
    """``png``, ``jpeg`` or ``dicom`` from the first bytes; UploadError for anything else."""
    if not data:
        raise UploadError("The file is empty.")
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if data[DICOM_PREFIX_AT : DICOM_PREFIX_AT + 4] == DICOM_PREFIX:
        return "dicom"
    raise UploadError(
        "This is not an image: give a PNG, a JPEG or a DICOM file "
        "(a DICOM Part 10 file, with the 'DICM' prefix)."
    )


def read_upload(data: bytes, options: AnalysisOptions) -> UploadedImage:
    """The slices of an upload as the model sees them; UploadError says what is wrong."""
    kind = file_kind(data)
    if kind != "dicom":
        return UploadedImage(kind, read_picture(data)[np.newaxis], "mean")
    ds = read_dicom(data)
    try:
        _frames, slices = windowed_lung_slices([ds], options)
    except AnalysisError as exc:
        raise UploadError(f"The DICOM image shows no lungs to classify: {exc}.") from None
    except imaging.ImagingError as exc:
        raise UploadError(f"The DICOM pixel data cannot be read: {exc}.") from None
    except _DICOM_ERRORS as exc:
        raise UploadError(f"The DICOM file is damaged: {_short(exc)}.") from None
    return UploadedImage(kind, slices, options.rule)


def read_picture(data: bytes) -> np.ndarray:
    """An 8-bit grayscale image from PNG or JPEG bytes."""
    try:
        image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise UploadError("The image cannot be read: it is not a valid PNG or JPEG file.") from None
    with image:
        if max(image.size) > MAX_IMAGE_SIDE:
            raise UploadError(
                f"The image is {image.size[0]}×{image.size[1]} pixels; "
                f"at most {MAX_IMAGE_SIDE} on a side is accepted."
            )
        try:
            return np.asarray(image.convert("L"), dtype=np.uint8)
        except (OSError, ValueError) as exc:  # truncated or corrupt image data
            raise UploadError(f"The image data is damaged: {_short(exc)}.") from None


def read_dicom(data: bytes) -> Dataset:
    """A DICOM dataset that is an axial grayscale CT image with pixel data."""
    try:
        ds = dcmread(io.BytesIO(data))
        reason = imaging.skip_reason(ds)
    except _DICOM_ERRORS as exc:
        raise UploadError(f"The DICOM file cannot be read: {_short(exc)}.") from None
    if "SOPClassUID" not in ds:
        raise UploadError(
            "The DICOM file cannot be read: it has no SOP Class UID (damaged, or not an image)."
        )
    if reason == "no pixel data":
        raise UploadError("The DICOM file has no pixel data: it is not an image.")
    if reason is not None:
        raise UploadError(f"The DICOM file is not a CT slice that can be classified: {reason}.")
    return ds


def dicom_preview(data: bytes, window: imaging.Window) -> bytes:
    """The middle frame of a DICOM upload, windowed, as PNG bytes."""
    ds = read_dicom(data)
    try:
        frames = imaging.windowed_slices(ds, window)
    except imaging.ImagingError as exc:
        raise UploadError(f"The DICOM pixel data cannot be read: {exc}.") from None
    except _DICOM_ERRORS as exc:
        raise UploadError(f"The DICOM file is damaged: {_short(exc)}.") from None
    return imaging.to_png_bytes(frames[len(frames) // 2])


def classify_upload(
    image: UploadedImage, bundle: ModelBundle, batch_size: int = 16
) -> UploadResult:
    """The model's class and probabilities for an upload (slices combined by ``image.rule``)."""
    classes = bundle.info.classes
    probabilities = bundle.predict(image.slices, batch_size=batch_size)
    predicted, combined = aggregate(probabilities, classes, rule=image.rule)
    return UploadResult(
        predicted_class=predicted,
        classes=classes,
        probabilities=tuple(float(p) for p in combined),
        slices=len(image.slices),
        model=bundle.info.identity(),
    )


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
