"""Frozen-stage feature cache benchmark: ``training.fit.fit`` with and without the cache, side
by side, for the head stage on a frozen backbone and for fine-tuning its top blocks.

For each backbone, two fits of the same prepared run (phantom-like 128 x 128 slices in class
folders, resized in the model), each in a fresh subprocess one after the other: the seed's
recipe (a head on the frozen ImageNet backbone for ``--passes`` passes, then the top
``--blocks`` blocks for as many more), once with ``feature_cache`` (the default) and once
without. The stage times come from the fit's own clock (``history.csv``'s running
``seconds``; a cached stage's clock includes building its cache). Printed per stage: seconds,
the uncached/cached ratio, what one pass costs each way and what the cache took to build, so
the ratio for another number of passes can be read off; and whether the answers stayed the
same (best validation accuracy each way, the largest probability difference between the two
fitted models on the validation split).

- EfficientNetLite0 at 224 px from the shipped ImageNet weights;
- EfficientNetB7 at 512 px (the seed's model) on a small set: B7 has no ImageNet weights here
  (nothing is downloaded), so it starts from a randomly initialised backbone saved as a local
  weights file and frozen. Speed does not depend on the weights' values; the accuracy of a
  random frozen base is near chance, and what is compared is that caching does not change it.

Run: ``.venv/bin/python -m bench.feature_cache [--quick] [--skip-b7] [--passes N]``
(also a section of ``python -m bench.training``). Targets: the head stage ≥ 5x and top-6
fine-tuning ≥ 2x on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench.training import available_mb, run_child, write_class_folders  # noqa: E402

PATIENT_PATTERN = r"^(p\d+)_"
# (label, backbone, input size, batch size, images in the class folders)
CONFIGS = {
    "lite0": ("EfficientNetLite0 @224", "EfficientNetLite0", 224, 32, 600),
    "b7": ("EfficientNetB7 @512", "EfficientNetB7", 512, 8, 90),
}


# --- inside the measuring subprocess --------------------------------------------------------


def child_fit(spec: dict) -> dict:
    """One fit; its summary, the stage times from ``history.csv`` and the best model's
    validation probabilities (saved beside the run for the parent to compare)."""
    import keras

    from training.fit import BEST_MODEL, FIT_DIR, HISTORY_FILE, fit
    from training.options import FitOptions
    from training.shards import PreparedRun

    run = Path(spec["run"])
    began = time.perf_counter()
    summary = fit(run, FitOptions(**spec["options"]))
    wall = time.perf_counter() - began
    with open(run / FIT_DIR / HISTORY_FILE, newline="", encoding="utf-8") as handle:
        clock = [float(row["seconds"]) for row in csv.DictReader(handle)]
    model = keras.models.load_model(run / FIT_DIR / BEST_MODEL, compile=False)
    images = np.concatenate([s["images"] for s in PreparedRun.open(run).read_shards("val")])
    np.save(run / "val-probabilities.npy", model.predict(images, batch_size=8, verbose=0))
    return {"summary": summary, "clock": clock, "wall_s": wall}


def child_steps(spec: dict) -> dict:
    """Seconds per training step of the fine-tuning stage each way, on one batch: the whole
    classifier (top blocks trainable) against its top blocks on cached activations. Their
    ratio bounds what caching can gain in that stage, whatever the number of passes."""
    import keras

    from training.feature_cache import split_model
    from training.model import make_model, unfreeze_top_blocks

    def step_seconds(model, inputs, labels) -> float:
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.train_on_batch(inputs, labels)  # tracing
        times = []
        for _ in range(spec["steps"]):
            began = time.perf_counter()
            model.train_on_batch(inputs, labels)
            times.append(time.perf_counter() - began)
        return float(np.median(times))

    keras.utils.set_random_seed(0)
    size, batch = spec["input_size"], spec["batch_size"]
    model = make_model(spec["backbone"], size, weights=spec.get("weights"), freeze_base=True)
    unfreeze_top_blocks(model, spec["blocks"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 128, 128, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, batch)
    split = split_model(model, spec["blocks"])
    activations = split.frozen.predict_on_batch(images)
    return {
        "whole_s": step_seconds(model, images, labels),
        "top_s": step_seconds(split.trainer, activations, labels),
    }


# --- the parent -----------------------------------------------------------------------------


def prepare_run(root: Path, images: int) -> Path:
    """Class folders of ``images`` phantom-like slices, prepared into one run."""
    from training.datasets import read_class_folders
    from training.shards import PrepareOptions, prepare
    from training.splits import split_by_patient

    folders = root / "images"
    write_class_folders(folders, images, seed=0)
    samples = split_by_patient(
        read_class_folders(folders, PATIENT_PATTERN), val=0.2, test=0.1, seed=0
    )
    prepare(samples, root / "run", PrepareOptions(image_size=128, shard_size=1000))
    return root / "run"


def random_backbone_weights(backbone: str, size: int, path: Path) -> Path:
    """A randomly initialised ``include_top=False`` weights file for ``backbone``."""
    import keras

    keras.utils.set_random_seed(0)
    build = getattr(keras.applications, backbone)
    build(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg").save_weights(
        path
    )
    return path


def stage_seconds(result: dict, head_epochs: int) -> tuple[float, float]:
    """(head stage, fine-tuning stage) seconds on the fit's clock."""
    clock = result["clock"]
    head = clock[head_epochs - 1]
    return head, clock[-1] - head


