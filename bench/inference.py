"""Seconds per slice: one ``model.predict`` per image (the seed's app) vs batched vs ONNX.

``python -m bench.inference`` times the committed demo bundle and an untrained
EfficientNetB7 at 512 px (the seed's model size) on windowed 512 x 512 phantom slices.
Figures are medians of ``--repeats`` runs; compare the ratios, which are measured in one run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from node import imaging, phantom  # noqa: E402
from node.bundle import ModelBundle, ModelInfo, write_bundle  # noqa: E402
from node.result import CLASSES  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "node" / "models" / "demo"


def windowed_slices(count: int) -> np.ndarray:
    """``count`` lung-bearing 512 x 512 windowed slices of a COVID-19 phantom study."""
    spec = phantom.PhantomSpec(finding="covid", slices=max(count * 2, 8), seed=77)
    hu = phantom.generate_hu_volume(spec)
    keep = [i for i, s in enumerate(hu) if imaging.lung_fraction(s) >= 0.05][:count]
    images = [imaging.apply_window(hu[i], imaging.LUNG) for i in keep]
    while len(images) < count:
        images += images[: count - len(images)]
    return np.stack(images)


def seconds_per_image(run: Callable[[], object], images: int, repeats: int) -> float:
    """Median wall time of ``run`` over ``repeats`` runs (after one warm-up), per image."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / images


def untrained_b7_bundle(folder: Path) -> Path:
    """EfficientNetB7 at 512 px with random weights, written as a bundle (no training)."""
    import keras
    import tensorflow as tf

    from training.model import make_model

    model = make_model("EfficientNetB7", input_size=512, weights=None)
    info = ModelInfo(
        name="bench-efficientnetb7-untrained",
        version="0",
        classes=CLASSES,
        input_size=512,
        window_center=imaging.LUNG.center,
        window_width=imaging.LUNG.width,
        preprocessing_version=imaging.PREPROCESSING_VERSION,
        backbone="EfficientNetB7",
        dataset_manifest_hash=hashlib.sha256(b"untrained").hexdigest(),
        metrics={},
        framework={"tensorflow": tf.__version__, "keras": keras.__version__},
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        description="random weights, for timing only",
    )
    return write_bundle(model, info, folder)


def bench_bundle(label: str, folder: Path, pixels: np.ndarray, args) -> None:
    """Print per-image seconds of the three paths and their ratios for one bundle."""
    started = time.perf_counter()
    bundle = ModelBundle.load(folder)
    model = bundle.model
    loaded = time.perf_counter() - started
    per_image = seconds_per_image(
        lambda: [model.predict(image[np.newaxis, ..., np.newaxis], verbose=0) for image in pixels],
        len(pixels),
        args.repeats,
    )
    batched = seconds_per_image(
        lambda: bundle.predict(pixels, batch_size=args.batch_size), len(pixels), args.repeats
    )
    started = time.perf_counter()
    onnx = ModelBundle.load(folder, runtime="onnx")
    exported = time.perf_counter() - started
    onnx_s = seconds_per_image(
        lambda: onnx.predict(pixels, batch_size=args.batch_size), len(pixels), args.repeats
    )
    difference = float(np.abs(onnx.predict(pixels) - bundle.predict(pixels)).max())
    print(f"\n{label}: {len(pixels)} slices 512x512, batch {args.batch_size}")
    print(f"  load {loaded:.1f} s, ONNX export + load {exported:.1f} s")
    print(f"  (a) model.predict per image   {per_image:8.4f} s/image")
    print(
        f"  (b) ModelBundle.predict       {batched:8.4f} s/image   {per_image / batched:5.2f}x (a)"
    )
    print(f"  (c) ONNX Runtime              {onnx_s:8.4f} s/image   {per_image / onnx_s:5.2f}x (a)")
    print(f"  ONNX vs Keras max |dp| {difference:.2e}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__)
    parser.add_argument("--images", type=int, default=32, help="slices for the demo bundle")
    parser.add_argument("--b7-images", type=int, default=8, help="slices for EfficientNetB7")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-b7", action="store_true", help="time the demo bundle only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    args = _parser().parse_args(argv)
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, GPU visible: {gpu}")
    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as temp:
        demo = Path(temp) / "demo"  # a copy, so the ONNX export is not cached in the repo
        demo.mkdir()
        for name in ("model.json", "model.keras"):
            shutil.copy2(DEMO / name, demo / name)
        bench_bundle("demo bundle (EfficientNetB0)", demo, windowed_slices(args.images), args)
        if not args.skip_b7:
            b7 = untrained_b7_bundle(Path(temp) / "b7")
            bench_bundle(
                "EfficientNetB7 @512, untrained", b7, windowed_slices(args.b7_images), args
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
