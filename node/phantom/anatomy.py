"""Anatomical shapes in the canonical frame: tissue values, chest cavity, heart and lungs."""

from __future__ import annotations

import math

import numpy as np

from node.phantom.geometry import _bump, _ellipse, _rounded, _window

# Tissue values in HU.
_AIR, _FAT, _MEDIASTINAL_FAT, _MUSCLE, _BLOOD = -1000.0, -100.0, -85.0, 45.0, 40.0
_LIVER, _SPLEEN, _FLUID, _DISC, _CORD = 58.0, 48.0, 12.0, 85.0, 25.0
_CORTEX, _MARROW, _RIB, _CARTILAGE = 850.0, 230.0, 550.0, 120.0
_LUNG_ANTERIOR, _LUNG_POSTERIOR = -940.0, -880.0
# Inner contour of the chest wall, the vertebral body (cx, cy, a, b) and the lung hila.
_CAV_CY, _CAV_A, _CAV_B = -8.0, 134.0, 83.0
_VERTEBRA = (0.0, 40.0, 19.0, 16.0)
_HILA = {"right": (-42.0, 0.0, 122.0), "left": (44.0, -4.0, 126.0)}
_SIDE_SIGN = {"right": -1.0, "left": 1.0}


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
