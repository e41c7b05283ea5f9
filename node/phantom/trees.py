"""Tubular structures: pulmonary vessel and airway trees, great vessels and central airways."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from node.phantom.anatomy import _HILA, _SIDE_SIGN, _lung
from node.phantom.geometry import _SCAN_LENGTH


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
