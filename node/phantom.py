"""Deterministic synthetic chest-CT phantom: HU volumes, DICOM series and transfer syntaxes."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

CLASSES = ("covid", "normal", "pneumonia")
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": str(ExplicitVRLittleEndian),
    "implicit": str(ImplicitVRLittleEndian),
    "jpeg-lossless": str(JPEGLosslessSV1),
    "jpeg-ls": str(JPEGLSLossless),
    "jpeg2000": str(JPEG2000Lossless),
    "rle": str(RLELossless),
}
_CHARSETS = ("ISO_IR 100", "ISO_IR 192")

# pydicom encoder plugin per compressed syntax; JPEG Lossless SV1 goes through DCMTK instead.
_ENCODING_PLUGINS = {
    RLELossless: "pydicom",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
}
_PYTHON_CODECS = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}

# Scanner-like constants. Anatomy is modelled in a canonical patient frame in millimetres:
# x to the patient's left, y to the back (both as DICOM LPS, so rows and columns map
# directly), depth d from the top of the scan range downwards (0 .. _SCAN_LENGTH).
_FOV_MM = 360.0
_SCAN_LENGTH = 300.0
_Z_TOP = -60.0
_INTERCEPT = -1024
_PADDING_STORED = -2000
_HU_MIN, _HU_MAX = -1024, 3071
_NOISE_SD = 10.0
# A [1, 2, 1] / 4 blur in both directions keeps this fraction of white-noise sd.
_BLUR_NOISE_GAIN = 0.375
_MANUFACTURER = "ainode phantom"

_AIR, _FAT, _MEDIASTINAL_FAT, _MUSCLE, _BLOOD = -1000.0, -100.0, -85.0, 45.0, 40.0
_LIVER, _SPLEEN, _FLUID, _DISC, _CORD = 58.0, 48.0, 12.0, 85.0, 25.0
_CORTEX, _MARROW, _RIB, _CARTILAGE = 850.0, 230.0, 550.0, 120.0
_LUNG_ANTERIOR, _LUNG_POSTERIOR = -940.0, -880.0
_BODY_CY, _BODY_A, _BODY_B = -5.0, 160.0, 110.0
_CAV_CY, _CAV_A, _CAV_B = -8.0, 134.0, 83.0
_VERTEBRA = (0.0, 40.0, 19.0, 16.0)
_HILA = {"right": (-42.0, 0.0, 122.0), "left": (44.0, -4.0, 126.0)}
_SIDE_SIGN = {"right": -1.0, "left": 1.0}


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate: the finding, size, seed and the identifying DICOM attributes.

    Every field is validated on construction; a bad value raises ``ValueError`` naming it.
    ``None`` UIDs are derived deterministically from the other fields, so the same spec
    always yields the same study, series and SOP Instance UIDs.
    """

    finding: str = "normal"
    slices: int = 60
    seed: int = 0
    patient_name: str = "PHANTOM^CHEST"
    patient_id: str = "PH0001"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    accession_number: str = "ACC0001"
    study_description: str = "Tórax Simple"
    series_description: str = "Torax 5mm"
    study_date: str = "20260110"
    study_time: str = "101500"
    charset: str = "ISO_IR 192"
    rows: int = 512
    columns: int = 512

    def __post_init__(self) -> None:
        if self.finding not in CLASSES:
            raise ValueError(f"finding must be one of {', '.join(CLASSES)}, got {self.finding!r}")
        _check_int("slices", self.slices, 1, 600)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("rows", self.rows, 64, 1024)
        _check_int("columns", self.columns, 64, 1024)
        if self.charset not in _CHARSETS:
            raise ValueError(f"charset must be one of {', '.join(_CHARSETS)}, got {self.charset!r}")
        for name, limit in _TEXT_LIMITS.items():
            _check_text(name, getattr(self, name), limit, self.charset)
        if self.patient_sex not in ("M", "F", "O", ""):
            raise ValueError(f"patient_sex must be M, F, O or empty, got {self.patient_sex!r}")
        _check_date("study_date", self.study_date, allow_empty=False)
        _check_date("patient_birth_date", self.patient_birth_date, allow_empty=True)
        if self.patient_birth_date and self.patient_birth_date > self.study_date:
            raise ValueError(
                f"patient_birth_date must not be after study_date {self.study_date}, "
                f"got {self.patient_birth_date!r}"
            )
        _check_time("study_time", self.study_time)
        _check_uid("study_instance_uid", self.study_instance_uid)
        _check_uid("series_instance_uid", self.series_instance_uid)


# Field -> maximum length of its DICOM value representation (PN component group, LO, SH).
_TEXT_LIMITS = {
    "patient_name": 64,
    "patient_id": 64,
    "accession_number": 16,
    "study_description": 64,
    "series_description": 64,
}


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")


