"""The canonical patient frame, the pixel grid of a series and the shape primitives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from node.phantom.spec import PhantomSpec

# Anatomy is modelled in a canonical patient frame in millimetres:
# x to the patient's left, y to the back (both as DICOM LPS, so rows and columns map
# directly), depth d from the top of the scan range downwards (0 .. _SCAN_LENGTH).
_FOV_MM = 360.0
_SCAN_LENGTH = 300.0
# Outer contour of the body; it also bounds the pixels that anatomy is painted on.
_BODY_CY, _BODY_A, _BODY_B = -5.0, 160.0, 110.0


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


def _ellipse(x, y, cx, cy, a, b) -> np.ndarray:
    """Axis-aligned ellipse test; with a row-vector x and column-vector y it costs one pass."""
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _bump(d, centre: float, width: float):
    return np.exp(-(((d - centre) / width) ** 2))


def _rounded(x, y, cx, cy, a, b, power: float = 2.4) -> np.ndarray:
    """Superellipse: a chest is boxier than an ellipse. Separable, so as cheap as one."""
    return np.abs((x - cx) / a) ** power + np.abs((y - cy) / b) ** power <= 1.0


def _window(x, y, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
    """Rows and columns of a grid within ``reach`` mm of a point, to skip empty pixels."""
    cols = np.searchsorted(x[0], [cx - reach, cx + reach])
    rows = np.searchsorted(y[:, 0], [cy - reach, cy + reach])
    return slice(int(rows[0]), int(rows[1])), slice(int(cols[0]), int(cols[1]))
