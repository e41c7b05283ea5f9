"""The disease patterns: COVID-19 ground glass and lobar pneumonia consolidation."""

from __future__ import annotations

import numpy as np

from node.phantom.anatomy import _CAV_A, _CAV_B, _CAV_CY, _HILA, _SIDE_SIGN, _lung
from node.phantom.geometry import _window
from node.phantom.raster import _blend, _splat
from node.phantom.render import _Scene, _Slice
from node.phantom.spec import PhantomSpec


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
