"""Seconds per slice of EfficientNetB7 @512 (the seed's model) on every runtime, side by side.

``python -m bench.inference`` times, in one run on this host's cores, the B7 bench bundle
(:mod:`bench.b7_bundle`: a random frozen B7 backbone with a head trained on phantoms, built
once in ``--work`` and reused) on windowed 512 x 512 phantom lung slices:

- Keras per image: one ``model.predict`` per slice, as the seed paper's app does;
- Keras batched, ONNX Runtime FP32 and INT8, OpenVINO FP32 and BF16: the node's own runtimes
  (``ModelBundle.load(runtime=...)``; INT8 is its static QDQ quantisation, calibrated on the
  bundle's gate slices), with the node's agreement gate as it recorded it (one that fails the
  gate is timed all the same on the node's cached model and marked FAIL: never served);
- OpenVINO INT8 (the node's INT8 QDQ model read by OpenVINO), which the node does not
  offer, put through the same gate here (:mod:`node.analysis.gate`);
- with ``--gpu``: Keras FP32 (TF32 off) and mixed_float16 on the GPU, ONNX Runtime's CUDA and
  TensorRT (FP32, FP16) execution providers, each gated here; each says why it was skipped
  where it cannot run (``bench/gpu.sh`` installs what they need on a GPU host).

Each runtime is timed at each of ``--batch-sizes`` and reported at its fastest: the median of
``--repeats`` runs over ``--slices`` slices, per slice, and the fastest run (the better
figure on a host other work shares). Printed per runtime: s/slice, the
ratio to the issue's float floor (27 GMAC per slice at ≈ 160 GMAC/s FP32 peak on 2 AVX-512
cores: 0.17 s/slice), GMAC/s achieved, the speed-up over Keras per image, the gate against
Keras FP32 (top-1 agreement and max probability difference on the hold-out slices, study
answers on the test studies) and one worker's 300-slice studies per hour (model time).
Target: INT8 ≤ 0.15 s/slice with the gate passing (the bench bundle's backbone is random, so
its INT8 answers can fail a gate a trained B7's would pass: see :mod:`bench.b7_bundle`). The
former demo-bundle and EfficientNet-Lite0 figures are kept behind ``--also demo,lite0``. B7
alone takes 10-15 min on 2 cores, more on the first run (the bundle, its ONNX export, INT8
model and the node's gate); ``--runtimes`` and ``--batch-sizes`` cut it down.
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
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from node import phantom  # noqa: E402
from node.analysis import gate, imaging  # noqa: E402
from node.analysis.bundle import (  # noqa: E402
    ONNX_FILE,
    RUNTIMES,
    BundleError,
    ModelBundle,
    ModelInfo,
    write_bundle,  # noqa: E402
)
from node.analysis.result import CLASSES  # noqa: E402
from node.settings import DEMO_MODEL_DIR  # noqa: E402

GMAC_PER_SLICE = 27.0  # EfficientNetB7 at 512 x 512 (the figure)
FLOOR_S = 0.17  # s/slice: 27 GMAC at ≈ 160 GMAC/s, FP32 peak of 2 AVX-512 cores (the issue)
TARGET_INT8_S = 0.15
STUDY_SLICES = 300
CPU_RUNTIMES = (
    "keras-per-image", "keras", "onnx", "onnx-int8", "openvino", "openvino-bf16",
    "openvino-int8",
)  # fmt: skip
GPU_RUNTIMES = ("keras-gpu", "keras-mixed", "ort-cuda", "ort-trt", "ort-trt-fp16")
REFERENCES = ("keras-per-image", "keras", "keras-gpu")  # Keras FP32: what the gate compares to


class Unavailable(RuntimeError):
    """A runtime that cannot run here; the message says why."""


@dataclass
class Row:
    """One runtime's figures (``seconds`` None: skipped, ``note`` says why)."""

    runtime: str
    seconds: float | None = None  # median of the repeats, per slice
    batch: int | None = None
    fastest: float | None = None  # fastest of the repeats, per slice
    gate: dict | None = None  # node.analysis.gate.compare's figures
    note: str = ""


