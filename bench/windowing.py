"""Windowing benchmark: 512² phantom slices to lung-window uint8 at the model's 224², one core.

One run, per transfer syntax (Explicit VR, JPEG Lossless SV1, JPEG-LS, JPEG 2000), from the
file on disk (page cache warm) to the resized image:

- ainode: ``dcmread`` → :func:`node.analysis.imaging.hounsfield_frames` (decode once, float32 HU,
  padding NaN) → :func:`node.analysis.imaging.apply_window` → bilinear resize to 224 (numpy);
- naive, as a seed-paper script does it: ``ds.pixel_array`` → ``apply_modality_lut``
  (float64) → equation 5 per pixel (``np.vectorize``) → the same resize;
- numpy float64: the naive pipeline with equation 5 vectorised (``np.clip`` in float64),
  to show how much is the per-pixel Python and how much the rest.

Run: ``.venv/bin/python -m bench.windowing [--slices 60] [--naive-slices 8]``. Prints
slices/s (best of ``--repeat`` passes; the slow naive path gets one pass over
``--naive-slices``) and ainode's ratio to each. The process is pinned to one CPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut

from node import phantom
from node.analysis import imaging

SYNTAXES = ("explicit", "jpeg-lossless", "jpeg-ls", "jpeg2000")
MODEL_SIZE = 224


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights with half-pixel centres (``tf.image.resize`` bilinear)."""
    x = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    x = np.clip(x, 0, size_in - 1)
    low = np.floor(x).astype(np.intp)
    return low, np.minimum(low + 1, size_in - 1), (x - low).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Separable bilinear resize of a 2-D image to ``size``², float32 (rows, then columns)."""
    r0, r1, wr = _bilinear_taps(image.shape[0], size)
    c0, c1, wc = _bilinear_taps(image.shape[1], size)
    top = np.take(image, r0, axis=0).astype(np.float32)
    rows = np.take(image, r1, axis=0).astype(np.float32)
    rows -= top
    rows *= wr[:, None]
    rows += top
    left = np.take(rows, c0, axis=1)
    out = np.take(rows, c1, axis=1)
    out -= left
    out *= wc
    out += left
    return out


def ainode_slice(path: Path) -> np.ndarray:
    hu = imaging.hounsfield_frames(dcmread(path))
    return resize_bilinear(imaging.apply_window(hu[0], imaging.LUNG), MODEL_SIZE)


def _equation_5(value: float, low: float, high: float) -> float:
    """The seed's per-pixel normalisation, clipped to the window first."""
    value = min(max(value, low), high)
    return (value - low) / (high - low) * 255


_equation_5_per_pixel = np.vectorize(_equation_5, otypes=[np.float64])


def naive_slice(path: Path) -> np.ndarray:
    ds = dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    low, high = imaging.LUNG.low, imaging.LUNG.high
    image = _equation_5_per_pixel(hu, low, high).astype(np.uint8)
    return resize_bilinear(image, MODEL_SIZE)


def float64_slice(path: Path) -> np.ndarray:
    ds = dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    low, high = imaging.LUNG.low, imaging.LUNG.high
    image = ((np.clip(hu, low, high) - low) / (high - low) * 255).astype(np.uint8)
    return resize_bilinear(image, MODEL_SIZE)


def rate(action: Callable[[Path], np.ndarray], paths: list[Path], repeat: int) -> float:
    """Best slices per second over ``repeat`` passes."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for path in paths:
            action(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def stage_times(paths: list[Path], repeat: int) -> dict[str, float]:
    """Milliseconds per slice of each ainode stage (best pass), lung fraction included."""
    stages = ("read", "decode+HU", "window", "resize", "lung_fraction")
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(repeat):
        spent = dict.fromkeys(stages, 0.0)
        for path in paths:
            marks = [time.perf_counter()]
            ds = dcmread(path)
            marks.append(time.perf_counter())
            hu = imaging.hounsfield_frames(ds)[0]
            marks.append(time.perf_counter())
            image = imaging.apply_window(hu, imaging.LUNG)
            marks.append(time.perf_counter())
            resize_bilinear(image, MODEL_SIZE)
            marks.append(time.perf_counter())
            imaging.lung_fraction(hu)
            marks.append(time.perf_counter())
            for stage, (start, end) in zip(stages, itertools.pairwise(marks), strict=True):
                spent[stage] += end - start
        best = {stage: min(best[stage], spent[stage]) for stage in stages}
    return {stage: 1000 * seconds / len(paths) for stage, seconds in best.items()}


def check_same_output(paths: list[Path]) -> int:
    """Largest difference between ainode and the naive uint8 images (before resizing)."""
    worst = 0
    for path in paths:
        ours = imaging.apply_window(imaging.hounsfield_frames(dcmread(path))[0], imaging.LUNG)
        ds = dcmread(path)
        theirs = _equation_5_per_pixel(
            apply_modality_lut(ds.pixel_array, ds), imaging.LUNG.low, imaging.LUNG.high
        )
        worst = max(worst, int(np.abs(ours.astype(int) - theirs.astype(np.uint8)).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=60, help="phantom slices per syntax")
    parser.add_argument("--naive-slices", type=int, default=8, help="slices for the naive path")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # one core, decoders included
    spec = phantom.PhantomSpec(finding="covid", slices=args.slices, seed=1)
    print(f"phantom: {args.slices} slices of {spec.rows}x{spec.columns}, CPU {cpu} only")
    header = f"{'syntax':<14}{'ainode':>10}{'naive':>10}{'ratio':>8}{'float64':>10}{'ratio':>8}"
    with tempfile.TemporaryDirectory(prefix="bench-windowing-") as tmp:
        series = {ts: phantom.write_series(spec, Path(tmp) / ts, ts) for ts in SYNTAXES}
        worst = check_same_output(series["explicit"][:: max(1, args.slices // 6)])
        print(f"ainode vs naive uint8, largest difference: {worst} (naive truncates, we round)")
        print(f"\nslices/s, decode + HU + lung window + resize to {MODEL_SIZE}\n{header}")
        for ts, paths in series.items():
            ours = rate(ainode_slice, paths, args.repeat)
            naive = rate(naive_slice, paths[: args.naive_slices], 1)
            f64 = rate(float64_slice, paths, args.repeat)
            print(f"{ts:<14}{ours:>10.0f}{naive:>10.1f}{ours / naive:>7.0f}x{f64:>10.0f}", end="")
            print(f"{ours / f64:>7.1f}x")
        for ts in ("explicit", "jpeg2000"):
            times = stage_times(series[ts], args.repeat)
            shown = ", ".join(f"{stage} {ms:.2f}" for stage, ms in times.items())
            print(f"\nainode ms/slice ({ts}): {shown}")


if __name__ == "__main__":
    main()
