"""Seconds per slice: one ``model.predict`` per image (the seed's app) vs batched vs ONNX.

``python -m bench.inference`` times the committed demo bundle, EfficientNet-Lite0 (ImageNet
base, untrained head) at ``--lite-sizes`` and an untrained EfficientNetB7 at 512 px (the seed's
model size) on windowed 512 x 512 phantom slices, then compares Lite0 with B7 per slice.
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

from node import phantom  # noqa: E402
from node.analysis import imaging  # noqa: E402
from node.analysis.bundle import ModelBundle, ModelInfo, write_bundle  # noqa: E402
from node.analysis.result import CLASSES  # noqa: E402
from node.settings import DEMO_MODEL_DIR  # noqa: E402

DEMO = DEMO_MODEL_DIR


def windowed_slices(count: int) -> np.ndarray:
    """``count`` lung-bearing 512 x 512 windowed slices of a COVID-19 phantom study."""
    spec = phantom.PhantomSpec(finding="covid", slices=max(count * 2, 8), seed=77)
    hu = phantom.generate_hu_volume(spec)
    keep = [i for i, s in enumerate(hu) if imaging.lung_fraction(s) >= 0.05][:count]
    images = [imaging.apply_window(hu[i], imaging.LUNG) for i in keep]
    while len(images) < count:
        images += images[: count - len(images)]
    return np.stack(images)


def seconds_per_image(
    run: Callable[[np.ndarray], object], pixels: np.ndarray, repeats: int, warm: int
) -> float:
    """Median wall time of ``run(pixels)`` over ``repeats`` runs, per image.

    A first call on ``warm`` images traces the function, so tracing is not timed.
    """
    run(pixels[:warm])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(pixels)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / len(pixels)


def untrained_bundle(folder: Path, backbone: str = "EfficientNetB7", size: int = 512) -> Path:
    """``backbone`` at ``size`` px with its default start (random for B7, ImageNet for Lite0)
    and an untrained head, written as a bundle (no training)."""
    import keras
    import tensorflow as tf

    from training.model import make_model

    model = make_model(backbone, input_size=size, weights=None)
    info = ModelInfo(
        name=f"bench-{backbone.lower()}-untrained",
        version="0",
        classes=CLASSES,
        input_size=size,
        window_center=imaging.LUNG.center,
        window_width=imaging.LUNG.width,
        preprocessing_version=imaging.PREPROCESSING_VERSION,
        backbone=backbone,
        dataset_manifest_hash=hashlib.sha256(b"untrained").hexdigest(),
        metrics={},
        framework={"tensorflow": tf.__version__, "keras": keras.__version__},
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        description="random weights, for timing only",
    )
    return write_bundle(model, info, folder)


def _per_image_predict(model) -> Callable[[np.ndarray], object]:
    """The seed's app: one ``model.predict`` call per image."""
    return lambda pixels: [model.predict(p[np.newaxis, ..., np.newaxis], verbose=0) for p in pixels]


def bench_bundle(label: str, folder: Path, pixels: np.ndarray, repeats: int, args) -> dict:
    """Print per-image seconds of the three paths and their ratios for one bundle."""
    started = time.perf_counter()
    bundle = ModelBundle.load(folder)
    loaded = time.perf_counter() - started
    print(f"\n{label}: {len(pixels)} slices 512x512, median of {repeats}, load {loaded:.1f} s")
    per_image = seconds_per_image(_per_image_predict(bundle.model), pixels, repeats, 1)
    print(f"  (a) model.predict per image        {per_image:8.4f} s/image")
    fastest = float("inf")
    for size in args.batch_sizes:
        batched = seconds_per_image(
            lambda p, size=size: bundle.predict(p, batch_size=size), pixels, repeats, size
        )
        ratio = per_image / batched
        print(
            f"  (b) ModelBundle.predict, batch {size:<3} {batched:8.4f} s/image {ratio:6.2f}x (a)"
        )
        fastest = min(fastest, batched)
    started = time.perf_counter()
    onnx = ModelBundle.load(folder, runtime="onnx")
    exported = time.perf_counter() - started
    size = max(args.batch_sizes)
    onnx_s = seconds_per_image(lambda p: onnx.predict(p, batch_size=size), pixels, repeats, size)
    ratio = per_image / onnx_s
    print(f"  (c) ONNX Runtime, batch {size:<3}        {onnx_s:8.4f} s/image {ratio:6.2f}x (a)")
    difference = float(np.abs(onnx.predict(pixels) - bundle.predict(pixels)).max())
    print(f"  ONNX export + load {exported:.1f} s; ONNX vs Keras max |dp| {difference:.2e}")
    chosen = ModelBundle.load(folder, runtime="auto").runtime  # the node's default setting
    node_s = onnx_s if chosen == "onnx" else fastest
    print(f"  the node's default (auto) runs {chosen} here: {per_image / node_s:6.2f}x (a)")
    return {"per_image": per_image, "keras": fastest, "onnx": onnx_s, "node": chosen}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__)
    parser.add_argument("--images", type=int, default=32, help="slices for the demo bundle")
    parser.add_argument("--b7-images", type=int, default=8, help="slices for EfficientNetB7")
    parser.add_argument(
        "--batch-sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[1, 16],
        help="ModelBundle.predict batch sizes, comma separated (ONNX uses the largest)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (demo bundle)")
    parser.add_argument("--b7-repeats", type=int, default=2, help="timed runs (B7)")
    parser.add_argument("--skip-b7", action="store_true", help="do not time EfficientNetB7")
    parser.add_argument(
        "--lite-sizes",
        type=lambda text: [int(v) for v in text.split(",") if v],
        default=[224, 512],
        help="EfficientNet-Lite0 input sizes to time, comma separated (empty: none)",
    )
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
        pixels = windowed_slices(args.images)
        info = ModelBundle.load(demo).info
        label = f"demo bundle ({info.backbone} @{info.input_size})"
        results = {label: bench_bundle(label, demo, pixels, args.repeats, args)}
        for size in args.lite_sizes:
            lite = untrained_bundle(Path(temp) / f"lite0-{size}", "EfficientNetLite0", size)
            label = f"EfficientNetLite0 @{size}, ImageNet base"
            results[label] = bench_bundle(label, lite, pixels, args.repeats, args)
        if not args.skip_b7:
            b7 = untrained_bundle(Path(temp) / "b7")
            pixels = windowed_slices(args.b7_images)
            label = "EfficientNetB7 @512, untrained"
            results[label] = bench_bundle(label, b7, pixels, args.b7_repeats, args)
    print_summary(results)
    return 0


def print_summary(results: dict[str, dict]) -> None:
    """Seconds per slice of every model (Keras: its fastest batch size; ONNX), and vs B7."""
    b7 = results.get("EfficientNetB7 @512, untrained")
    print(f"\n{'model':40}{'Keras s/slice':>14}{'ONNX s/slice':>14}{'B7/this Keras':>15}")
    for label, r in results.items():
        ratio = f"{b7['keras'] / r['keras']:14.1f}x" if b7 else f"{'-':>15}"
        print(f"{label:40}{r['keras']:14.4f}{r['onnx']:14.4f}{ratio}")


if __name__ == "__main__":
    sys.exit(main())
