"""CT pixels to model input: decode, Hounsfield units, lung window, uint8 (the seed's eq. 1-5).

Pure functions: pydicom Datasets or arrays in, arrays out. Resizing to the model's input size
happens inside the model (a Keras ``Resizing`` layer), so nothing here resizes.

Conventions, fixed by :data:`PREPROCESSING_VERSION` (bump it if any output changes):

- HU are float32; pixel padding is NaN, and NaN windows to 0 (black).
- A window maps ``C - W/2 .. C + W/2`` linearly to 0..255 (the seed's equations, not DICOM's
  ``C - 0.5`` / ``W - 1`` LINEAR function) and rounds half up.
- MONOCHROME1 is not inverted: after the modality LUT a CT value is HU whatever the
  photometric interpretation, which only says how to display it. Air is always dark here,
  as in the training images.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
)

PREPROCESSING_VERSION = "hu-window-uint8/1"

# the image classes the analysis reads: only these can change a study's result
CT_STORAGE = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
# Gantry tilt reaches 30 degrees on most scanners; a tilted acquisition is still axial.
AXIAL_TOLERANCE_DEGREES = 30.0
# pydicom tries libjpeg first for JPEG-LS; CharLS (pyjpegls) decodes it about 4x faster.
_PREFERRED_PLUGINS = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}
BODY_MIN_HU = -500.0
LUNG_HU_RANGE = (-950.0, -500.0)


class ImagingError(ValueError):
    """The pixels of an instance cannot be used; the message says why in DICOM's words."""


TOO_LARGE = "image too large to decode"  # how every refusal of :func:`check_decode_size` starts


class ImageTooLarge(ImagingError):
    """Pixel data that declares more than the decode limits: refused before it is decoded.

    ``size`` says what the header declares, ``limits`` the limits it is over (both words).
    """

    def __init__(self, message: str, size: str = "", limits: str = "") -> None:
        super().__init__(message)
        self.size, self.limits = size, limits


@dataclass(frozen=True)
class DecodeLimits:
    """The most pixel data one instance may declare and still be decoded.

    A codec, and pydicom, allocate the whole array the header declares before the first
    byte is decoded, so a file of a few hundred bytes can claim 65535×65535 pixels (8 GB).
    Named as the settings that set them (``Settings.max_image_side`` ...).
    """

    max_image_side: int = 4096  # Rows and Columns (CT is 512, at most 1024)
    max_frames: int = 2048  # Number of Frames (a chest Enhanced CT has under 1000)
    max_decoded_mb: int = 512  # Rows × Columns × frames × samples × bytes allocated

    def __str__(self) -> str:
        return (
            f"max_image_side {self.max_image_side}, max_frames {self.max_frames}, "
            f"max_decoded_mb {self.max_decoded_mb}"
        )


DEFAULT_LIMITS = DecodeLimits()


