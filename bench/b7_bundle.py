"""The EfficientNetB7 @512 bundle the inference and end-to-end benchmarks time.

``python -m bench.b7_bundle --work DIR`` makes it through the project's own pipeline, as an
ML engineer would: phantom lung slices written as the seed paper's class folders
(:func:`training.demo.study_slices`, file names ``p<seed>_…`` so splits keep patients apart),
then ``ainode train prepare``, ``fit --freeze-base``, ``evaluate`` and ``register --out``, so
the bundle carries what a real one does (calibration, operating point, out-of-distribution
statistics and whatever ``register`` adds for the runtimes' agreement gate).

No ImageNet weights for B7 can be fetched here, so the frozen backbone is a **randomly
initialised** B7 saved as a local weights file, its batch-norm statistics estimated on a
dozen training slices (without them a random B7's features are ~1e-6 and alike for every
image: :func:`random_backbone_weights`); only the head is trained, on cached backbone
features. Its answers mean nothing (a timing bundle, marked demo) and a random backbone's
class signal is faint, so quantisation can change its answers where a trained model's would
hold (the agreement gate tells); its arithmetic is exactly the seed's model's (27 GMAC per
512 x 512 slice), which is what the benchmarks time.

``--fine-tune-blocks N --fine-tune-passes K`` then also trains the backbone's top N blocks on
the phantoms (on cached activations, as ``ainode train fit`` does): a B7 whose answers are
confident, to see whether a quantised runtime keeps them. Its lower blocks stay random, so it
memorises its training slices rather than generalising (20 patients, top 6 blocks, 20
passes: training accuracy 1.0, validation 0.5; about 45 min on 2 cores). The built bundle
stays in
``DIR/bundle`` and is reused while the recipe is unchanged (about 6-10 min to build on 2
cores, seconds to reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

NAME = "bench-b7-phantom"
BACKBONE, INPUT_SIZE = "EfficientNetB7", 512
RANDOM_BASE = (
    "timing bundle: EfficientNetB7 @512 with a RANDOMLY INITIALISED frozen backbone (no ImageNet "
    "B7 weights can be downloaded here; batch-norm statistics of phantom slices) and a head "
    "trained on phantom slices; its answers mean nothing, NOT for clinical use"
)
FIRST_SEED = 2000  # other patients than the demo model's (training.demo.FIRST_SEED)
BUNDLE_DIR, RECIPE_FILE = "bundle", "recipe.json"


def recipe(
    seeds: int,
    per_class: int,
    passes: int,
    backbone: str,
    input_size: int,
    tune_blocks: int = 0,
    tune_passes: int = 0,
) -> dict:
    """What the bundle is made from; a kept ``--work`` folder is reused only for the same."""
    tuning = {
        "fine_tune_blocks": tune_blocks,
        "fine_tune_passes": tune_passes,
        "fine_tune_lr": 1e-4,
    }
    return {
        "backbone": backbone,
        "input_size": input_size,
        "seeds": seeds,
        "per_class": per_class,
        "passes": passes,
        "first_seed": FIRST_SEED,
        "val": 0.2,
        "test": 0.2,
        "batch_size": 8,
        "lr": 1e-3,
        "seed": 0,
        **(tuning if tune_blocks else {}),
    }


def write_phantom_folders(out: Path, seeds: int, per_class: int, size: int = INPUT_SIZE) -> int:
    """``per_class`` labelled lung slices of each class of each phantom patient, evenly spaced
    through its study, as class-folder PNGs of ``size`` pixels a side; how many were written."""
    from training.demo import series_length, study_slices

    written = 0
    for seed in range(FIRST_SEED, FIRST_SEED + seeds):
        for name, chosen in study_slices(seed, series_length(seed), size).items():
            (out / name).mkdir(parents=True, exist_ok=True)
            picks = np.linspace(0, len(chosen) - 1, min(per_class, len(chosen))).round()
            for position in sorted({int(p) for p in picks}):
                index, image = chosen[position]
                Image.fromarray(image).save(out / name / f"p{seed}_{index:03d}.png")
                written += 1
    return written


def random_backbone_weights(backbone: str, size: int, images: np.ndarray, path: Path) -> Path:
    """A randomly initialised ``include_top=False`` weights file for ``backbone`` whose
    batch-norm statistics are those of ``images`` (uint8 ``(N, H, W, 1)`` training slices).

    A random EfficientNet keeps the initial statistics (mean 0, variance 1), which are wrong
    by orders of magnitude for its random convolutions: its pooled features come out ~1e-6
    and the same for every image, so a head cannot learn and a quantised model has nothing
    to keep. Estimating the statistics once on the slices (as batch norm does while training)
    gives features that differ between images; the convolutions stay random.
    """
    import keras

    keras.utils.set_random_seed(0)
    build = getattr(keras.applications, backbone)
    base = build(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in base.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0  # as make_model's frozen base runs: no stochastic depth
    pixels = np.repeat(images.astype(np.float32), 3, axis=-1)  # grey to RGB, as make_model
    # two slices a call (B7 at 512 px in training mode holds GBs per slice), the statistics
    # averaged over the calls: momentum (k-1)/k makes the moving values their running mean
    for k, start in enumerate(range(0, len(pixels), 2), 1):
        for layer in norms:
            layer.momentum = (k - 1) / k
        base(pixels[start : start + 2], training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum
    base.save_weights(path)
    return path


def training_slices(run: Path, count: int) -> np.ndarray:
    """``count`` training images of a prepared run, spread over its shards' order."""
    from training.shards import PreparedRun

    images = np.concatenate([s["images"] for s in PreparedRun.open(run).read_shards("train")])
    return images[np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)]


