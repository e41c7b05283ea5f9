"""Drawing tubes onto a slice with partial-volume occupancy, and blending tissue values."""

from __future__ import annotations

import functools
import math

import numpy as np

from node.phantom.geometry import _Geometry
from node.phantom.trees import _Tubes


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
