"""The upload page's side of classifying one file: its errors, its answer, its preview.

Reading an upload into the slices the model sees (its type from its contents, never its name;
decompression bombs refused before they are decoded) and the model's answer are
:mod:`node.analysis.classify`'s, the same path ``ainode classify`` takes; here is only what the
page shows.
"""

from __future__ import annotations

from node.analysis import imaging
from node.analysis.classify import (
    ClassifyError,
    file_kind,
    read_dicom,
    read_picture,
    windowed_frames,
)


class UploadError(ClassifyError):
    """An upload that cannot be classified; the message tells the user why."""


def preview_png(
    data: bytes, window: imaging.Window, limits: imaging.DecodeLimits = imaging.DEFAULT_LIMITS
) -> bytes:
    """The upload as PNG bytes: a picture as it is, a DICOM file's middle frame windowed
    (refused undecoded when its pixel data declares more than ``limits``)."""
    if file_kind(data) != "dicom":
        return imaging.to_png_bytes(read_picture(data))
    frames = windowed_frames(read_dicom(data, limits), window, limits)
    return imaging.to_png_bytes(frames[len(frames) // 2])