@dataclass(frozen=True)
class Window:
    """A linear display window in HU: ``low = C - W/2``, ``high = C + W/2`` (eq. 1 and 2)."""

    center: float
    width: float

    def __post_init__(self) -> None:
        for name in ("center", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of HU, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.width <= 0:
            raise ValueError(f"width must be greater than 0 HU, got {self.width!r}")

    @property
    def low(self) -> float:
        """HU shown black (the seed's Window_min)."""
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        """HU shown white (the seed's Window_max)."""
        return self.center + self.width / 2


LUNG = Window(-600.0, 1500.0)  # COVIDx CT-2 convention: -1350 .. 150 HU
MEDIASTINUM = Window(40.0, 400.0)
PRESETS = {"lung": LUNG, "mediastinum": MEDIASTINUM}


# --------------------------------------------------------------------------- arrays


def to_hounsfield(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``HU = stored * slope + intercept`` (eq. 4) as a new float32 array."""
    for name, value in (("slope", slope), ("intercept", intercept)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if slope == 0:
        raise ValueError("slope must not be 0")
    if slope == 1:
        return np.add(stored, np.float32(intercept), dtype=np.float32)
    hu = np.multiply(stored, np.float32(slope), dtype=np.float32)
    hu += np.float32(intercept)
    return hu


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """Window HU to uint8 (eq. 5): ``(HU - low) / W * 255``, clipped to 0..255.

    Rounds half up (``floor(v + 0.5)``) in float32; NaN (padding) gives 0.
    """
    out = np.subtract(hu, np.float32(window.low), dtype=np.float32)
    out *= np.float32(255.0 / window.width)
    out += np.float32(0.5)
    np.fmax(out, np.float32(0.0), out=out)  # fmax, unlike maximum, turns NaN into 0
    np.fmin(out, np.float32(255.0), out=out)
    return out.astype(np.uint8)  # truncation of v + 0.5 >= 0 is rounding half up


def lung_fraction(hu: np.ndarray) -> float:
    """Fraction of the body that is lung-like (-950..-500 HU); ~0 on a slice without lungs.

    The body is HU > -500 with its holes filled: a hole is whatever cannot reach the image
    border without crossing the body, so air around the patient and in an open table core
    does not count. Computed on every second row and column, which is plenty for a fraction.
    """
    if hu.ndim != 2 or 0 in hu.shape:
        raise ValueError(f"hu must be a non-empty 2-D slice, got shape {hu.shape}")
    grid = hu[::2, ::2]
    body = _fill_holes(grid > BODY_MIN_HU)  # NaN padding compares False: outside
    lung = (grid >= LUNG_HU_RANGE[0]) & (grid <= LUNG_HU_RANGE[1]) & body
    area = np.count_nonzero(body)
    return float(np.count_nonzero(lung) / area) if area else 0.0


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus the pixels that are cut off from the image border by it (4-connected)."""
    open_ = ~mask
    # Spreading along whole runs of open pixels, by rows then by columns, takes one sweep
    # per turn of the way out rather than one step per pixel.
    runs = [_runs(open_), np.ascontiguousarray(_runs(np.ascontiguousarray(open_.T)).T)]
    reached = np.zeros_like(mask)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        reached[edge] = open_[edge]
    count, sweep = np.count_nonzero(reached), 0
    while True:
        labels = runs[sweep % 2]
        hit = np.bincount(labels[reached], minlength=int(labels.max()) + 1) > 0
        hit[0] = False  # label 0 is the mask itself
        reached = np.take(hit, labels)
        sweep += 1
        # A sweep that adds nothing leaves a set closed under both directions.
        if count == (count := np.count_nonzero(reached)) and sweep > 1:
            return ~reached


def _runs(open_: np.ndarray) -> np.ndarray:
    """Label each run of open pixels within a row 1, 2, ...; masked pixels get 0."""
    flat = open_.ravel()
    starts = flat.copy()
    starts[1:] &= ~flat[:-1]
    starts[:: open_.shape[1]] = flat[:: open_.shape[1]]  # a run never crosses a row end
    labels = np.cumsum(starts, dtype=np.int32)
    labels[~flat] = 0
    return labels.reshape(open_.shape)


def select_slices(
    fractions: Sequence[float], stride: int = 1, min_lung_fraction: float = 0.05
) -> list[int]:
    """Indices from the first to the last lung-bearing slice, every ``stride``-th.

    A slice is lung-bearing when its lung fraction is >= ``min_lung_fraction``. The
    whole span between the first and the last is kept: a slice whose lungs are filled
    by consolidation scores low on lung-like HU, and it is exactly the one that must
    not be dropped. ``fractions`` must be in slice-position order (:func:`slice_order`).
    """
    if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if not 0.0 <= min_lung_fraction <= 1.0:
        raise ValueError(f"min_lung_fraction must be between 0 and 1, got {min_lung_fraction!r}")
    lung_bearing = [i for i, value in enumerate(fractions) if value >= min_lung_fraction]
    if not lung_bearing:
        return []
    return list(range(lung_bearing[0], lung_bearing[-1] + 1))[::stride]


def to_png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Encode a 2-D uint8 image as an 8-bit grayscale PNG (stdlib zlib, 'Up' row filter).

    Level 6 for files that are kept (exports); 1 for images served while a radiologist
    scrolls, about 9x faster to encode for 10 % more bytes.
    """
    if image.ndim != 2 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(
            f"image must be a non-empty 2-D uint8 array, got {image.dtype} {image.shape}"
        )
    rows, cols = image.shape
    filtered = np.empty((rows, cols + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # 'Up': neighbouring CT rows are alike, so differences compress well
    filtered[0, 1:] = image[0]
    np.subtract(image[1:], image[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG wants
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0))
    pixels = _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), compress_level))
    return b"\x89PNG\r\n\x1a\n" + header + pixels + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


# --------------------------------------------------------------------------- datasets


def skip_reason(ds: Dataset) -> str | None:
    """Why an instance is not analysed (not an axial grayscale CT image), or None."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in CT_STORAGE:
        modality = str(ds.get("Modality", "") or "")
        label = modality if modality not in ("", "CT") else UID(sop_class).name or "no SOP class"
        return f"not a CT image ({label})"
    if "PixelData" not in ds:
        return "no pixel data"
    image_type = ds.get("ImageType") or []
    image_type = [
        str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)
    ]
    if "LOCALIZER" in image_type:
        return "localizer image"
    photometric = str(ds.get("PhotometricInterpretation", "") or "none")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"not a grayscale image ({photometric})"
    # Image Type value 3 is AXIAL for CT Image; Enhanced CT may call an axial stack VOLUME.
    axial_types = ("AXIAL",) if sop_class == CTImageStorage else ("AXIAL", "VOLUME")
    if len(image_type) >= 3 and image_type[2] and image_type[2] not in axial_types:
        return f"not axial (image type {'/'.join(image_type)})"
    orientation = _frame_attribute(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is not None:
        return _orientation_reason(orientation)
    return None


def _orientation_reason(orientation: Sequence[float]) -> str | None:
    """None for an axial plane (normal within the tolerance of head-feet), else the reason."""
    shown = "[" + ", ".join(f"{v:g}" for v in orientation) + "]"
    normal = np.cross(orientation[:3], orientation[3:]) if len(orientation) == 6 else np.zeros(3)
    length = float(np.linalg.norm(normal))
    if not length > 1e-6:
        return f"not axial (orientation {shown} is not a plane)"
    angle = math.degrees(math.acos(min(1.0, abs(normal[2]) / length)))
    if angle > AXIAL_TOLERANCE_DEGREES:
        return f"not axial (orientation {shown}, {angle:.0f}° from axial)"
    return None


def slice_order(datasets: Sequence[Dataset]) -> list[int]:
    """Indices ordered head to feet along the slice normal, or by Instance Number without one.

    Positions (Image Position Patient, or frame 1's Plane Position for Enhanced CT) are
    projected on the first instance's normal, turned to point at the head for axial slices.
    Ties and the fallback keep Instance Number order, then the input order.
    """
    numbers = [_instance_number(ds) for ds in datasets]
    positions = [
        _frame_attribute(ds, "PlanePositionSequence", "ImagePositionPatient") for ds in datasets
    ]
    orientation = datasets and _frame_attribute(
        datasets[0], "PlaneOrientationSequence", "ImageOrientationPatient"
    )
    if not orientation or len(orientation) != 6 or any(p is None or len(p) != 3 for p in positions):
        return sorted(range(len(datasets)), key=lambda i: (numbers[i], i))
    normal = np.cross(orientation[:3], orientation[3:])
    normal *= np.sign(normal[np.argmax(np.abs(normal))])  # axial: +z, towards the head
    height = [float(np.dot(normal, p)) for p in positions]
    return sorted(range(len(datasets)), key=lambda i: (-height[i], numbers[i], i))


def _instance_number(ds: Dataset) -> float:
    try:
        return float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return math.inf


def file_window(ds: Dataset) -> Window | None:
    """The file's own window (first of several values), or None when it has none.

    Read from the top level (CT Image) or frame 1's Frame VOI LUT (Enhanced CT).
    """
    source: Dataset | None = ds
    if "WindowCenter" not in ds and "WindowWidth" not in ds:
        source = _functional_item(ds, "FrameVOILUTSequence", 0)
    if source is None:
        return None
    center, width = _first(source.get("WindowCenter")), _first(source.get("WindowWidth"))
    if center is None and width is None:
        return None
    if center is None or width is None:
        raise ImagingError("the file has only one of Window Center and Window Width")
    try:
        return Window(float(center), float(width))
    except ValueError as exc:
        raise ImagingError(f"the file's window is not valid: {exc}") from None


def _first(value: object) -> object:
    if isinstance(value, MultiValue):
        return value[0] if len(value) else None
    return None if value in (None, "") else value


def windowed_slices(
    ds: Dataset, window: Window | None = LUNG, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """(frames, rows, columns) uint8 of an instance; ``None`` uses the file's window or LUNG."""
    if window is None:
        window = file_window(ds) or LUNG
    return apply_window(hounsfield_frames(ds, limits), window)


def hounsfield_frames(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """(frames, rows, columns) float32 HU of a CT or Enhanced CT instance; padding is NaN.

    Raises
    ------
    ImageTooLarge
        When the pixel data declares more than ``limits`` (nothing is decoded).
    ImagingError
        When the pixels cannot be decoded or converted to HU (the message says why).
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "none")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or ds.get("SamplesPerPixel", 1) != 1:
        raise ImagingError(f"not a grayscale image ({photometric})")
    check_decode_size(ds, limits)
    raw = _decode(ds)
    signed = ds.get("PixelRepresentation", 0) == 1
    bits_stored = int(ds.get("BitsStored") or raw.dtype.itemsize * 8)
    stored = _without_unused_bits(raw, bits_stored)
    rescale = _rescale(ds, len(raw))
    if len(set(rescale)) == 1:
        hu = to_hounsfield(stored, *rescale[0])
    else:
        hu = np.stack([to_hounsfield(f, *r) for f, r in zip(stored, rescale, strict=True)])
    padding = _padding(ds, raw, stored, bits_stored, signed)
    if padding is not None:
        np.copyto(hu, np.float32(np.nan), where=padding)
    return hu


def check_decode_size(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Refuse pixel data that declares more than ``limits``; reads only the header.

    Every decode goes through this first: Rows and Columns at most ``max_image_side``,
    Number of Frames at most ``max_frames``, and Rows × Columns × frames × Samples per
    Pixel × the bytes of Bits Allocated (what a decoder allocates) at most
    ``max_decoded_mb`` MB.

    Raises
    ------
    ImageTooLarge
        Naming the declared size and the limits.
    ImagingError
        When the dimensions cannot be read.
    """
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
    except (TypeError, ValueError) as exc:
        raise ImagingError(f"the image's dimensions cannot be read: {exc}") from None
    if frames < 1:
        raise ImagingError(f"Number of Frames {frames} is not valid")
    decoded = rows * columns * frames * samples * -(-bits // 8)
    if (
        max(rows, columns) <= limits.max_image_side
        and frames <= limits.max_frames
        and decoded <= limits.max_decoded_mb * 2**20
    ):
        return
    size = f"{columns}×{rows} pixels"
    size += f" × {frames} frames" if frames != 1 else ""
    size += f" × {samples} samples" if samples != 1 else ""
    size += f" of {bits} bits, {_amount(decoded)} decoded"
    raise ImageTooLarge(f"{TOO_LARGE}: {size} (limits: {limits})", size, f"limits: {limits}")


def _amount(size: int) -> str:
    """``8,192 MB``, ``4.0 MB`` or ``8 KB``: a byte count as people read it."""
    if size >= 10 * 2**20:
        return f"{size / 2**20:,.0f} MB"
    if size >= 2**20:
        return f"{size / 2**20:.1f} MB"
    return f"{size / 2**10:,.0f} KB"


def _decode(ds: Dataset) -> np.ndarray:
    """Pixels as stored, high bits untouched where the codec keeps them: (frames, rows, cols)."""
    if "PixelData" not in ds:
        raise ImagingError("no pixel data")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        raise ImagingError("no Transfer Syntax UID in the file meta information")
    try:
        if not syntax.is_encapsulated and syntax.is_little_endian:
            return _native_view(ds)
        pixels = _decode_encapsulated(ds, syntax)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise ImagingError(f"cannot decode the pixel data ({UID(syntax).name}): {exc}") from exc
    return pixels.reshape(-1, pixels.shape[-2], pixels.shape[-1])


def _decode_encapsulated(ds: Dataset, syntax: UID) -> np.ndarray:
    decoder = get_decoder(syntax)
    # Unused bits are cleared later, where the padding value can still see them.
    options = {"raw": True, "correct_unused_bits": False}
    preferred = _PREFERRED_PLUGINS.get(syntax)
    if preferred in decoder.available_plugins:
        try:
            return decoder.as_array(ds, decoding_plugin=preferred, **options)[0]
        except (RuntimeError, ValueError):
            pass  # a stream the fast plugin refuses may still suit another one
    return decoder.as_array(ds, **options)[0]


def _native_view(ds: Dataset) -> np.ndarray:
    """Uncompressed little-endian pixels as a read-only view on Pixel Data: no copy."""
    if ds.BitsAllocated not in (8, 16, 32):
        raise ValueError(f"Bits Allocated {ds.BitsAllocated} is not supported")
    dtype = np.dtype(f"<{'i' if ds.PixelRepresentation == 1 else 'u'}{ds.BitsAllocated // 8}")
    shape = (int(ds.get("NumberOfFrames") or 1), ds.Rows, ds.Columns)
    data = ds.PixelData
    if len(data) < math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes of Pixel Data are too few for {shape} {dtype.name}")
    return np.frombuffer(data, dtype, count=math.prod(shape)).reshape(shape)


def _without_unused_bits(raw: np.ndarray, bits_stored: int) -> np.ndarray:
    """Bits Stored values: high bits cleared (unsigned) or sign-extended (signed dtype)."""
    shift = raw.dtype.itemsize * 8 - bits_stored
    if shift <= 0:
        return raw
    stored = np.left_shift(raw, shift)
    np.right_shift(stored, shift, out=stored)  # arithmetic on signed dtypes
    return stored


def _rescale(ds: Dataset, frames: int) -> list[tuple[float, float]]:
    """(slope, intercept) per frame: Pixel Value Transformation for Enhanced CT, else top level."""
    out = []
    for index in range(frames):
        source = _functional_item(ds, "PixelValueTransformationSequence", index) or ds
        slope, intercept = source.get("RescaleSlope"), source.get("RescaleIntercept")
        if slope in (None, "") or intercept in (None, ""):
            raise ImagingError(
                f"no Rescale Slope/Intercept for frame {index + 1}: cannot compute HU"
            )
        if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
            raise ImagingError(
                f"Rescale Slope {slope} / Intercept {intercept} of frame {index + 1} is not valid"
            )
        out.append((float(slope), float(intercept)))
    return out


def _padding(
    ds: Dataset, raw: np.ndarray, stored: np.ndarray, bits_stored: int, signed: bool
) -> np.ndarray | None:
    """Where stored values are Pixel Padding Value (up to Pixel Padding Range Limit)."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    if not isinstance(value, int) or not isinstance(limit, int):
        raise ImagingError(f"Pixel Padding Value {value!r} is not an integer")
    low = -(1 << (bits_stored - 1)) if signed else 0
    high = low + (1 << bits_stored) - 1
    values = stored
    if not (low <= value <= high and low <= limit <= high):
        # Outside Bits Stored the scanner wrote it with all allocated bits (e.g. 0xF830
        # beside 12 bits stored), so compare the raw values read the same way.
        values = raw
        value, limit = (_as_allocated(v, raw.dtype) for v in (value, limit))
    first, last = sorted((value, limit))
    if first == last:
        return values == first
    return (values >= first) & (values <= last)


def _as_allocated(value: int, dtype: np.dtype) -> int:
    """``value`` as the raw array's dtype reads the same bit pattern."""
    bits = dtype.itemsize * 8
    value %= 1 << bits
    return value - (1 << bits) if dtype.kind == "i" and value >= 1 << (bits - 1) else value


def _functional_item(ds: Dataset, keyword: str, frame: int) -> Dataset | None:
    """A functional group macro for a frame: Per-frame first, then Shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame) and per_frame[frame].get(keyword):
        return per_frame[frame].get(keyword)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(keyword):
        return shared[0].get(keyword)[0]
    return None


def _frame_attribute(ds: Dataset, sequence: str, keyword: str) -> list[float] | None:
    """A top-level attribute, or frame 1's from its functional group (Enhanced CT)."""
    value = ds.get(keyword)
    if value is None:
        item = _functional_item(ds, sequence, 0)
        value = item.get(keyword) if item is not None else None
    try:
        return None if value is None else [float(v) for v in value]
    except (TypeError, ValueError):
        return None  # unreadable geometry counts as absent
