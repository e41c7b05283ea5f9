"""Painting one axial slice: table, body wall, bones, abdomen, mediastinum and lungs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from node.phantom.anatomy import (
    _AIR,
    _BLOOD,
    _CARTILAGE,
    _CAV_B,
    _CAV_CY,
    _CORD,
    _CORTEX,
    _DISC,
    _FAT,
    _FLUID,
    _LIVER,
    _LUNG_ANTERIOR,
    _LUNG_POSTERIOR,
    _MARROW,
    _MEDIASTINAL_FAT,
    _MUSCLE,
    _RIB,
    _SPLEEN,
    _VERTEBRA,
    _cavity,
    _dome_depth,
    _heart_on_grid,
    _lung,
    _lung_exclusion,
)
from node.phantom.geometry import _BODY_A, _BODY_B, _BODY_CY, _ellipse, _Geometry, _rounded
from node.phantom.raster import _blend, _splat
from node.phantom.trees import _LungTrees, _Tubes

if TYPE_CHECKING:
    from node.phantom.findings import _Finding


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