def build(
    work: Path,
    seeds: int = 15,
    per_class: int = 3,
    passes: int = 20,
    backbone: str = BACKBONE,
    input_size: int = INPUT_SIZE,
    tune_blocks: int = 0,
    tune_passes: int = 0,
) -> Path:
    """The bundle folder under ``work``: reused when built there with the same recipe,
    otherwise made through ``ainode train`` (see the module docstring; another ``backbone``
    and ``input_size`` only to try the recipe quickly)."""
    wanted = recipe(seeds, per_class, passes, backbone, input_size, tune_blocks, tune_passes)
    bundle, stamp = work / BUNDLE_DIR, work / RECIPE_FILE
    same = stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted
    if same and (bundle / "model.json").is_file():
        print(f"B7 bench bundle: reusing {bundle} (same recipe)")
        return bundle
    if not same:  # another recipe: nothing of the old one is kept
        for stale in (BUNDLE_DIR, "run", "phantoms", "data"):
            shutil.rmtree(work / stale, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    began = time.perf_counter()
    print(f"B7 bench bundle: building in {work}\n  {RANDOM_BASE}", flush=True)
    _train(work, wanted)
    print(f"B7 bench bundle: {bundle} built in {time.perf_counter() - began:.0f} s")
    return bundle


def _train(work: Path, wanted: dict) -> None:
    """Class folders → ``ainode train prepare|fit|evaluate|register``, each step skipped when
    an interrupted build of the same recipe already did it."""
    from node.settings import Settings
    from training import cli
    from training.fit import FIT_DIR, SUMMARY_FILE

    phantoms, run = work / "phantoms", work / "run"
    backbone, size = wanted["backbone"], wanted["input_size"]
    if not (phantoms / ".complete").is_file():
        images = write_phantom_folders(phantoms, wanted["seeds"], wanted["per_class"], size)
        (phantoms / ".complete").write_text(f"{images}\n", encoding="utf-8")
    print(f"  {(phantoms / '.complete').read_text().strip()} labelled {size} px slices of "
          f"{wanted['seeds']} phantom patients", flush=True)  # fmt: skip
    settings = Settings(data_dir=work / "data")

    def step(*argv: str) -> None:
        print(f"  ainode train {argv[0]} ...", flush=True)
        if cli.run(settings, list(argv)) != 0:
            raise SystemExit(f"ainode train {argv[0]} failed")

    if not (run / "prepare.json").is_file():
        step(
            "prepare", "--folders", str(phantoms), "--patient-pattern", r"^p(\d+)_",
            "--out", str(run), "--image-size", str(size), "--val", str(wanted["val"]),
            "--test", str(wanted["test"]), "--seed", str(wanted["seed"]), "--no-progress",
        )  # fmt: skip
    weights = work / f"random-{backbone.lower()}-notop.weights.h5"
    if not weights.is_file():
        print("  random backbone, batch-norm statistics of 12 training slices ...", flush=True)
        random_backbone_weights(backbone, size, training_slices(run, 12), weights)
    if not (run / FIT_DIR / SUMMARY_FILE).is_file():
        passes, blocks = wanted["passes"], wanted.get("fine_tune_blocks", 0)
        tuning = (
            ("--fine-tune-blocks", str(blocks), "--fine-tune-epochs",
             str(wanted["fine_tune_passes"]), "--fine-tune-lr", str(wanted["fine_tune_lr"]))
            if blocks else ()
        )  # fmt: skip
        step(
            "fit", str(run), "--backbone", backbone, "--input-size", str(size),
            "--batch-size", str(wanted["batch_size"]), "--epochs", str(passes),
            "--patience", str(10 * passes), "--lr", str(wanted["lr"]), "--weights",
            str(weights), "--freeze-base", "--seed", str(wanted["seed"]), *tuning,
        )  # fmt: skip
    step("evaluate", str(run))
    step(
        "register", str(run), "--name", NAME, "--version", "1.0.0", "--demo",
        "--description", RANDOM_BASE, "--out", str(work / BUNDLE_DIR),
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.b7_bundle", description=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="folder kept for reuse")
    parser.add_argument("--seeds", type=int, default=15, help="phantom patients (default 15)")
    parser.add_argument(
        "--per-class", type=int, default=3, help="slices of each class per patient (default 3)"
    )
    parser.add_argument("--passes", type=int, default=20, help="head passes (default 20)")
    parser.add_argument("--fine-tune-blocks", type=int, default=0, help="then train top N blocks")
    parser.add_argument("--fine-tune-passes", type=int, default=0, help="passes for those")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the bundle and print where it is."""
    args = _parser().parse_args(argv)
    print(
        build(
            args.work, args.seeds, args.per_class, args.passes,
            tune_blocks=args.fine_tune_blocks, tune_passes=args.fine_tune_passes,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