def _check_text(name: str, value: object, limit: int, charset: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {value!r}")
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        raise ValueError(
            f"{name} must not contain backslashes or control characters, got {value!r}"
        )
    try:
        value.encode(_PYTHON_CODECS[charset])
    except UnicodeEncodeError:
        raise ValueError(f"{name} cannot be encoded in {charset}, got {value!r}") from None


def _check_date(name: str, value: object, *, allow_empty: bool) -> None:
    if allow_empty and value == "":
        return
    try:
        if not (isinstance(value, str) and re.fullmatch(r"[0-9]{8}", value)):
            raise ValueError
        datetime.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise ValueError(f"{name} must be a date YYYYMMDD, got {value!r}") from None


def _check_time(name: str, value: object) -> None:
    try:
        if not (isinstance(value, str) and re.fullmatch(r"[0-9]{6}", value)):
            raise ValueError
        datetime.datetime.strptime(value, "%H%M%S")
    except ValueError:
        raise ValueError(f"{name} must be a time HHMMSS, got {value!r}") from None


_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def _check_uid(name: str, value: object) -> None:
    if value is None:
        return
    # Checked here rather than with pydicom's UID, which warns as it validates.
    if not (isinstance(value, str) and len(value) <= 64 and _UID_PATTERN.fullmatch(value)):
        raise ValueError(f"{name} must be a valid DICOM UID (at most 64 characters), got {value!r}")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
    """Pixel grid, slice positions and the seed-dependent patient size.

    Anatomy is painted only inside ``crop`` (the body's bounding box) to save time.
    """

    rows: int
    columns: int
    pixel_spacing: float
    thickness: float
    depths: np.ndarray  # canonical depth of each slice centre, top to bottom
    scale_x: float
    scale_y: float
    crop: tuple[slice, slice] = (slice(None), slice(None))

    @property
    def x_full(self) -> np.ndarray:
        """Canonical x of each column, as a row vector for broadcasting."""
        cols = np.arange(self.columns, dtype=np.float32) - (self.columns - 1) / 2
        return (cols * np.float32(self.pixel_spacing / self.scale_x))[None, :]

    @property
    def y_full(self) -> np.ndarray:
        """Canonical y of each row, as a column vector for broadcasting."""
        rows = np.arange(self.rows, dtype=np.float32) - (self.rows - 1) / 2
        return (rows * np.float32(self.pixel_spacing / self.scale_y))[:, None]

    @property
    def x(self) -> np.ndarray:
        return self.x_full[:, self.crop[1]]

    @property
    def y(self) -> np.ndarray:
        return self.y_full[self.crop[0]]

    @property
    def crop_shape(self) -> tuple[int, int]:
        return self.y.shape[0], self.x.shape[1]

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest (row, column) of canonical points, counted from the crop's corner."""
        col = np.rint(x * self.scale_x / self.pixel_spacing + (self.columns - 1) / 2)
        row = np.rint(y * self.scale_y / self.pixel_spacing + (self.rows - 1) / 2)
        return row.astype(np.int64) - self.crop[0].start, col.astype(np.int64) - self.crop[1].start

    def fov_mask(self) -> np.ndarray:
        """Pixels inside the circular reconstructed field of view."""
        radius = min(self.rows, self.columns) / 2
        r = np.arange(self.rows) - (self.rows - 1) / 2
        c = np.arange(self.columns) - (self.columns - 1) / 2
        return r[:, None] ** 2 + c[None, :] ** 2 <= radius**2


def _geometry(spec: PhantomSpec, rng: np.random.Generator) -> _Geometry:
    # The series always spans apex to upper abdomen, so thickness follows the slice count
    # (60 slices -> 5 mm, 200 -> 1.5 mm) and spacing between slices equals thickness.
    thickness = _SCAN_LENGTH / spec.slices
    geom = _Geometry(
        rows=spec.rows,
        columns=spec.columns,
        pixel_spacing=_FOV_MM / min(spec.rows, spec.columns),
        thickness=thickness,
        depths=((np.arange(spec.slices) + 0.5) * thickness).astype(np.float32),
        scale_x=float(rng.uniform(0.94, 1.04)),
        scale_y=float(rng.uniform(0.93, 1.05)),
    )
    margin = 3.0
    cols = np.searchsorted(geom.x_full[0], [-_BODY_A - margin, _BODY_A + margin])
    rows = np.searchsorted(geom.y_full[:, 0], [_BODY_CY - _BODY_B - margin, 100.0 + margin])
    crop = (slice(int(rows[0]), int(rows[1])), slice(int(cols[0]), int(cols[1])))
    return dataclasses.replace(geom, crop=crop)


# --------------------------------------------------------------------------- shapes


def _ellipse(x, y, cx, cy, a, b) -> np.ndarray:
    """Axis-aligned ellipse test; with a row-vector x and column-vector y it costs one pass."""
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _bump(d, centre: float, width: float):
    return np.exp(-(((d - centre) / width) ** 2))


def _rounded(x, y, cx, cy, a, b, power: float = 2.4) -> np.ndarray:
    """Superellipse: a chest is boxier than an ellipse. Separable, so as cheap as one."""
    return np.abs((x - cx) / a) ** power + np.abs((y - cy) / b) ** power <= 1.0


def _cavity(x, y, grow: float = 0.0) -> np.ndarray:
    """Inner contour of the chest wall (ribs lie just outside it)."""
    return _rounded(x, y, 0.0, _CAV_CY, _CAV_A + grow, _CAV_B + grow)


def _apex_growth(d):
    """0 above the lung apices, 1 once the lungs reach full width (about 10 cm lower)."""
    return np.clip((d - 6.0) / 105.0, 0.0, 1.0) ** 0.6


_HEART_X, _HEART_Y = 18.0, -20.0
# The long axis points from the atria (right, back) to the apex (left, front).
_HEART_COS, _HEART_SIN = math.cos(math.radians(-40.0)), math.sin(math.radians(-40.0))


def _heart_axes(d, grow: float) -> tuple:
    """Semi-axes of the heart at a depth; zero outside its craniocaudal extent."""
    profile = np.sqrt(np.clip(1.0 - ((d - 190.0) / 55.0) ** 2, 0.0, 1.0)) * (d < 240.0)
    return 58.0 * profile + grow * (profile > 0), 44.0 * profile + grow * (profile > 0)


def _heart(x, y, d, grow: float = 0.0) -> np.ndarray:
    """The heart: a tilted ellipse, widest at mid depth (points or a broadcast grid)."""
    a, b = _heart_axes(d, grow)
    u = (x - _HEART_X) * _HEART_COS + (y - _HEART_Y) * _HEART_SIN
    v = (y - _HEART_Y) * _HEART_COS - (x - _HEART_X) * _HEART_SIN
    return (u / np.maximum(a, 1e-3)) ** 2 + (v / np.maximum(b, 1e-3)) ** 2 <= 1.0


def _window(x, y, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
    """Rows and columns of a grid within ``reach`` mm of a point, to skip empty pixels."""
    cols = np.searchsorted(x[0], [cx - reach, cx + reach])
    rows = np.searchsorted(y[:, 0], [cy - reach, cy + reach])
    return slice(int(rows[0]), int(rows[1])), slice(int(cols[0]), int(cols[1]))


def _heart_on_grid(x, y, d: float, grow: float = 0.0) -> np.ndarray:
    mask = np.zeros((y.shape[0], x.shape[1]), dtype=bool)
    a, b = _heart_axes(d, grow)
    if a > 0:
        rows, cols = _window(x, y, _HEART_X, _HEART_Y, max(a, b))
        mask[rows, cols] = _heart(x[:, cols], y[rows], d, grow)
    return mask


def _dome_depth(x, y, side: str):
    """Depth of the hemidiaphragm under a point; lower at the periphery and posteriorly."""
    xc, yc, dc = (-60.0, -10.0, 212.0) if side == "right" else (60.0, 0.0, 226.0)
    return dc + ((x - xc) ** 2 + (y - yc) ** 2) / 150.0 + 0.3 * (y - yc)


def _lung_exclusion(x, y, d, heart: np.ndarray) -> np.ndarray:
    """Mediastinum, spine and pericardium, which neither lung may enter."""
    mediastinum = _ellipse(x, y, 0.0, -15.0, 22.0 + 12.0 * _bump(d, 110.0, 30.0), 80.0)
    return mediastinum | _ellipse(x, y, 0.0, 52.0, 26.0, 36.0) | heart


def _lung(x, y, d, side: str, excluded: np.ndarray | None = None) -> np.ndarray:
    """Lung of one side from chest wall, apex, diaphragm, mediastinum, heart and spine.

    Works on canonical point arrays and on a broadcast slice grid (scalar ``d``); on a grid
    pass ``excluded`` (see :func:`_lung_exclusion`) to share it between the two sides.
    """
    sign = _SIDE_SIGN[side]
    g = _apex_growth(d)
    envelope = _ellipse(x, y, sign * (58.0 + 12.0 * g), 22.0 - 17.0 * g, 12 + 78 * g, 16 + 99 * g)
    inside = _cavity(x, y) & envelope & (sign * x > 0) & (d < _dome_depth(x, y, side)) & (g > 0)
    if excluded is None:
        excluded = _lung_exclusion(x, y, d, _heart(x, y, d, grow=4.0))
    return inside & ~excluded


# --------------------------------------------------------------------------- tubes


@dataclass(frozen=True)
class _Tubes:
    """Points sampled along tubular structures, sorted by depth for slab look-ups."""

    x: np.ndarray
    y: np.ndarray
    d: np.ndarray
    r: np.ndarray
    sin_tilt: np.ndarray  # sine of the angle to the slice normal, for partial volume

    def slab(self, depth: float, half: float) -> slice:
        lo, hi = np.searchsorted(self.d, [depth - half, depth + half])
        return slice(int(lo), int(hi))

    def subset(self, keep: np.ndarray) -> _Tubes:
        return _Tubes(self.x[keep], self.y[keep], self.d[keep], self.r[keep], self.sin_tilt[keep])


def _sample_segments(starts, dirs, lengths, radii, step: tuple[float, float]) -> _Tubes:
    """Points along straight segments (columns: x, y, d), dense enough to draw them.

    ``step`` is (in-plane, through-plane) spacing in mm: about a pixel in-plane and half a
    slice thickness along z, so steep vessels on thick slices need few points.
    """
    sin = np.sqrt(np.clip(1.0 - dirs[:, 2] ** 2, 0.0, 1.0))
    spacing = np.minimum(
        step[0] / np.maximum(sin, 1e-3), step[1] / np.maximum(np.abs(dirs[:, 2]), 1e-3)
    )
    counts = np.maximum(1, np.ceil(lengths / spacing)).astype(np.int64)
    seg = np.repeat(np.arange(len(counts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    t = (np.arange(counts.sum()) - first + 0.5) / counts[seg]
    pos = starts[seg] + dirs[seg] * (t * lengths[seg])[:, None]
    order = np.argsort(pos[:, 2], kind="stable")
    cols = [pos[order, 0], pos[order, 1], pos[order, 2], radii[seg][order], sin[seg][order]]
    return _Tubes(*(c.astype(np.float32) for c in cols))


def _polylines(lines: Sequence[tuple[float, Sequence[tuple]]], step: tuple) -> _Tubes:
    """Tubes of constant radius through canonical (x, y, d) vertices."""
    starts, ends, radii = [], [], []
    for radius, vertices in lines:
        v = np.asarray(vertices, dtype=np.float64)
        starts.append(v[:-1])
        ends.append(v[1:])
        radii.append(np.full(len(v) - 1, radius))
    start, end = np.concatenate(starts), np.concatenate(ends)
    lengths = np.linalg.norm(end - start, axis=1)
    dirs = (end - start) / lengths[:, None]
    return _sample_segments(start, dirs, lengths, np.concatenate(radii), step)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _lung_cloud(rng, side: str, count: int) -> np.ndarray:
    """``count`` points spread uniformly through one lung (canonical x, y, d)."""
    found = []
    total = 0
    while total < count:
        n = 8 * count
        pts = np.column_stack(
            [
                _SIDE_SIGN[side] * rng.uniform(0, 145, n),
                rng.uniform(-95, 80, n),
                rng.uniform(0, _SCAN_LENGTH, n),
            ]
        )
        pts = pts[_lung(pts[:, 0], pts[:, 1], pts[:, 2], side)]
        found.append(pts)
        total += len(pts)
    return np.concatenate(found)[:count]


def _halves(rng, cloud: np.ndarray, group: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Which half of its group each point falls in, split across the group's widest axis."""
    groups = len(count)
    mean = np.stack([np.bincount(group, cloud[:, k], groups) for k in range(3)], 1)
    mean /= count[:, None]
    spread = np.stack([np.bincount(group, cloud[:, k] ** 2, groups) for k in range(3)], 1)
    spread = spread / count[:, None] - mean**2
    # The widest axis, tilted at random so that branching angles vary.
    axis = _unit(np.eye(3)[np.argmax(spread, axis=1)] + 0.5 * rng.normal(size=(groups, 3)))
    projection = np.einsum("ij,ij->i", cloud, axis[group])
    order = np.lexsort((projection, group))
    first = np.cumsum(count) - count
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(group)) - first[group[order]]
    return rank >= count[group] // 2


def _centroid_tree(rng, cloud: np.ndarray, root, root_radius: float):
    """A space-filling tree: segments (starts, ends, radii).

    Each branch supplies a set of lung points: it runs part of the way towards their
    centroid, then splits them in two halves for its daughters, until one point is left.
    Radii follow Murray's law (r**3 proportional to the tissue supplied).
    """
    group = np.zeros(len(cloud), dtype=np.int64)
    start = np.asarray(root, dtype=np.float64)[None, :]
    parts = []
    while len(cloud):
        count = np.bincount(group)
        centroid = np.stack([np.bincount(group, cloud[:, k]) for k in range(3)], 1)
        centroid /= count[:, None]
        reach = np.where(count > 1, rng.uniform(0.35, 0.6, len(count)), 1.0)
        end = start + reach[:, None] * (centroid - start)
        parts.append((start, end, root_radius * (count / count.sum()) ** (1 / 3)))
        split = count > 1
        upper = _halves(rng, cloud, group, count)
        keep = split[group]
        child, group = np.unique(2 * group[keep] + upper[keep], return_inverse=True)
        cloud, start = cloud[keep], end[child // 2]
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


@dataclass(frozen=True)
class _LungTrees:
    """Pulmonary arteries and veins, and the bronchi that accompany the arteries."""

    vessels: _Tubes
    airways: _Tubes  # visible bronchi (radius > 1.5 mm)
    small_airways: _Tubes  # down to 0.45 mm: only seen as air bronchograms


def _segments(starts, ends, radii) -> tuple:
    """(starts, unit directions, lengths, radii) of the non-degenerate segments."""
    lengths = np.linalg.norm(ends - starts, axis=1)
    keep = lengths > 1e-6
    dirs = (ends[keep] - starts[keep]) / lengths[keep, None]
    return starts[keep], dirs, lengths[keep], radii[keep]


def _lung_trees(rng: np.random.Generator, step: tuple[float, float]) -> _LungTrees:
    """Arteries from each hilum, veins towards the left atrium, bronchi beside arteries."""
    vessels, airways = [], []
    for side, hilum in _HILA.items():
        arteries = _segments(*_centroid_tree(rng, _lung_cloud(rng, side, 2400), hilum, 6.5))
        atrium = np.asarray(hilum) + [-_SIDE_SIGN[side] * 10.0, 15.0, 30.0]
        veins = _segments(*_centroid_tree(rng, _lung_cloud(rng, side, 2400), atrium, 6.5))
        vessels += [_sample_segments(*arteries, step), _sample_segments(*veins, step)]
        airways.append(_bronchi_beside(*arteries, step))
    trees = [_concat_tubes(parts) for parts in (vessels, airways)]
    inside = [_in_any_lung(t) for t in trees]
    vessels_t, airways_t = (t.subset(k) for t, k in zip(trees, inside, strict=True))
    return _LungTrees(
        vessels=vessels_t,
        airways=airways_t.subset(airways_t.r > 1.5),
        small_airways=airways_t.subset(airways_t.r > 0.45),
    )


def _bronchi_beside(starts, dirs, lengths, radii, step) -> _Tubes:
    """Bronchi run alongside their arteries (the bronchovascular bundle), slightly smaller."""
    side = _unit(np.cross(dirs, [0.0, 0.0, 1.0]) + [1e-3, 0.0, 0.0])
    b_radii = radii * 0.85
    offset = side * (radii + b_radii + 0.6)[:, None]
    return _sample_segments(starts + offset, dirs, lengths, b_radii, step)


def _concat_tubes(parts: Sequence[_Tubes]) -> _Tubes:
    cols = [
        np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "y", "d", "r", "sin_tilt")
    ]
    order = np.argsort(cols[2], kind="stable")
    return _Tubes(*(c[order] for c in cols))


def _in_any_lung(t: _Tubes) -> np.ndarray:
    return _lung(t.x, t.y, t.d, "right") | _lung(t.x, t.y, t.d, "left")


def _mediastinal_tubes(step: tuple[float, float]) -> tuple[_Tubes, _Tubes, _Tubes]:
    """Great vessels, central airways and oesophagus as (blood, air, soft tissue) tubes."""
    blood = _polylines(
        [
            # radius, (x, y, d) vertices
            (15.0, [(-5, -32, 175), (-5, -30, 78), (0, -24, 64), (12, 2, 57), (26, 24, 64)]),
            (12.0, [(26, 24, 64), (32, 30, 82), (30, 32, 200), (14, 18, 300)]),  # descending
            (13.0, [(15, -38, 150), (18, -26, 118)]),  # pulmonary trunk
            (10.0, [(18, -26, 118), (44, -4, 126)]),  # left pulmonary artery
            (10.0, [(18, -26, 118), (-5, -16, 121), (-42, 0, 122)]),  # right pulmonary artery
            (9.0, [(-26, -26, 10), (-24, -24, 140)]),  # superior vena cava
            (7.0, [(46, -32, 12), (10, -30, 30), (-22, -26, 45)]),  # left brachiocephalic vein
            (6.5, [(-8, -26, 62), (-16, -22, 0)]),  # brachiocephalic trunk
            (4.5, [(4, -20, 60), (8, -16, 0)]),  # left common carotid
            (5.5, [(18, 2, 60), (26, 6, 0)]),  # left subclavian
            (12.0, [(-22, 10, 232), (-22, 14, 300)]),  # inferior vena cava
        ],
        step,
    )
    air = _polylines(
        [
            (9.0, [(0, -6, 0), (0, 0, 96)]),  # trachea down to the carina
            (7.0, [(0, 0, 96), (-40, 3, 121)]),  # right main bronchus: short and steep
            (6.0, [(0, 0, 96), (42, -2, 127)]),  # left main bronchus
        ],
        step,
    )
    gullet = _polylines([(8.0, [(5, 14, 0), (10, 20, 150), (22, 10, 235)])], step)
    return blood, air, gullet


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=64)
def _disk(radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column offsets of a pixel disk, with each pixel's distance from the centre."""
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    dist = np.hypot(dy, dx)
    keep = dist <= radius + 0.5
    return dy[keep], dx[keep], dist[keep].astype(np.float32)


def _splat(geom: _Geometry, tubes: _Tubes, sel: slice, grow: float = 0.0) -> np.ndarray:
    """Partial-volume occupancy (0..1) of tube points in one slab, as an image.

    A tube of radius r crossing a slab of thickness T at angle theta fills about
    2 r / (T sin theta) of each voxel column it passes, so thin in-plane vessels look faint
    on thick slices, as on a scanner. Disk edges are anti-aliased.
    """
    height, width = geom.crop_shape
    occupancy = np.zeros(height * width, dtype=np.float32)
    if sel.stop <= sel.start:
        return occupancy.reshape(height, width)
    r_mm = tubes.r[sel] + grow
    weight = np.minimum(1.0, 2.0 * r_mm / (geom.thickness * tubes.sin_tilt[sel] + 1e-6))
    r_px = r_mm * (math.sqrt(geom.scale_x * geom.scale_y) / geom.pixel_spacing)
    weight = np.where(r_px < 0.5, weight * np.pi * r_px**2 / (r_px + 0.5), weight)
    rows, cols = geom.to_pixels(tubes.x[sel], tubes.y[sel])
    bins = np.ceil(r_px - 0.5).astype(np.int64)
    for radius in np.unique(bins):
        pick = bins == radius
        dy, dx, dist = _disk(int(radius))
        rr, cc = rows[pick, None] + dy, cols[pick, None] + dx
        cover = np.clip(r_px[pick, None] + 0.5 - dist, 0.0, 1.0) * weight[pick, None]
        ok = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width) & (cover > 0)
        np.maximum.at(occupancy, (rr * width + cc)[ok], cover[ok])
    return occupancy.reshape(height, width)


def _blend(hu: np.ndarray, weight: np.ndarray, value, where: np.ndarray | None = None) -> None:
    """Move ``hu`` towards ``value`` by ``weight`` (partial volume mixing), in place."""
    w = weight if where is None else weight * where
    hu += w * (value - hu)


@dataclass(frozen=True)
class _Scene:
    """Everything fixed for a series: geometry, tubular trees, the finding, the table."""

    geom: _Geometry
    trees: _LungTrees
    blood: _Tubes
    central_air: _Tubes
    gullet: _Tubes
    finding: _Finding
    background: np.ndarray


@dataclass
class _Slice:
    """One slice being painted, with what later layers need to know."""

    image: np.ndarray  # the whole slice
    hu: np.ndarray  # view of the body's bounding box, where anatomy is painted
    x: np.ndarray
    y: np.ndarray
    depth: float
    right: np.ndarray | None = None
    left: np.ndarray | None = None


def _background(geom: _Geometry) -> np.ndarray:
    """Air and the patient table (carbon-fibre skins around a foam core), the same each slice."""
    x, y = geom.x_full, geom.y_full
    hu = np.full((geom.rows, geom.columns), _AIR, dtype=np.float32)
    curve = 0.0008 * x**2  # the table is a shallow cradle
    hu[(y > 102 - curve) & (y < 105 - curve) & (np.abs(x) < 210)] = 250.0
    hu[(y >= 105 - curve) & (y < 119 - curve) & (np.abs(x) < 205)] = -860.0
    hu[(y >= 119 - curve) & (y < 122 - curve) & (np.abs(x) < 200)] = 250.0
    return hu


def _paint_body(s: _Slice) -> None:
    """Skin, subcutaneous fat, chest-wall muscle and the cavity contents' default."""
    x, y, hu = s.x, s.y, s.hu
    body = _rounded(x, y, 0.0, _BODY_CY, _BODY_A, _BODY_B) & (y < 100.0)  # flat on the table
    hu[body] = _FAT
    hu[_rounded(x, y, 0.0, _BODY_CY - 2.0, _BODY_A - 14.0, _BODY_B - 13.0) & body] = _MUSCLE
    for sign in (-1.0, 1.0):
        # Pectoral and paraspinal muscles make the wall thicker in front and behind.
        hu[_ellipse(x, y, sign * 62.0, -92.0, 58.0, 17.0) & body] = _MUSCLE
        hu[_ellipse(x, y, sign * 34.0, 82.0, 24.0, 16.0)] = _MUSCLE + 5.0
    hu[_cavity(x, y)] = _MUSCLE
    hu[_ellipse(x, y, 0.0, -15.0, 34.0, 80.0) & _cavity(x, y)] = _MEDIASTINAL_FAT


def _paint_ribs(s: _Slice) -> None:
    """Ribs cut obliquely: arcs just outside the cavity that shift with depth."""
    x, y, d = s.x, s.y, s.depth
    ring = _cavity(x, y, grow=8.0) & ~_cavity(x, y, grow=1.0) & (y < 95.0)
    rr, cc = np.nonzero(ring)
    xs, ys = x[0, cc], y[rr, 0]
    theta = np.arctan2(ys - _CAV_CY, np.abs(xs))  # mirrored so both sides match
    # Ribs slope down towards the front, so each slice cuts a few of them at varying angles.
    phase = (theta * 7.0 / np.pi + d / 24.0 + 0.25 * np.sin(2.0 * theta + d / 40.0)) % 1.0
    duty = 0.3 + 0.08 * np.sin(3.0 * theta)
    rib = (phase < duty) & ~((np.abs(xs) < 22.0) & (ys < 0))
    value = np.where(ys < -45.0, _CARTILAGE, _RIB)  # anterior ends are costal cartilage
    s.hu[rr[rib], cc[rib]] = value[rib]


def _paint_spine(s: _Slice) -> None:
    """Vertebral body (or disc), neural arch, spinous and transverse processes, cord."""
    x, y, hu = s.x, s.y, s.hu
    cx, cy, a, b = _VERTEBRA
    arch = _ellipse(x, y, 0.0, cy + 28.0, 16.0, 14.0) | _ellipse(x, y, 0.0, cy + 48.0, 4.5, 13.0)
    for sign in (-1.0, 1.0):
        arch |= _ellipse(x, y, sign * 24.0, cy + 22.0, 12.0, 5.0)
    hu[arch] = _CORTEX * 0.75
    hu[_ellipse(x, y, 0.0, cy + 27.0, 8.5, 8.0)] = _CORD
    body = _ellipse(x, y, cx, cy, a, b)
    if s.depth % 27.0 < 5.0:  # intervertebral disc every ~27 mm
        hu[body] = _DISC
        return
    hu[body] = _CORTEX
    hu[_ellipse(x, y, cx, cy, a - 2.0, b - 2.0)] = _MARROW


def _paint_bones(s: _Slice) -> None:
    """Sternum, scapulae and clavicles, then ribs and spine."""
    x, y, d, hu = s.x, s.y, s.depth, s.hu
    front = _CAV_CY - _CAV_B - 8.0
    if 25.0 < d < 215.0:
        half_width = 24.0 if d < 60.0 else 15.0  # the manubrium is wider than the body
        hu[_ellipse(x, y, 0.0, front, half_width, 7.0)] = _CORTEX * 0.6
        hu[_ellipse(x, y, 0.0, front, half_width - 2.5, 4.5)] = _MARROW
    if d < 150.0:
        plate = _cavity(x, y, grow=20.0) & ~_cavity(x, y, grow=15.0)
        hu[plate & (y > 5.0 + d * 0.1) & (np.abs(x) > 60.0)] = _CORTEX * 0.7
    if d < 22.0:
        for sign in (-1.0, 1.0):
            hu[_ellipse(x, y, sign * 70.0, front + 5.0, 38.0, 7.0)] = _CORTEX * 0.75
    _paint_ribs(s)
    _paint_spine(s)


def _paint_abdomen(s: _Slice) -> None:
    """Upper abdomen under the diaphragm: liver, spleen, stomach, colon, fat."""
    x, y, d, hu = s.x, s.y, s.depth, s.hu
    dome = np.where(x < 0, _dome_depth(x, y, "right"), _dome_depth(x, y, "left"))
    below = _cavity(x, y) & (d > dome)
    if not below.any():
        return
    hu[below] = _FAT + 20.0  # intra-abdominal fat
    liver = _rounded(x, y, -40.0, -2.0, 100.0, 82.0) | _ellipse(x, y, 15.0, -48.0, 60.0, 30.0)
    hu[below & liver] = _LIVER
    hu[below & _ellipse(x, y, 84.0, 40.0, 30.0, 40.0)] = _SPLEEN
    hu[below & _ellipse(x, y, -52.0, 52.0, 22.0, 28.0) & (d > 280.0)] = _MUSCLE - 15.0  # kidney
    hu[below & _ellipse(x, y, 52.0, -20.0, 42.0, 34.0)] = _MUSCLE - 5.0  # stomach wall
    lumen = below & _ellipse(x, y, 52.0, -20.0, 36.0, 28.0)
    hu[lumen] = _FLUID
    hu[lumen & (y < -30.0)] = _AIR  # supine: gas rises anteriorly over the fluid level
    if d > 255.0:  # splenic flexure of the colon, with gas
        hu[below & _ellipse(x, y, 86.0, -45.0, 17.0, 13.0)] = _MUSCLE - 5.0
        hu[below & _ellipse(x, y, 86.0, -45.0, 13.0, 9.0)] = _AIR


def _paint_mediastinum(s: _Slice, scene: _Scene) -> np.ndarray:
    """Heart, great vessels, oesophagus; returns what the lungs must not overlap."""
    x, y, d, hu, geom = s.x, s.y, s.depth, s.hu, scene.geom
    hu[_heart_on_grid(x, y, d, grow=4.0)] = _MEDIASTINAL_FAT
    hu[_heart_on_grid(x, y, d)] = _BLOOD
    half = geom.thickness / 2
    blood = _splat(geom, scene.blood, scene.blood.slab(d, half))
    gullet = _splat(geom, scene.gullet, scene.gullet.slab(d, half))
    _blend(hu, gullet, _MUSCLE - 10.0)
    _blend(hu, blood, _BLOOD)
    return (blood > 0.5) | (gullet > 0.5)


def _paint_lungs(s: _Slice, scene: _Scene, occupied: np.ndarray) -> None:
    """Parenchyma (denser posteriorly, as gravity makes it), then vessels and bronchi."""
    x, y, d, hu, geom = s.x, s.y, s.depth, s.hu, scene.geom
    excluded = _lung_exclusion(x, y, d, _heart_on_grid(x, y, d, grow=4.0)) | occupied
    s.right = _lung(x, y, d, "right", excluded)
    s.left = _lung(x, y, d, "left", excluded)
    lungs = s.right | s.left
    gradient = np.clip((y + 90.0) / 170.0, 0.0, 1.0)
    parenchyma = _LUNG_ANTERIOR + (_LUNG_POSTERIOR - _LUNG_ANTERIOR) * gradient
    hu[lungs] = np.broadcast_to(parenchyma, hu.shape)[lungs]
    scene.finding.paint_ground_glass(s, scene)
    half = geom.thickness / 2
    trees = scene.trees
    vessels = _splat(geom, trees.vessels, trees.vessels.slab(d, half))
    _blend(hu, vessels, _BLOOD, lungs)
    walls = _splat(geom, trees.airways, trees.airways.slab(d, half), grow=0.35)
    _blend(hu, walls, -150.0, lungs & (vessels < 0.5))
    lumen = _splat(geom, trees.airways, trees.airways.slab(d, half))
    _blend(hu, lumen, _AIR, lungs)


def _paint_central_airways(s: _Slice, scene: _Scene) -> None:
    """Trachea and main bronchi: an air lumen inside a soft-tissue wall."""
    geom, sel = scene.geom, scene.central_air.slab(s.depth, scene.geom.thickness / 2)
    _blend(s.hu, _splat(geom, scene.central_air, sel, grow=2.0), _MUSCLE - 15.0)
    _blend(s.hu, _splat(geom, scene.central_air, sel), _AIR)


def _render_slice(scene: _Scene, depth: float) -> _Slice:
    geom = scene.geom
    image = scene.background.copy()
    s = _Slice(image, image[geom.crop], geom.x, geom.y, depth)
    _paint_body(s)
    _paint_bones(s)
    _paint_abdomen(s)
    occupied = _paint_mediastinum(s, scene)
    _paint_lungs(s, scene, occupied)
    scene.finding.paint_consolidation(s, scene)
    _paint_central_airways(s, scene)
    return s


# --------------------------------------------------------------------------- findings


def _texture(rng: np.random.Generator, wavelengths: tuple[float, float] = (10.0, 28.0), waves=4):
    """Random smooth 3-D field in about [-1, 1] of (x, y, d): a sum of plane waves."""
    k = rng.normal(size=(waves, 3))
    k *= (2 * np.pi / rng.uniform(*wavelengths, waves))[:, None] / np.linalg.norm(k, axis=1)[
        :, None
    ]
    k = k.astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, waves).astype(np.float32)
    norm = np.float32(1.0 / np.sqrt(waves / 2))

    def field(x, y, d):
        total = np.zeros((y.shape[0], x.shape[1]), dtype=np.float32)
        for (kx, ky, kd), ph in zip(k, phase, strict=True):
            # cos(a + b) split into a row and a column factor: no per-pixel trigonometry.
            a, b = kx * x + kd * d + ph, ky * y
            total += np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)
        return (total * norm).clip(-1.0, 1.0)

    return field


class _Finding:
    """No abnormality: the base for the disease patterns."""

    def paint_ground_glass(self, s: _Slice, scene: _Scene) -> None:
        return None

    def paint_consolidation(self, s: _Slice, scene: _Scene) -> None:
        return None


def _sample_in_lung(rng, side: str, count: int, accept, depth_range) -> np.ndarray:
    """Rejection-sample ``count`` canonical points inside one lung satisfying ``accept``."""
    found = np.zeros((0, 3))
    sign = _SIDE_SIGN[side]
    lo, hi = depth_range
    while len(found) < count:
        n = 4000
        # sqrt of a uniform biases the depth towards the lung bases.
        d = lo + (hi - lo) * np.sqrt(rng.uniform(0, 1, n))
        pts = np.column_stack([sign * rng.uniform(10, 140, n), rng.uniform(-95, 85, n), d])
        ok = _lung(pts[:, 0], pts[:, 1], pts[:, 2], side) & accept(pts)
        found = np.concatenate([found, pts[ok]])
    return found[:count]


def _peripheral(p: np.ndarray) -> np.ndarray:
    """Points near the costal pleura: outer part of the cavity and lateral to the hila."""
    rho2 = (p[:, 0] / _CAV_A) ** 2 + ((p[:, 1] - _CAV_CY) / _CAV_B) ** 2
    return (rho2 > 0.62) & (np.abs(p[:, 0]) > 45)


class _Covid(_Finding):
    """Bilateral, peripheral (subpleural), lower-lobe predominant ground-glass patches."""

    def __init__(self, rng: np.random.Generator) -> None:
        centres, axes = [], []
        for side in _HILA:
            n = int(rng.integers(5, 9))
            centres.append(_sample_in_lung(rng, side, n, _peripheral, (110.0, 260.0)))
            axes.append(np.column_stack([rng.uniform(18, 36, (n, 2)), rng.uniform(22, 45, n)]))
        self.centres = np.concatenate(centres).astype(np.float32)
        self.axes = np.concatenate(axes).astype(np.float32)
        self.shape_texture = _texture(rng, wavelengths=(15.0, 35.0))
        self.density_texture = _texture(rng)

    def paint_ground_glass(self, s: _Slice, scene: _Scene) -> None:
        lungs = s.right | s.left
        for (cx, cy, cd), (ax, ay, ad) in zip(self.centres, self.axes, strict=True):
            dz = ((s.depth - cd) / ad) ** 2
            if dz >= 1.3:
                continue
            # The texture can push the patch edge out to q = 1.3, i.e. ~1.15 semi-axes.
            rows, cols = _window(s.x, s.y, cx, cy, 1.2 * max(ax, ay))
            x, y = s.x[:, cols], s.y[rows]
            q = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + dz
            weight = np.clip(2.2 * (1.0 - q) + 0.7 * self.shape_texture(x, y, s.depth), 0.0, 1.0)
            # Keep it subpleural: fade out over the inner part of the chest cavity.
            rho = np.abs(x / _CAV_A) ** 2.4 + np.abs((y - _CAV_CY) / _CAV_B) ** 2.4
            weight *= np.clip((rho - 0.29) / 0.3, 0.0, 1.0)
            target = -480.0 + 120.0 * self.density_texture(x, y, s.depth)
            # Ground glass veils the parenchyma but, unlike consolidation, not the vessels,
            # which are painted afterwards.
            _blend(s.hu[rows, cols], weight, target, lungs[rows, cols])


def _lobe(x, y, d, side: str, lobe: str) -> np.ndarray:
    """Lobe membership from the oblique (major) and, on the right, horizontal fissure."""
    # The major fissure descends from back to front, and on axial slices runs from
    # anteromedial to posterolateral.
    major = 158.0 - 0.9 * y + 0.3 * (np.abs(x) - 70.0)
    if lobe == "lower":
        return d > major
    if lobe == "middle":  # right middle lobe, below the horizontal fissure
        return (d <= major) & (d > 140.0)
    return d <= major  # upper lobe (with the lingula on the left)


class _Pneumonia(_Finding):
    """Lobar consolidation of one lung, bounded by its fissures, with air bronchograms."""

    # Lower lobes are the usual site; the middle lobe reaches up to the mid slices too.
    _LOBES = (("right", "lower"), ("right", "middle"), ("left", "lower"))

    def __init__(self, rng: np.random.Generator) -> None:
        self.side, self.lobe = self._LOBES[int(rng.choice(3, p=[0.45, 0.15, 0.4]))]
        side, lobe = self.side, self.lobe

        def in_lobe(p):
            lateral = np.abs(p[:, 0])
            return _lobe(p[:, 0], p[:, 1], p[:, 2], side, lobe) & (lateral > 50) & (lateral < 100)

        self.centre = _sample_in_lung(rng, side, 1, in_lobe, (160.0, 230.0))[0].astype(np.float32)
        self.radius = np.float32(rng.uniform(70.0, 95.0))
        self.edge_texture = _texture(rng, wavelengths=(30.0, 60.0))
        self.density_texture = _texture(rng)

    def paint_consolidation(self, s: _Slice, scene: _Scene) -> None:
        cx, cy, cd = self.centre
        reach = 1.3 * self.radius  # the edge texture moves the border by up to 15 %
        if abs(s.depth - cd) >= reach:
            return
        rows, cols = _window(s.x, s.y, cx, cy, reach)
        x, y = s.x[:, cols], s.y[rows]
        lung = (s.right if self.side == "right" else s.left)[rows, cols]
        lung = lung & _lobe(x, y, s.depth, self.side, self.lobe)
        dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (s.depth - cd) ** 2) / self.radius
        dist += 0.15 * self.edge_texture(x, y, s.depth)
        core, halo = lung & (dist < 1.0), lung & (dist >= 1.0) & (dist < 1.12)
        hu = s.hu[rows, cols]
        _blend(hu, np.float32(0.55), -430.0, halo)  # a ground-glass rim of partly filled alveoli
        dense = 20.0 + 10.0 * self.density_texture(x, y, s.depth)
        hu[core] = np.broadcast_to(dense, hu.shape)[core]
        small = scene.trees.small_airways
        air = _splat(scene.geom, small, small.slab(s.depth, scene.geom.thickness / 2))
        _blend(hu, air[rows, cols], -960.0, core)


def _finding(spec: PhantomSpec, rng: np.random.Generator) -> _Finding:
    if spec.finding == "covid":
        return _Covid(rng)
    if spec.finding == "pneumonia":
        return _Pneumonia(rng)
    return _Finding()


# --------------------------------------------------------------------------- volume


def _streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent random streams, so every class of one seed shares anatomy and noise."""
    names = ("anatomy", "noise", "covid", "pneumonia", "normal")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children, strict=True)}


def _scene(spec: PhantomSpec) -> tuple[_Scene, np.random.Generator]:
    rngs = _streams(spec.seed)
    geom = _geometry(spec, rngs["anatomy"])
    step = (0.9 * geom.pixel_spacing / max(geom.scale_x, geom.scale_y), 0.45 * geom.thickness)
    blood, air, gullet = _mediastinal_tubes(step)
    trees = _lung_trees(rngs["anatomy"], step)
    finding = _finding(spec, rngs[spec.finding])
    scene = _Scene(geom, trees, blood, air, gullet, finding, _background(geom))
    return scene, rngs["noise"]


def _blur(img: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 in both directions with edge replication (a mild scanner PSF)."""
    out = img * 0.5
    out[1:] += 0.25 * img[:-1]
    out[:-1] += 0.25 * img[1:]
    out[0] += 0.25 * img[0]
    out[-1] += 0.25 * img[-1]
    res = out * 0.5
    res[:, 1:] += 0.25 * out[:, :-1]
    res[:, :-1] += 0.25 * out[:, 1:]
    res[:, 0] += 0.25 * out[:, 0]
    res[:, -1] += 0.25 * out[:, -1]
    return res


def _render_volume(spec: PhantomSpec) -> tuple[np.ndarray, _Geometry]:
    scene, noise_rng = _scene(spec)
    geom = scene.geom
    outside = ~geom.fov_mask()
    volume = np.empty((spec.slices, geom.rows, geom.columns), dtype=np.float32)
    sd = np.float32(_NOISE_SD / _BLUR_NOISE_GAIN)  # white noise, correlated by the blur
    for index, depth in enumerate(geom.depths):
        hu = _render_slice(scene, depth).image
        hu += noise_rng.standard_normal(hu.shape, dtype=np.float32) * sd
        hu = np.rint(_blur(hu)).clip(_HU_MIN, _HU_MAX)
        hu[outside] = _PADDING_STORED + _INTERCEPT
        volume[index] = hu
    return volume, geom


def generate_hu_volume(spec: PhantomSpec) -> np.ndarray:
    """Render the phantom in Hounsfield units.

    Returns
    -------
    numpy.ndarray
        float32, shape (slices, rows, columns), integer-valued, top (apex) slice first.
        Inside the circular field of view values are clipped to [-1024, 3071] HU; outside it
        they are -3024 HU, which is the stored pixel padding value -2000 after rescaling.
    """
    return _render_volume(spec)[0]


def _lung_masks(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """Right and left lung masks (slices, rows, columns) as drawn, for tests and benchmarks."""
    scene, _ = _scene(spec)
    right = np.zeros((spec.slices, spec.rows, spec.columns), dtype=bool)
    left = np.zeros_like(right)
    for index, depth in enumerate(scene.geom.depths):
        s = _render_slice(scene, depth)
        right[index][scene.geom.crop], left[index][scene.geom.crop] = s.right, s.left
    return right, left


# --------------------------------------------------------------------------- DICOM


def _derived_uid(*parts: object) -> str:
    """A 2.25 UID from a name-based (SHA-1, version 5) UUID of its inputs: stable per spec.

    ``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources and returns
    a random UUID, so it cannot be used for reproducible UIDs.
    """
    name = "\x1f".join(["ainode-phantom", *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _series_uids(spec: PhantomSpec) -> tuple[str, str, str]:
    """Study, series and frame-of-reference UIDs."""
    # Everything that changes the pixels or identifies the study goes in, so two different
    # phantoms never share a UID.
    content = (spec.finding, spec.seed, spec.slices, spec.rows, spec.columns)
    identity = (spec.patient_id, spec.patient_name, spec.accession_number, spec.study_date)
    study = spec.study_instance_uid or _derived_uid("study", *content, *identity, spec.study_time)
    series = spec.series_instance_uid or _derived_uid("series", study, *content)
    return study, series, _derived_uid("frame-of-reference", series)


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters with no binary-float noise."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _later(date: str, time: str, seconds: float) -> tuple[str, str]:
    moment = datetime.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    moment += datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")[:10]


def _patient_age(spec: PhantomSpec) -> str:
    birth = datetime.datetime.strptime(spec.patient_birth_date, "%Y%m%d").date()
    study = datetime.datetime.strptime(spec.study_date, "%Y%m%d").date()
    years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return f"{min(years, 999):03d}Y"


def _patient_and_study(ds: Dataset, spec: PhantomSpec, study_uid: str) -> None:
    """Patient, General Study and Patient Study modules."""
    ds.SpecificCharacterSet = spec.charset
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    if spec.patient_birth_date:
        ds.PatientAge = _patient_age(spec)
    ds.PatientWeight = "72"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = spec.accession_number
    ds.StudyDescription = spec.study_description


def _series_and_equipment(ds: Dataset, spec: PhantomSpec, series_uid: str, frame_uid: str) -> None:
    """General Series, Frame of Reference and General Equipment modules."""
    series_date, series_time = _later(spec.study_date, spec.study_time, 120)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDate, ds.SeriesTime = series_date, series_time
    ds.SeriesDescription = spec.series_description
    ds.ProtocolName = "CHEST ROUTINE"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = "ainode"
    ds.StationName = "PHANTOMCT"
    ds.ManufacturerModelName = "Synthetic Chest CT"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    ds.add_new(0x00280120, "SS", _PADDING_STORED)  # PixelPaddingValue, signed like the pixels


def _acquisition(ds: Dataset, geom: _Geometry) -> None:
    """CT acquisition and reconstruction parameters of a routine helical chest scan."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ScanOptions = "HELICAL MODE"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(geom.pixel_spacing * min(geom.rows, geom.columns))
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = 24
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "STANDARD"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.SpiralPitchFactor = 0.984375
    ds.CTDIvol = 8.5
    phantom_type = Dataset()  # CTDIvol is only meaningful with its reference phantom
    phantom_type.CodeValue = "113691"
    phantom_type.CodingSchemeDesignator = "DCM"
    phantom_type.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom_type]
    ds.AcquisitionNumber = 1
    ds.ImagesInAcquisition = len(geom.depths)


def _image(ds: Dataset, geom: _Geometry) -> None:
    """Image Plane, Image Pixel, CT Image rescale and VOI LUT attributes."""
    ds.PixelSpacing = [_ds(geom.pixel_spacing)] * 2
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = _ds(geom.thickness)
    ds.SpacingBetweenSlices = _ds(geom.thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geom.rows, geom.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _slice_dataset(template: Dataset, geom: _Geometry, index: int, pixels: np.ndarray) -> Dataset:
    """One slice: the shared attributes plus position, numbering, UIDs and pixel data."""
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = _derived_uid("instance", ds.SeriesInstanceUID, index)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = index + 1
    z = _Z_TOP - index * geom.thickness  # head first: z falls towards the feet
    origin_x = -geom.pixel_spacing * (geom.columns - 1) / 2
    origin_y = -geom.pixel_spacing * (geom.rows - 1) / 2
    ds.ImagePositionPatient = [_ds(origin_x), _ds(origin_y), _ds(z)]
    ds.SliceLocation = _ds(z)
    # A 0.5 s rotation at pitch ~1 covers 40 mm: the acquisition time moves along the scan.
    date, time = _later(ds.SeriesDate, ds.SeriesTime[:6], 2.0 + index * geom.thickness / 78.75)
    ds.AcquisitionDate, ds.AcquisitionTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.SmallestImagePixelValue = int(pixels.min())
    ds.LargestImagePixelValue = int(pixels.max())
    ds.add_new(0x7FE00010, "OW", pixels.astype("<i2").tobytes())
    return ds


def _template(spec: PhantomSpec, geom: _Geometry) -> Dataset:
    study_uid, series_uid, frame_uid = _series_uids(spec)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate, ds.InstanceCreationTime = spec.study_date, spec.study_time
    _patient_and_study(ds, spec, study_uid)
    _series_and_equipment(ds, spec, series_uid, frame_uid)
    _acquisition(ds, geom)
    _image(ds, geom)
    return ds


def generate_series(spec: PhantomSpec) -> list[Dataset]:
    """CT Image Storage datasets, one per slice, top first, in Explicit VR Little Endian.

    Stored pixel values are HU + 1024 as int16 (Rescale Intercept -1024); pixels outside the
    circular field of view hold the Pixel Padding Value -2000.
    """
    volume, geom = _render_volume(spec)
    stored = (volume - _INTERCEPT).clip(-32768, 32767).astype(np.int16)
    template = _template(spec, geom)
    return [_slice_dataset(template, geom, i, stored[i]) for i in range(spec.slices)]


# --------------------------------------------------------------------------- transfer syntaxes


def _syntax_uid(transfer_syntax: str) -> UID:
    """A short name or UID from TRANSFER_SYNTAXES, as a UID."""
    if transfer_syntax in TRANSFER_SYNTAXES:
        return UID(TRANSFER_SYNTAXES[transfer_syntax])
    if transfer_syntax in TRANSFER_SYNTAXES.values():
        return UID(transfer_syntax)
    names = ", ".join(TRANSFER_SYNTAXES)
    raise ValueError(
        f"transfer_syntax must be one of {names} or their UIDs, got {transfer_syntax!r}"
    )


def _syntax_name(transfer_syntax: str) -> str:
    uid = _syntax_uid(transfer_syntax)
    return next(name for name, value in TRANSFER_SYNTAXES.items() if value == uid)


def _dcmcjpeg() -> str:
    path = shutil.which("dcmcjpeg")
    if path is None:
        raise RuntimeError("jpeg-lossless needs DCMTK's dcmcjpeg (apt-get install dcmtk)")
    return path


def _run_dcmcjpeg(tool: str, source: Path, target: Path) -> None:
    # Process 14 selection value 1 with the true-lossless codec; keep the SOP Instance UID
    # because a lossless re-encoding is the same image.
    command = [tool, "--encode-lossless-sv1", "--true-lossless", "--uid-never", source, target]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dcmcjpeg failed on {source.name}: {done.stderr.strip()}")


def encode_dataset(ds: Dataset, transfer_syntax: str) -> Dataset:
    """A copy of ``ds`` in ``transfer_syntax`` (short name or UID), losslessly.

    Compressed input is decoded first. RLE, JPEG-LS and JPEG 2000 use pydicom's encoders;
    JPEG Lossless SV1 uses DCMTK's ``dcmcjpeg`` (``RuntimeError`` when it is missing).
    The SOP Instance UID is kept: the pixels are unchanged.
    """
    uid = _syntax_uid(transfer_syntax)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        raise ValueError("ds must have file_meta with a TransferSyntaxUID")
    out = copy.deepcopy(ds)
    if out.file_meta.TransferSyntaxUID.is_compressed:
        out.decompress(generate_instance_uid=False)
    if uid == JPEGLosslessSV1:
        tool = _dcmcjpeg()
        with tempfile.TemporaryDirectory(prefix="phantom-") as tmp:
            source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
            out.save_as(source, enforce_file_format=True)
            _run_dcmcjpeg(tool, source, target)
            return dcmread(target)
    if uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = uid
        return out
    out.compress(uid, encoding_plugin=_ENCODING_PLUGINS[uid], generate_instance_uid=False)
    return out


def write_series(spec: PhantomSpec, out_dir: Path, transfer_syntax: str = "explicit") -> list[Path]:
    """Write one Part 10 file per slice as ``NNNN.dcm`` (Instance Number) under ``out_dir``."""
    uid = _syntax_uid(transfer_syntax)
    tool = _dcmcjpeg() if uid == JPEGLosslessSV1 else None  # fail before the slow part
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = generate_series(spec)
    paths = [out_dir / f"{ds.InstanceNumber:04d}.dcm" for ds in datasets]
    if tool is None:
        for ds, path in zip(datasets, paths, strict=True):
            encode_dataset(ds, uid).save_as(path, enforce_file_format=True)
        return paths
    with tempfile.TemporaryDirectory(prefix="phantom-") as tmp:
        sources = [Path(tmp) / path.name for path in paths]
        for ds, source in zip(datasets, sources, strict=True):
            ds.save_as(source, enforce_file_format=True)
        # One dcmcjpeg process per file; they are independent, so run them side by side.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(
                pool.map(lambda pair: _run_dcmcjpeg(tool, *pair), zip(sources, paths, strict=True))
            )
    return paths


# --------------------------------------------------------------------------- command line

_CHARSET_ALIASES = {
    "latin1": "ISO_IR 100",
    "latin-1": "ISO_IR 100",
    "iso_ir 100": "ISO_IR 100",
    "utf8": "ISO_IR 192",
    "utf-8": "ISO_IR 192",
    "iso_ir 192": "ISO_IR 192",
}


def _charset_argument(value: str) -> str:
    return _CHARSET_ALIASES.get(value.lower(), value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``phantom`` options to an argument parser (see :func:`run`)."""
    parser.add_argument("--class", dest="finding", choices=CLASSES, default="normal")
    parser.add_argument("--slices", type=int, default=60, help="number of axial slices")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .dcm files")
    parser.add_argument("--seed", type=int, default=0, help="anatomy, finding and noise seed")
    parser.add_argument(
        "--transfer-syntax",
        default="explicit",
        help=f"one of {', '.join(TRANSFER_SYNTAXES)} or a UID (default explicit)",
    )
    parser.add_argument(
        "--charset",
        type=_charset_argument,
        choices=_CHARSETS,
        default="ISO_IR 192",
        help="ISO_IR 100 (latin1) or ISO_IR 192 (utf8, default)",
    )
    parser.add_argument("--patient-name")
    parser.add_argument("--patient-id")
    parser.add_argument("--study-description")
    parser.add_argument("--study-uid", dest="study_instance_uid")
    parser.add_argument("--series-uid", dest="series_instance_uid")


def run(args: argparse.Namespace) -> int:
    """Write the series described by parsed :func:`add_arguments` options.

    Prints one summary line and returns 0; on a bad option or a missing tool prints the
    reason to stderr and returns 2 or 1.
    """
    fields = {"finding": args.finding, "slices": args.slices, "seed": args.seed}
    fields["charset"] = args.charset
    for name in ("patient_name", "patient_id", "study_description"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    for name in ("study_instance_uid", "series_instance_uid"):
        fields[name] = getattr(args, name)
    try:
        spec = PhantomSpec(**fields)
        name = _syntax_name(args.transfer_syntax)
        paths = write_series(spec, args.out, name)
    except ValueError as exc:
        print(f"ainode phantom: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"ainode phantom: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} CT slices ({spec.finding}, {name}) to {args.out}")
    return 0
