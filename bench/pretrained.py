"""Does the offline ImageNet start pay? Accuracy vs training minutes, same data, same budget.

``python -m bench.pretrained`` renders phantom patients (``training.demo``'s class folders),
prepares one run (splits by patient, balancing copies) and fits it with each arm below at the
same input size, batch, learning-rate schedule and wall-clock budget, one after the other in
this process, through ``training.fit`` itself:

- ``lite0-imagenet``: EfficientNet-Lite0 from the shipped ImageNet weights, whole network;
- ``lite0-imagenet-seed``: the seed paper's recipe on the same start: a head on the frozen
  base for ``--head-passes``, then the top ``--fine-tune-blocks`` blocks at a tenth of the rate;
- ``lite0-scratch``: EfficientNet-Lite0 from random initialisation;
- ``b0-scratch``: Keras' EfficientNetB0 from random initialisation (the old demo's start).

It prints the best validation accuracy each arm had reached after every minute, then the test
split's slice and study accuracy of each arm's best checkpoint. Minutes include validation.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from training import datasets, demo  # noqa: E402
from training.fit import FIT_DIR, HISTORY_FILE, fit  # noqa: E402
from training.options import FitOptions  # noqa: E402
from training.scoring import evaluate_run  # noqa: E402
from training.shards import PreparedRun, PrepareOptions, prepare  # noqa: E402
from training.splits import split_by_patient, split_counts  # noqa: E402

ARMS = ("lite0-imagenet", "lite0-imagenet-seed", "lite0-scratch", "b0-scratch")


class Budget(keras.callbacks.Callback):
    """Stops the fit after the first shard that ends past ``seconds`` of training time."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def on_epoch_end(self, epoch, logs=None):
        if (logs or {}).get("seconds", 0.0) >= self.seconds:
            self.model.stop_training = True


def arm_options(arm: str, args: argparse.Namespace, decay_steps: int) -> FitOptions:
    """The FitOptions of one arm; everything but the start and the recipe is shared."""
    shared = {
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "epochs": 1000,  # the budget ends the fit
        "patience": 1000,
        "learning_rate": args.lr,
        "decay_steps": decay_steps,
        "decay_rate": 0.9,
        "seed": args.seed,
    }
    if arm == "lite0-imagenet":
        return FitOptions(backbone="EfficientNetLite0", **shared)
    if arm == "lite0-imagenet-seed":
        return FitOptions(
            backbone="EfficientNetLite0",
            freeze_base=True,
            fine_tune_blocks=args.fine_tune_blocks,
            fine_tune_epochs=1000,
            fine_tune_lr=args.lr / 10,
            **{**shared, "epochs": args.head_passes},
        )
    if arm == "lite0-scratch":
        return FitOptions(backbone="EfficientNetLite0", weights="random", **shared)
    if arm == "b0-scratch":
        return FitOptions(backbone="EfficientNetB0", **shared)
    raise ValueError(f"unknown arm {arm!r}")


def prepared_run(args: argparse.Namespace, work: Path) -> Path:
    """Phantom class folders → one prepared run shared by every arm."""
    seeds = list(range(demo.FIRST_SEED, demo.FIRST_SEED + args.seeds))
    started = time.perf_counter()
    images = demo.write_class_folders(seeds, args.rows, work / "phantoms")
    samples = datasets.read_class_folders(work / "phantoms", patient_pattern=r"^p(\d+)_")
    samples = split_by_patient(samples, val=args.val, test=args.test, seed=args.seed)
    run = work / "run"
    prepare(samples, run, PrepareOptions(image_size=args.input_size, shard_size=args.shard_size))
    print(
        f"{images} labelled slices of {len(seeds)} phantom patients ({args.rows} px) prepared "
        f"at {args.input_size} px in {time.perf_counter() - started:.0f} s"
    )
    for split, counts in split_counts(samples).items():
        print(f"  {split}: {counts}")
    return run


def run_arm(arm: str, args: argparse.Namespace, run: Path, work: Path) -> dict:
    """Fit one arm on a copy of the prepared run; its curve and test result."""
    folder = work / arm
    shutil.copytree(run, folder)
    prepared = PreparedRun.open(folder)
    steps = sum(-(-s["images"] // args.batch_size) for s in prepared.info["shards"]["train"])
    options = arm_options(arm, args, decay_steps=steps)  # decays by 0.9 once per pass
    keras.backend.clear_session()
    summary = fit(folder, options, callbacks=[Budget(args.minutes * 60)])
    with open(folder / FIT_DIR / HISTORY_FILE, newline="", encoding="utf-8") as handle:
        curve = [
            (float(row["seconds"]), float(row["val_accuracy"])) for row in csv.DictReader(handle)
        ]
    result, _ = evaluate_run(folder, "best", "top-mean", "test")
    print(
        f"{arm}: {summary['epochs_run']} shard(s), {summary['seconds']:.0f} s, "
        f"{summary['images_per_second']} img/s, best val {summary['best_val_accuracy']:.3f}; "
        f"test slice {result['slice']['accuracy']:.3f}, study {result['study']['accuracy']:.3f}"
    )
    return {"summary": summary, "curve": curve, "test": result}


def print_tables(results: dict[str, dict], minutes: float) -> None:
    """Best validation accuracy reached by each minute, then the test results."""
    marks = [m for m in range(1, int(minutes) + 1)] or [minutes]
    print("\nbest validation slice accuracy reached after N minutes of training")
    print(f"{'arm':22}" + "".join(f"{m:>7} min" for m in marks) + f"{'at end':>11}")
    for arm, result in results.items():
        cells = []
        for mark in marks:
            seen = [acc for seconds, acc in result["curve"] if seconds <= mark * 60]
            cells.append(f"{max(seen):11.3f}" if seen else f"{'-':>11}")
        end = result["curve"][-1][0] / 60 if result["curve"] else 0.0
        cells.append(f"{result['summary']['best_val_accuracy'] or 0:6.3f} @{end:3.1f}")
        print(f"{arm:22}" + "".join(cells))
    print("\ntest split, best checkpoint")
    print(f"{'arm':22}{'slice acc':>10}{'study acc':>10}{'COVID sens':>11}{'img/s':>8}")
    for arm, result in results.items():
        test, summary = result["test"], result["summary"]
        print(
            f"{arm:22}{test['slice']['accuracy']:10.3f}{test['study']['accuracy']:10.3f}"
            f"{test['slice']['covid_sensitivity'] or 0:11.3f}{summary['images_per_second']:8.1f}"
        )
    base = results.get("b0-scratch")
    if base:
        for arm, result in results.items():
            if arm != "b0-scratch":
                gain = result["test"]["slice"]["accuracy"] - base["test"]["slice"]["accuracy"]
                print(f"{arm} vs b0-scratch: {gain:+.3f} test slice accuracy, same budget")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrained", description=__doc__)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per arm")
    parser.add_argument("--seeds", type=int, default=30, help="phantom patients")
    parser.add_argument("--rows", type=int, default=256, help="phantom rows and columns")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=300, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-passes", type=int, default=1, help="seed recipe: head stage")
    parser.add_argument("--fine-tune-blocks", type=int, default=3)
    parser.add_argument("--val", type=float, default=0.15)
    parser.add_argument("--test", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep the data and runs here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every arm and print the figures."""
    args = _parser().parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    print(f"{os.cpu_count()} CPUs; budget {args.minutes:g} min per arm; arms: {', '.join(arms)}")
    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        run = prepared_run(args, work)
        results = {arm: run_arm(arm, args, run, work) for arm in arms}
    print_tables(results, args.minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
