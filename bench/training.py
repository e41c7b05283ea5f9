"""Training benchmark: images/s of a training step and of ``training.fit.fit``, and peak memory
of preparing and streaming shards against loading the whole set at once as the seed paper did.

One run, every figure measured beside its peer:

- memory: synthetic phantom-like 128 x 128 PNGs in three class folders (1,000 and 10,000
  images), read with ``read_class_folders``, split by patient and prepared into 500-image
  shards (``training.shards.prepare``); then, each in a fresh subprocess, the peak RSS of
  ``prepare``, of one epoch over every training shard (``train_batches``) plus one validation
  pass (``eval_batches``), and of the naive approach: every image of the set in one numpy
  array. Streaming and prepare should stay flat while naive grows with the set;
- speed: ``model.train_on_batch`` on random uint8 batches after one warm-up (tracing) step,
  for EfficientNetB0 at 96 px, batch 32, and the seed's EfficientNetB7 at 512 px (batch 80
  there; on a CPU a few steps of a small batch, since batch 8 needs more than 22 GB);
  then the whole ``training.fit.fit`` path on the smaller prepared run, read from the
  ``state.json`` it writes after every shard, as a ratio to the bare B0 step timed in the
  same process just before and just after it (other jobs slow both alike).

Then the frozen-stage feature cache section of :mod:`bench.feature_cache` (cached against
uncached fits of Lite0 @224 and B7 @512; ``--skip-cache`` leaves it out).

Run: ``.venv/bin/python -m bench.training [--quick] [--skip-b7] [--skip-cache] [--work DIR]``. Every
measurement runs in its own subprocess, killed if its RSS passes ``--memory-limit-mb``.
Wall times vary with other jobs on the machine: compare the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from node.analysis.result import CLASSES  # noqa: E402

IMAGE_SIZE = 128  # side of the synthetic PNGs and of the prepared shards
IMAGES_PER_PATIENT = 10
PATIENT_PATTERN = r"^(p\d+)_"
SMALL = ("EfficientNetB0", 96, 32)  # backbone, input size, batch size
SEED_PAPER = ("EfficientNetB7", 512, 80)
MB = 1024 * 1024


# --- measuring inside a child process -------------------------------------------------------


def memory_mb() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith("Vm"))
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> dict[str, float]:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs`` 5) and return both."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    return memory_mb()


def phase(action) -> dict:
    """Run ``action()`` and return its result with start RSS, peak RSS and wall seconds."""
    start = reset_peak()["VmRSS"]
    began = time.perf_counter()
    result = action() or {}
    seconds = time.perf_counter() - began
    return {**result, "start_mb": start, "peak_mb": memory_mb()["VmHWM"], "seconds": seconds}


def child_prepare(spec: dict) -> dict:
    """Peak RSS of ``prepare`` on the class folders (read and split before the phase)."""
    from training.datasets import read_class_folders
    from training.shards import PrepareOptions, prepare
    from training.splits import split_by_patient

    samples = split_by_patient(read_class_folders(spec["folders"], PATIENT_PATTERN), seed=0)
    options = PrepareOptions(image_size=IMAGE_SIZE, shard_size=spec["shard_size"])
    info = {}
    result = phase(lambda: info.update(prepare(samples, spec["out"], options)))
    result["shards"] = {split: len(shards) for split, shards in info["shards"].items()}
    result["images"] = {
        split: sum(s["images"] for s in info["shards"][split]) for split in info["shards"]
    }
    largest = max(s["images"] for shards in info["shards"].values() for s in shards)
    result["shard_mb"] = largest * IMAGE_SIZE * IMAGE_SIZE / MB
    return result


def child_stream(spec: dict) -> dict:
    """Peak RSS of one epoch over every training shard and one validation pass."""
    from training.batches import eval_batches, train_batches
    from training.shards import PreparedRun

    run = PreparedRun.open(spec["run"])

    def stream() -> dict:
        train, steps = train_batches(run, spec["batch_size"], 0, 0, False)
        seen = sum(len(next(train)[1]) for _ in range(steps * len(run.shard_files("train"))))
        val, val_steps = eval_batches(run, "val", spec["batch_size"])
        seen += sum(len(next(val)[1]) for _ in range(val_steps))
        return {"streamed": seen}

    return phase(stream)


def child_naive(spec: dict) -> dict:
    """Peak RSS of the seed's loader: every image of the set read into one numpy array.

    Keras is imported first, as for streaming, so both start from the same baseline.
    """
    from PIL import Image

    import training.fit  # noqa: F401

    paths = sorted(Path(spec["folders"]).rglob("*.png"))

    def load_all() -> dict:
        images = [np.asarray(Image.open(path).convert("L")) for path in paths]
        array = np.stack(images)
        return {"streamed": len(array), "array_mb": array.nbytes / MB}

    return phase(load_all)


def bare_steps(spec: dict):
    """A compiled model and a function timing ``train_on_batch`` on random uint8 batches.

    Returns ``(build seconds, time_steps)``; ``time_steps(n)`` returns ``n`` step times.
    """
    import keras

    from training.model import make_model

    began = time.perf_counter()
    model = make_model(spec["backbone"], input_size=spec["input_size"], weights=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    built = time.perf_counter() - began
    rng = np.random.default_rng(0)
    shape = (spec["batch_size"], spec["image_size"], spec["image_size"], 1)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, len(CLASSES), spec["batch_size"])

    def time_steps(count: int) -> list[float]:
        times = []
        for _ in range(count):
            began = time.perf_counter()
            model.train_on_batch(images, labels)
            times.append(time.perf_counter() - began)
        return times

    return built, time_steps


def measure_bare(spec: dict):
    """Bare-step figures after warm-up (tracing) steps, and the timer for more steps."""
    import tensorflow as tf

    built, time_steps = bare_steps(spec)
    warm = time_steps(spec["warm"])
    result = {
        "build_s": built,
        "warm_s": warm,
        "step_s": time_steps(spec["steps"]),
        "peak_mb": memory_mb()["VmHWM"],
        "tensorflow": tf.__version__,
        "gpu": bool(tf.config.list_physical_devices("GPU")),
    }
    return result, time_steps


def child_steps(spec: dict) -> dict:
    """Seconds per bare ``train_on_batch`` after warm-up (tracing) steps."""
    return measure_bare(spec)[0]


def child_fit(spec: dict) -> dict:
    """``training.fit.fit`` on a prepared run, with the loop state sampled after every shard,
    between two series of bare steps in the same process (other jobs on the machine slow
    both alike)."""
    from training.fit import FIT_DIR, STATE_FILE, fit
    from training.options import FitOptions
    from training.shards import PreparedRun

    bare, time_steps = measure_bare(spec["bare"])
    backbone, input_size, batch_size = SMALL
    options = FitOptions(
        backbone=backbone,
        input_size=input_size,
        batch_size=batch_size,
        epochs=spec["epochs"],
        patience=1000,  # every shard runs: this measures speed, not learning
    )
    state_file = Path(spec["run"]) / FIT_DIR / STATE_FILE
    marks: list[dict] = []
    done = threading.Event()
    watcher = threading.Thread(target=_watch_state, args=(state_file, marks, done), daemon=True)
    watcher.start()
    began = time.perf_counter()
    summary = fit(spec["run"], options)
    wall = time.perf_counter() - began
    done.set()
    watcher.join()
    # Every Keras epoch trains on as many images as the largest shard holds (train_batches).
    run = PreparedRun.open(spec["run"])
    largest = max(shard["images"] for shard in run.info["shards"]["train"])
    return {
        "wall_s": wall,
        "marks": marks,
        "summary": summary,
        "images_per_epoch": largest,
        "peak_mb": memory_mb()["VmHWM"],
        "bare": bare,
        "bare_after_s": time_steps(spec["bare"]["steps"]),
    }


def _watch_state(path: Path, marks: list[dict], done: threading.Event) -> None:
    """Record (wall clock, loop state) each time ``fit`` rewrites its ``state.json``."""
    seen = None
    while True:
        finished = done.is_set()  # one last look after fit has returned
        try:
            stamp = path.stat().st_mtime_ns
            if stamp != seen:
                state = json.loads(path.read_text(encoding="utf-8"))
                seen = stamp
                if state.get("epoch") and not any(m["epoch"] == state["epoch"] for m in marks):
                    marks.append({**state, "at": time.perf_counter()})
        except (FileNotFoundError, json.JSONDecodeError):
            pass  # not written yet, or caught between the write and the rename
        if finished:
            return
        time.sleep(0.02)


CHILDREN = {
    "prepare": child_prepare,
    "stream": child_stream,
    "naive": child_naive,
    "steps": child_steps,
    "fit": child_fit,
}


def child_main(kind: str, spec_path: Path) -> int:
    """Entry point of a measuring subprocess: run one child, write its result as JSON."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    result = CHILDREN[kind](spec)
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