def bench_backbone(name: str, args, work: Path) -> dict:
    """Fit ``name``'s config with and without the cache; print and return the figures."""
    label, backbone, size, batch, images = CONFIGS[name]
    if args.quick:
        images = max(90, images // 4)
    root = work / name
    run = prepare_run(root, images)
    options = {
        "backbone": backbone,
        "input_size": size,
        "batch_size": batch,
        "epochs": args.passes,
        "patience": 10_000,  # every pass runs: this measures speed
        "learning_rate": 1e-3,
        "freeze_base": True,
        "fine_tune_blocks": args.blocks,
        "fine_tune_epochs": args.passes,
        "seed": 0,
    }
    if backbone.startswith("EfficientNetB"):
        options["weights"] = str(
            random_backbone_weights(backbone, size, root / "random.weights.h5")
        )
    results = {}
    for mode, cached in (("uncached", False), ("cached", True)):
        copy = root / f"run-{mode}"
        shutil.copytree(run, copy)
        spec = {"run": str(copy), "options": {**options, "feature_cache": cached}}
        results[mode] = run_child("fit", spec, work, args.memory_limit_mb, "bench.feature_cache")
        if "error" in results[mode]:
            print(f"  {label}, {mode}: {results[mode]['error']}")
            return {}
    steps = {
        key: options[key] for key in ("backbone", "input_size", "batch_size") if key in options
    }
    steps.update(weights=options.get("weights"), blocks=args.blocks, steps=3)
    results["steps"] = run_child("steps", steps, work, args.memory_limit_mb, "bench.feature_cache")
    return print_backbone(label, root, results, args)


def print_backbone(label: str, root: Path, results: dict, args) -> dict:
    """Print the table of one backbone; return its ratios."""
    shards = results["cached"]["summary"]["shards"]
    head_epochs = args.passes * shards
    train = results["cached"]["summary"]["train_images"]
    val = sum(len(p) for p in [np.load(root / "run-cached" / "val-probabilities.npy")])
    print(
        f"\n  {label}: {train} training + {val} validation images, {args.passes} pass(es) "
        f"per stage, top {args.blocks} blocks in the second"
    )
    times = {mode: stage_seconds(results[mode], head_epochs) for mode in ("uncached", "cached")}
    builds = results["cached"]["summary"]["feature_cache"]
    ratios = {}
    for index, (stage, key) in enumerate((("head", "head"), (f"top-{args.blocks}", "fine-tune"))):
        plain, cached = times["uncached"][index], times["cached"][index]
        # a stage that read back the cache an earlier stage built spent nothing on it
        build = 0.0 if builds[key]["reused"] else builds[key]["build_seconds"]
        how = "read back" if builds[key]["reused"] else f"{build:.1f} s"
        ratios[stage] = plain / cached
        print(
            f"    {stage:<7} uncached {plain:7.1f} s ({plain / args.passes:6.1f} s/pass)   "
            f"cached {cached:7.1f} s (cache {how} + "
            f"{(cached - build) / args.passes:.2f} s/pass)   {ratios[stage]:5.1f}x"
        )
    steps = results["steps"]
    batch = results["cached"]["summary"]["options"]["batch_size"]
    if "error" not in steps:
        print(
            f"    one fine-tuning step (batch {batch}): "
            f"whole classifier {steps['whole_s']:.2f} s, top {args.blocks} blocks on cached "
            f"activations {steps['top_s']:.2f} s: caching can make that stage at most "
            f"{steps['whole_s'] / steps['top_s']:.1f}x faster, however many passes"
        )
    a = np.load(root / "run-uncached" / "val-probabilities.npy")
    b = np.load(root / "run-cached" / "val-probabilities.npy")
    best = [results[m]["summary"]["best_val_accuracy"] for m in ("uncached", "cached")]
    print(
        f"    best val_accuracy uncached {best[0]:.4f}, cached {best[1]:.4f}; the two best models' "
        f"validation probabilities differ by at most {np.abs(a - b).max():.4f}"
    )
    return ratios


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.feature_cache", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a quarter of the images")
    parser.add_argument("--skip-b7", action="store_true", help="no EfficientNetB7")
    parser.add_argument("--skip-lite0", action="store_true", help="no EfficientNetLite0")
    parser.add_argument("--passes", type=int, default=8, help="passes per stage (default 8)")
    parser.add_argument("--blocks", type=int, default=6, help="top blocks fine-tuned (default 6)")
    parser.add_argument("--work", type=Path, help="an empty folder to work in (kept afterwards)")
    parser.add_argument("--memory-limit-mb", type=float, help="default: MemAvailable - 2 GB")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return parser


def bench_cache(args, work: Path) -> None:
    """The section ``bench.training`` prints too."""
    print(
        f"\nfrozen-stage feature cache, training.fit.fit with and without it, {os.cpu_count()} "
        "CPUs (stage seconds on the fit's clock, cache building included)"
    )
    for name in (*(() if args.skip_lite0 else ("lite0",)), *(() if args.skip_b7 else ("b7",))):
        bench_backbone(name, args, work)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child[1]).read_text(encoding="utf-8"))
        result = {"fit": child_fit, "steps": child_steps}[args.child[0]](spec)
        Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
        return 0
    args.memory_limit_mb = args.memory_limit_mb or available_mb() - 2048
    work = args.work or Path(tempfile.mkdtemp(prefix="ainode-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        bench_cache(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