def windowed_slices(count: int, seed: int = 77) -> np.ndarray:
    """``count`` lung-bearing 512 x 512 windowed slices of a COVID-19 phantom study,
    ``(count, 512, 512, 1)`` uint8."""
    spec = phantom.PhantomSpec(finding="covid", slices=max(count * 2, 8), seed=seed)
    hu = phantom.generate_hu_volume(spec)
    keep = [i for i, s in enumerate(hu) if imaging.lung_fraction(s) >= 0.05][:count]
    images = [imaging.apply_window(hu[i], imaging.LUNG) for i in keep]
    while len(images) < count:
        images += images[: count - len(images)]
    return np.stack(images)[..., np.newaxis]


def run_batches(runner: gate.Runner, pixels: np.ndarray, batch: int) -> np.ndarray:
    """``runner`` over ``pixels`` ``batch`` slices at a time; the probabilities."""
    return np.concatenate(
        [runner(pixels[start : start + batch])[0] for start in range(0, len(pixels), batch)]
    )


def seconds_per_slice(
    runner: gate.Runner, pixels: np.ndarray, batch: int, repeats: int
) -> tuple[float, float]:
    """Median and fastest of ``repeats`` runs of ``runner`` on ``pixels`` in batches of
    ``batch``, per slice; one batch first, untimed (tracing, compiling, planning memory).
    On a host shared with other work the fastest is the better estimate: others only ever
    slow a run down."""
    runner(pixels[:batch])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_batches(runner, pixels, batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / len(pixels), min(times) / len(pixels)


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


# --- the runtimes: a gate.Runner each ((N, H, W, 1) uint8 -> probabilities, features) --------


def load_bundle(folder: Path, runtime: str, threads: int, **options) -> ModelBundle:
    """The bundle on one of the node's runtimes, exactly as a worker loads it."""
    if runtime not in RUNTIMES:
        raise Unavailable(f"the node has no {runtime!r} runtime (it has {', '.join(RUNTIMES)})")
    try:
        bundle = ModelBundle.load(folder, runtime=runtime, threads=threads, **options)
    except BundleError as exc:
        raise Unavailable(str(exc)) from exc
    if bundle.runtime != runtime:
        raise Unavailable(f"the node served {bundle.runtime!r} instead (see its log)")
    return bundle


def bundle_runner(bundle: ModelBundle) -> gate.Runner:
    return lambda batch: bundle.predict_with_features(batch, batch_size=len(batch))


def keras_per_image(folder: Path) -> gate.Runner:
    """The seed's app: one ``model.predict`` call per slice, whatever the batch."""
    model = ModelBundle.load(folder, runtime="keras").model
    return lambda batch: (
        np.concatenate([model.predict(p[np.newaxis], verbose=0) for p in batch]),
        None,
    )


def gpu_names() -> list[str]:
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def keras_gpu(folder: Path, mixed: bool) -> gate.Runner:
    """Keras on the GPU: FP32 (TF32 off, a true float reference) or mixed_float16."""
    import tensorflow as tf

    if not gpu_names():
        raise Unavailable("no GPU visible to TensorFlow (tensorflow-cpu, or no CUDA driver)")
    tf.config.experimental.enable_tensor_float_32_execution(False)
    return bundle_runner(load_bundle(folder, "keras", 0, mixed_precision=mixed))


def onnx_file(folder: Path, threads: int) -> Path:
    """The bundle's FP32 ONNX export (made and cached by the node on first use)."""
    if not (folder / ONNX_FILE).is_file():
        load_bundle(folder, "onnx", threads)
    return folder / ONNX_FILE


def int8_file(folder: Path, threads: int) -> Path:
    """The node's INT8 QDQ model beside the bundle (made by loading it as onnx-int8)."""
    from node.analysis.quantize import INT8_FILE

    if not (folder / INT8_FILE).is_file():
        try:
            load_bundle(folder, "onnx-int8", threads)
        except Unavailable:  # made, but failing the gate: OpenVINO is gated on its own
            if not (folder / INT8_FILE).is_file():
                raise
    return folder / INT8_FILE


def ort_gpu(folder: Path, provider: str, fp16: bool = False) -> gate.Runner:
    """An ONNX Runtime session on the CUDA or TensorRT execution provider."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* pip packages
        try:
            ort.preload_dlls()
        except OSError as exc:
            print(f"    (onnxruntime.preload_dlls: {exc})")
    available = ort.get_available_providers()
    if provider not in available:
        raise Unavailable(f"{provider} not in onnxruntime's providers {available}")
    options: dict = {}
    if provider == "TensorrtExecutionProvider":
        shapes = {"min": 1, "opt": 32, "max": 64}
        options = {
            "trt_fp16_enable": fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(folder / "trt-cache"),
            **{f"trt_profile_{k}_shapes": f"slices:{n}x512x512x1" for k, n in shapes.items()},
        }
    chain = [(provider, options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_file(folder, 0)), providers=chain)
    if session.get_providers()[0] != provider:
        raise Unavailable(f"{provider} did not start (ORT fell back to {session.get_providers()})")
    name = session.get_inputs()[0].name
    return lambda batch: tuple(session.run(None, {name: batch}))


def gated_out(folder: Path, runtime: str, threads: int) -> tuple[gate.Runner, dict]:
    """A node runtime that failed the agreement gate, run anyway to time it (the node never
    serves it): its cached model on the node's own session, and the gate's figures."""
    from node.analysis import runtimes
    from node.analysis.bundle import INFO_FILE, MODEL_FILE
    from node.analysis.gate_data import read_gate_data
    from node.analysis.quantize import INT8_FILE
    from node.analysis.threads import intra_op_threads

    info = ModelInfo.from_json(folder / INFO_FILE)
    data = read_gate_data(folder, info.gate)
    model = folder / (INT8_FILE if runtime == "onnx-int8" else ONNX_FILE)
    if data is None or not model.is_file():
        raise Unavailable(f"no {model.name} or gate data to time {runtime} with")
    threads = intra_op_threads(threads)
    digest = hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()
    cache = runtimes.read_cache(folder, digest, data.sha256)
    figures = cache["gates"].get(runtimes.host_keys(threads)[0], {}).get(runtime)
    if figures is None:
        raise Unavailable(f"the node recorded no gate for {runtime} on this host")
    if runtime in runtimes.OPENVINO:
        return runtimes.OpenVinoRunner(model.read_bytes(), threads, runtime), figures
    return runtimes.OnnxRunner(model.read_bytes(), runtime, threads), figures


def make_runner(runtime: str, folder: Path, threads: int) -> tuple[gate.Runner, dict | None]:
    """``runtime``'s runner on the bundle in ``folder`` and, for the node's own ONNX runtimes,
    the gate figures the node recorded; :class:`Unavailable` says why it cannot run."""
    if runtime == "keras-per-image":
        return keras_per_image(folder), None
    if runtime in ("keras", "onnx", "onnx-int8", "openvino", "openvino-bf16"):
        try:
            bundle = load_bundle(folder, runtime, threads)
        except Unavailable as exc:
            if "fails the agreement gate" not in str(exc):
                raise
            print(f"    {runtime:<16} fails the node's gate: timed anyway, never served")
            return gated_out(folder, runtime, threads)
        return bundle_runner(bundle), bundle.gate.get(runtime)
    if runtime == "openvino-int8":
        from node.analysis.runtimes import OpenVinoRunner
        from node.analysis.threads import intra_op_threads

        model = int8_file(folder, threads).read_bytes()  # its QDQ layers run in INT8
        return OpenVinoRunner(model, intra_op_threads(threads)), None
    if runtime in ("keras-gpu", "keras-mixed"):
        return keras_gpu(folder, mixed=runtime == "keras-mixed"), None
    if runtime == "ort-cuda":
        return ort_gpu(folder, "CUDAExecutionProvider"), None
    if runtime in ("ort-trt", "ort-trt-fp16"):
        return ort_gpu(folder, "TensorrtExecutionProvider", fp16=runtime.endswith("fp16")), None
    raise ValueError(f"unknown runtime {runtime!r}")


# --- measuring ---------------------------------------------------------------------------------


class Gate:
    """The node's agreement gate, run here for runtimes the node does not gate itself."""

    def __init__(self, folder: Path) -> None:
        from node.analysis import ood
        from node.analysis.bundle import INFO_FILE
        from node.analysis.gate_data import read_gate_data

        self.folder = folder
        self.info = ModelInfo.from_json(folder / INFO_FILE)
        self.statistics = ood.read_statistics(folder, self.info.ood)
        self.data = read_gate_data(folder, self.info.gate)
        self._reference = None

    def check(self, runner: gate.Runner, batch: int) -> dict:
        """``gate.compare``'s figures for ``runner`` (empty: the bundle has no gate data)."""
        if self.data is None:
            return {}
        if self._reference is None:
            keras = bundle_runner(ModelBundle.load(self.folder, runtime="keras"))
            self._reference = gate.answers(keras, self.data, batch_size=8)
        found = gate.answers(runner, self.data, batch_size=batch)
        return gate.compare(self._reference, found, self.data, self.info, self.statistics)


def measure(runtime: str, folder: Path, pixels: np.ndarray, checker: Gate, args) -> Row:
    """Load ``runtime``, time it at each batch size (the fastest kept) and gate it."""
    started = time.perf_counter()
    try:
        runner, recorded = make_runner(runtime, folder, args.threads)
    except Unavailable as exc:
        print(f"    {runtime:<16} skipped: {exc}", flush=True)
        return Row(runtime, note=str(exc))
    note = f"load {time.perf_counter() - started:.0f} s"
    sizes = [1] if runtime == "keras-per-image" else args.batch_sizes
    if runtime in GPU_RUNTIMES:
        sizes = args.gpu_batch_sizes
    timed, fastest = {}, {}
    for size in sizes:
        timed[size], fastest[size] = seconds_per_slice(runner, pixels, size, args.repeats)
        print(
            f"    {runtime:<16} batch {size:<3} {timed[size]:8.4f} s/slice (fastest run "
            f"{fastest[size]:.4f})",
            flush=True,
        )
    batch = min(timed, key=timed.get)
    if runtime in REFERENCES:
        figures = None
    elif recorded is not None:
        figures, note = recorded, note + "; gate: the node's (runtimes.json)"
        if "batch_size" in recorded:
            note += f", node's batch {recorded['batch_size']}"
    else:
        figures = checker.check(runner, batch)
    return Row(runtime, timed[batch], batch, fastest[batch], figures, note)


def bench_bundle(label: str, folder: Path, runtimes, args) -> list[Row]:
    """Measure ``runtimes`` on one bundle; the rows."""
    pixels = windowed_slices(args.slices)
    checker = Gate(folder)
    data = checker.data
    gating = (
        "no gate data (agreement not checked)"
        if data is None
        else f"gate: {len(data.holdout)} hold-out slices, "
        f"{len(set(data.test_studies.tolist()))} test studies"
    )
    print(f"\n{label}: {len(pixels)} slices, median of {args.repeats}; {gating}", flush=True)
    return [measure(runtime, folder, pixels, checker, args) for runtime in runtimes]


def gate_text(figures: dict | None) -> str:
    """The gate's columns: verdict, agreement, max |dp|, test studies answered the same."""
    if figures is None:
        return f"{'Keras FP32 (reference)':>29}"
    if not figures:
        return f"{'no gate data':>29}"
    if "agreement" not in figures:
        return f"{'FAIL':>6} {figures.get('reason', '')}"
    studies = f"{figures['studies'] - figures['studies_differing']}/{figures['studies']}"
    verdict = "pass" if figures["passed"] else "FAIL"
    return f"{verdict:>6}{figures['agreement']:8.3f}{figures['max_diff']:9.4f}{studies:>6}"


def print_table(label: str, rows: list[Row], floor: bool) -> None:
    """The side-by-side table of one bundle."""
    base = next((r.seconds for r in rows if r.runtime == "keras-per-image" and r.seconds), None)
    print(f"\n{label}")
    head = f"{'runtime':<16}{'batch':>6}{'s/slice':>9}{'fastest':>8}"
    head += f"{'x floor':>8}{'GMAC/s':>7}" if floor else ""
    head += f"{'speed-up':>9}{'studies/h':>10}{'gate':>6}{'agree':>8}{'max|dp|':>9}{'same':>6}"
    print(head + "  note")
    for r in rows:
        if r.seconds is None:
            note = r.note if len(r.note) <= 120 else r.note[:117] + "..."
            print(f"{r.runtime:<16}{'-':>6}{'-':>9}  skipped: {note}")
            continue
        line = f"{r.runtime:<16}{r.batch:>6}{r.seconds:9.4f}{r.fastest:8.4f}"
        if floor:
            line += f"{r.seconds / FLOOR_S:8.2f}{GMAC_PER_SLICE / r.seconds:7.0f}"
        line += f"{base / r.seconds:8.1f}x" if base else f"{'-':>9}"
        line += f"{3600 / (STUDY_SLICES * r.seconds):10.1f}{gate_text(r.gate)}  {r.note}"
        print(line)


def verdict(rows: list[Row]) -> str:
    """The issue's INT8 target: met or not."""
    int8 = next((r for r in rows if r.runtime == "onnx-int8"), None)
    if int8 is None or int8.seconds is None:
        return f"INT8 target: not measured{f' ({int8.note})' if int8 else ''}"
    passed = bool(int8.gate and int8.gate.get("passed"))
    met = int8.seconds <= TARGET_INT8_S and passed
    return (
        f"INT8 target (<= {TARGET_INT8_S} s/slice, gate passing): {'MET' if met else 'NOT MET'} "
        f"({int8.seconds:.3f} s/slice, gate {'passed' if passed else 'not passed'})"
    )


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ainode-bench-b7",
        help="keeps the B7 bundle (bench.b7_bundle) between runs (default: in the temp folder)",
    )
    parser.add_argument("--bundle", type=Path, help="time this bundle instead of the B7 one")
    parser.add_argument("--slices", type=int, default=16, help="timed slices (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (default 3)")
    parser.add_argument("--batch-sizes", type=_sizes, default=[1, 4, 16], help="CPU: 1,4,16")
    parser.add_argument("--gpu-batch-sizes", type=_sizes, default=[8, 32], help="GPU: 8,32")
    parser.add_argument("--threads", type=int, default=0, help="0: the node's rule (all CPUs)")
    parser.add_argument(
        "--runtimes",
        type=_names,
        help=f"comma separated (default: {','.join(CPU_RUNTIMES)}; --gpu: keras and the GPU's)",
    )
    parser.add_argument("--gpu", action="store_true", help=f"also {', '.join(GPU_RUNTIMES)}")
    parser.add_argument(
        "--also", type=_names, default=[], help="also time the demo bundle, untrained Lite0"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    args = _parser().parse_args(argv)
    runtimes = args.runtimes or (("keras-gpu", *GPU_RUNTIMES[1:]) if args.gpu else CPU_RUNTIMES)
    unknown = set(runtimes) - set(CPU_RUNTIMES) - set(GPU_RUNTIMES)
    if unknown:
        raise SystemExit(f"--runtimes: unknown {', '.join(sorted(unknown))}")
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, GPUs: {gpu_names() or 'none'}")
    if args.gpu:  # the Keras FP32 reference must be float32 arithmetic, not TF32
        tf.config.experimental.enable_tensor_float_32_execution(False)
    began = time.perf_counter()
    if args.bundle is None:
        from bench.b7_bundle import build

        args.bundle = build(args.work)
    info = ModelBundle.load(args.bundle).info
    label = f"{info.backbone} @{info.input_size}, {info.name} {info.version}"
    rows = bench_bundle(label, args.bundle, runtimes, args)
    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as temp:
        for name, folder in _other_bundles(args.also, Path(temp)):
            cpu = [r for r in runtimes if r not in GPU_RUNTIMES]
            print_table(name, bench_bundle(name, folder, cpu, args), floor=False)
    print_table(label, rows, floor=info.backbone == "EfficientNetB7" and info.input_size == 512)
    print(
        f"\nfloor: {GMAC_PER_SLICE:g} GMAC/slice at ~160 GMAC/s (FP32 peak, 2 AVX-512 cores) = "
        f"{FLOOR_S} s/slice. speed-up: over keras-per-image. studies/h: one worker, "
        f"{STUDY_SLICES}-slice studies, model time only. gate: top-1 agreement and max "
        f"probability difference on the hold-out slices, test studies answered the same"
    )
    auto = ModelBundle.load(args.bundle, runtime="auto", threads=args.threads)
    print(f"the node's model_runtime = auto serves {auto.runtime} here, batch {auto.batch_size}")
    print(verdict(rows))
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


def _other_bundles(names: list[str], temp: Path):
    """(label, folder) of the smaller models ``--also`` asks for (the former figures)."""
    if "demo" in names:
        demo = temp / "demo"  # a copy, so the ONNX export is not cached in the repo
        shutil.copytree(DEMO_MODEL_DIR, demo)
        yield "demo bundle", demo
    if "lite0" in names:
        for size in (224, 512):
            folder = untrained_bundle(temp / f"lite0-{size}", "EfficientNetLite0", size)
            yield f"EfficientNetLite0 @{size}, ImageNet base, untrained head", folder


if __name__ == "__main__":
    sys.exit(main())