# --- the parent: data, subprocesses, printing ----------------------------------------------


def write_class_folders(root: Path, count: int, seed: int) -> None:
    """``count`` phantom-like 128 x 128 PNGs in one folder per class, 10 per patient.

    Lung-window slices of a few phantom studies, each copy with its own noise, so the files
    are neither identical nor random noise (which would make unrealistically large PNGs).
    """
    from PIL import Image

    from training.demo import study_slices

    pool: dict[str, list[np.ndarray]] = {name: [] for name in CLASSES}
    for study_seed in (1000, 1001, 1002):
        for name, chosen in study_slices(study_seed, 30, IMAGE_SIZE).items():
            pool[name] += [image for _, image in chosen]
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for i in range(count):
        patient, index = divmod(i, IMAGES_PER_PATIENT)
        name = CLASSES[patient % len(CLASSES)]
        base = pool[name][rng.integers(len(pool[name]))].astype(np.int16)
        noisy = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / name / f"p{patient:05d}_{index:03d}.png")


def run_child(
    kind: str, spec: dict, work: Path, limit_mb: float, module: str = "bench.training"
) -> dict:
    """Run ``child_<kind>`` of ``module`` (``python -m MODULE --child KIND SPEC``) in a fresh
    interpreter, killing it if its RSS passes ``limit_mb``.

    Returns the child's result, or ``{"error": why}``.
    """
    stem = work / f"child-{kind}-{time.monotonic_ns()}"
    spec = {**spec, "result": str(stem.with_suffix(".result.json"))}
    stem.with_suffix(".json").write_text(json.dumps(spec), encoding="utf-8")
    command = [sys.executable, "-m", module, "--child", kind, str(stem) + ".json"]
    with open(stem.with_suffix(".log"), "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            rss = _rss_mb(process.pid)
            if rss > limit_mb:
                process.kill()
                process.wait()
                return {"error": f"killed at {rss:,.0f} MB RSS (limit {limit_mb:,.0f} MB)"}
            time.sleep(0.2)
    if process.returncode != 0:
        lines = stem.with_suffix(".log").read_text(errors="replace").strip().splitlines()
        return {"error": f"exit {process.returncode}: {lines[-1] if lines else 'no output'}"}
    return json.loads(Path(spec["result"]).read_text(encoding="utf-8"))


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass  # exited between poll() and open()
    return 0.0


def available_mb() -> float:
    """MemAvailable of the machine in MB."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def bench_memory(args, work: Path) -> dict[int, Path]:
    """Prepare a run per image count, print the memory table; return the run folders."""
    print(
        f"\npeak RSS (MB) in a fresh subprocess; {IMAGE_SIZE}x{IMAGE_SIZE} PNGs, 3 classes, "
        f"{IMAGES_PER_PATIENT} per patient, split 70/15/15 by patient, shards of "
        f"{args.shard_size}"
    )
    runs, rows = {}, []
    for count in args.counts:
        folders, run = work / f"images-{count}", work / f"run-{count}"
        began = time.perf_counter()
        write_class_folders(folders, count, seed=count)
        written = time.perf_counter() - began
        spec = {"folders": str(folders), "out": str(run), "shard_size": args.shard_size}
        prepared = run_child("prepare", spec, work, args.memory_limit_mb)
        streamed = run_child(
            "stream", {"run": str(run), "batch_size": 32}, work, args.memory_limit_mb
        )
        naive = run_child("naive", {"folders": str(folders)}, work, args.memory_limit_mb)
        rows.append((count, prepared, streamed, naive))
        runs[count] = run
        _print_prepared(count, written, prepared, streamed)
    _print_memory_table(rows)
    return runs


def _print_prepared(count: int, written: float, prepared: dict, streamed: dict) -> None:
    if "error" in prepared or "error" in streamed:
        print(f"  {count:,} images: {prepared.get('error') or streamed.get('error')}")
        return
    shards = ", ".join(f"{s} {prepared['images'][s]} in {n}" for s, n in prepared["shards"].items())
    rate = streamed["streamed"] / streamed["seconds"]
    print(
        f"  {count:,} images: PNGs written in {written:.1f} s, prepare {prepared['seconds']:.1f} s "
        f"({shards} shards), streamed {streamed['streamed']:,} images at {rate:,.0f} img/s"
    )


def _print_memory_table(rows) -> None:
    def cell(result: dict) -> str:
        if "error" in result:
            return f"{'failed':>18}"
        grown = result["peak_mb"] - result["start_mb"]
        return f"{result['peak_mb']:>9,.0f} ({grown:>+6,.0f})"

    print(
        "\n  peak RSS MB (growth over the RSS at the start of the phase)\n"
        f"  {'images':>7}{'prepare':>19}{'streaming':>19}{'naive (1 array)':>19}"
        f"{'naive/stream':>14}{'array MB':>10}{'shard MB':>10}"
    )
    for count, prepared, streamed, naive in rows:
        ratio = (
            f"{naive['peak_mb'] / streamed['peak_mb']:>13.2f}x"
            if "error" not in naive and "error" not in streamed
            else f"{'-':>14}"
        )
        array = f"{naive['array_mb']:>10,.0f}" if "error" not in naive else f"{'-':>10}"
        shard = f"{prepared['shard_mb']:>10,.1f}" if "error" not in prepared else f"{'-':>10}"
        print(f"  {count:>7,}{cell(prepared)}{cell(streamed)}{cell(naive)}{ratio}{array}{shard}")
    print(
        "  streaming and naive children import Keras (TensorFlow) first, so both start from\n"
        "  the same baseline; naive reads the PNGs into a list, then np.stack (uint8).\n"
        "  Streaming holds up to two shards at a switch (plus the current training shard during\n"
        "  validation), so its growth follows the largest shard (last column), not the set."
    )


def print_bare(label: str, result: dict, batch_size: int) -> float:
    """Print the bare ``train_on_batch`` figures of one configuration; return its img/s."""
    step = statistics.median(result["step_s"])
    rate = batch_size / step
    warm = ", ".join(f"{s:.1f}" for s in result["warm_s"])
    print(
        f"  {label}\n    TensorFlow {result['tensorflow']}, GPU visible: {result['gpu']}; "
        f"build {result['build_s']:.1f} s, warm-up step(s) {warm} s (tracing), then median of "
        f"{len(result['step_s'])}: {step:.2f} s/step, {rate:.2f} img/s, "
        f"{1 / rate:.3f} s/img, peak RSS {result['peak_mb'] / 1024:.1f} GB"
    )
    return rate


def bench_small(args, work: Path, run: Path) -> None:
    """Print the EfficientNetB0 bare step and ``training.fit.fit`` on ``run`` against it."""
    backbone, input_size, batch_size = SMALL
    bare = {
        "backbone": backbone,
        "input_size": input_size,
        "batch_size": batch_size,
        "image_size": IMAGE_SIZE,
        "warm": 1,
        "steps": args.b0_steps,
    }
    spec = {"run": str(run), "epochs": args.fit_epochs, "bare": bare}
    result = run_child("fit", spec, work, args.memory_limit_mb)
    label = (
        f"(a) {backbone} @{input_size}, batch {batch_size}, input {IMAGE_SIZE}x{IMAGE_SIZE} "
        "(the prepared shards' size, resized in the model)"
    )
    if "error" in result:
        print(f"  {label}: {result['error']}")
        return
    before = print_bare(label, result["bare"], batch_size)
    after = batch_size / statistics.median(result["bare_after_s"])
    reference = (before + after) / 2
    print(
        f"    same model, same process, after the fit below: {after:.2f} img/s; the fit path\n"
        f"    is compared with the mean, {reference:.2f} img/s (bare)"
    )
    print_fit_path(run, args.fit_epochs, result, reference)


def print_fit_path(run: Path, epochs: int, result: dict, bare: float) -> None:
    """Print ``training.fit.fit``'s training img/s on ``run`` against the bare step."""
    backbone, input_size, batch_size = SMALL
    marks, summary = result["marks"], result["summary"]
    print(
        f"  training.fit.fit, {backbone} @{input_size}, batch {batch_size}, {run.name}: "
        f"{summary['shards']} training shard(s) x {epochs} epochs\n"
        f"    = {len(marks)} Keras epochs of {result['images_per_epoch']} images, "
        f"{summary['devices']['policy']}, peak RSS {result['peak_mb'] / 1024:.1f} GB"
    )
    if not marks:
        print("    no state.json seen after a shard")
        return
    per_epoch, rows = result["images_per_epoch"], []
    if len(marks) >= 2:
        first, last = marks[0], marks[-1]
        steady = f"steady, Keras epochs 2-{len(marks)}"
        images = (last["epoch"] - first["epoch"]) * per_epoch
        clock, wall = last["seconds"] - first["seconds"], last["at"] - first["at"]
        rows.append((f"{steady}, fit's clock (train + val)", images / clock))
        rows.append((f"{steady}, wall (train + val + checkpoint)", images / wall))
    wall = result["wall_s"]
    rows.append(
        (f"whole call, {wall:.0f} s (build, tracing, all)", marks[-1]["epoch"] * per_epoch / wall)
    )
    # fit.json counts steps x batch size per shard, and times from the first shard on.
    rows.append(("fit.json images_per_second (steps x batch)", summary["images_per_second"]))
    for label, rate in rows:
        print(f"    {label:<58}{rate:7.2f} img/s  {rate / bare:5.2f}x bare")


def bench_seed_paper(args, work: Path) -> None:
    """Print the bare EfficientNetB7 step at 512 px (a few steps of a small batch)."""
    backbone, input_size, paper_batch = SEED_PAPER
    spec = {
        "backbone": backbone,
        "input_size": input_size,
        "batch_size": args.b7_batch,
        "image_size": input_size,
        "warm": 1,
        "steps": args.b7_steps,
    }
    label = (
        f"(b) {backbone} @{input_size}, batch {args.b7_batch} (the seed paper's is {paper_batch}; "
        f"8 needs over 22 GB on a CPU), {args.b7_steps} timed step(s) only"
    )
    result = run_child("steps", spec, work, args.memory_limit_mb)
    if "error" in result:
        print(f"  {label}: {result['error']}")
    else:
        print_bare(label, result, args.b7_batch)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, few steps (smoke run)")
    parser.add_argument("--skip-b7", action="store_true", help="no EfficientNetB7 steps")
    parser.add_argument(
        "--skip-cache",
        action="store_true",
        help="no frozen-stage cache section (bench.feature_cache)",
    )
    parser.add_argument("--work", type=Path, help="an empty folder to work in (kept afterwards)")
    parser.add_argument(
        "--counts",
        type=lambda text: [int(v) for v in text.split(",")],
        help="image counts for the memory table, comma separated (default 1000,10000)",
    )
    parser.add_argument("--shard-size", type=int, default=500, help="images per shard")
    parser.add_argument("--b0-steps", type=int, help="timed EfficientNetB0 steps (default 10)")
    parser.add_argument(
        "--fit-epochs", type=int, default=2, help="passes over the shards in the fit path"
    )
    parser.add_argument(
        "--b7-batch",
        type=int,
        help="EfficientNetB7 batch (default 2; quick 1): on a CPU batch 1 peaks near 6.6 GB, "
        "batch 2 near 9 GB, batch 8 above 22 GB",
    )
    parser.add_argument("--b7-steps", type=int, help="timed EfficientNetB7 steps (default 3)")
    parser.add_argument(
        "--memory-limit-mb",
        type=float,
        help="kill a measuring subprocess above this RSS (default: MemAvailable - 2 GB)",
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return parser


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on ``--quick``."""
    quick = args.quick
    args.counts = args.counts or ([200, 2000] if quick else [1000, 10000])
    args.b0_steps = args.b0_steps or (3 if quick else 10)
    args.b7_batch = args.b7_batch or (1 if quick else 2)
    args.b7_steps = args.b7_steps or (1 if quick else 3)
    args.memory_limit_mb = args.memory_limit_mb or available_mb() - 2048
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    args = _parser().parse_args(argv)
    if args.child:
        return child_main(args.child[0], Path(args.child[1]))
    args = _defaults(args)
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        print(f"--work {args.work}: not empty (the benchmark needs an empty folder)")
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="ainode-bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{os.cpu_count()} CPUs, {available_mb() / 1024:.1f} GB available, subprocesses killed "
        f"above {args.memory_limit_mb / 1024:.1f} GB RSS"
    )
    began = time.perf_counter()
    try:
        runs = bench_memory(args, work)
        print(
            f"\ntraining speed, model.train_on_batch on random uint8 batches, {os.cpu_count()} CPUs"
        )
        bench_small(args, work, runs[min(runs)])
        if not args.skip_b7:
            bench_seed_paper(args, work)
        if not args.skip_cache:
            from bench import feature_cache

            cache_args = feature_cache.parser().parse_args(["--quick"] if args.quick else [])
            cache_args.skip_b7, cache_args.memory_limit_mb = args.skip_b7, args.memory_limit_mb
            (work / "cache").mkdir()
            feature_cache.bench_cache(cache_args, work / "cache")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
