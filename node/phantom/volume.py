"""The HU volume: scene set-up, per-slice rendering, scanner noise and blur."""

from __future__ import annotations

import numpy as np

from node.phantom.findings import _finding
from node.phantom.geometry import _Geometry, _geometry
from node.phantom.render import _background, _render_slice, _Scene
from node.phantom.spec import (
    _BLUR_NOISE_GAIN,
    _HU_MAX,
    _HU_MIN,
    _INTERCEPT,
    _NOISE_SD,
    _PADDING_STORED,
    PhantomSpec,
)
from node.phantom.trees import _lung_trees, _mediastinal_tubes


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
