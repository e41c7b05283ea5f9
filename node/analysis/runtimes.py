"""Which runtime serves a bundle on this host: the fastest that passes the agreement gate.

The candidates on a CPU are ONNX Runtime FP32 (``onnx``) and INT8 (``onnx-int8``,
:mod:`node.analysis.quantize`) and, where the ``openvino`` package is installed, OpenVINO
FP32 (``openvino``, the same ONNX export on OpenVINO's CPU plugin) and, on a CPU with BF16
arithmetic (AVX-512 BF16, AMX), OpenVINO BF16 (``openvino-bf16``); Keras FP32 is the
reference they are gated against
(:mod:`node.analysis.gate`) and what serves when none passes. Each passing candidate is timed
at every batch size of :data:`node.analysis.gate.BATCH_SIZES` and the fastest candidate at
its fastest batch size is served.

Gating and timing are done once and kept beside the bundle in ``runtimes.json``: the gate per
bundle (SHA-256 of ``model.keras`` and of the gate data) and host (CPU model, ONNX Runtime
and OpenVINO versions), the timings per bundle, host, CPUs and threads. Another
``model.keras`` or other gate data discards the file's figures; a read-only bundle keeps
them in this process's memory (logged). :meth:`node.analysis.bundle.ModelBundle.load`
calls :func:`choose_runtime`; ``ainode models activate`` does it with a progress bar, so the
first study does not wait.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node import atomic
from node.analysis import gate, quantize
from node.analysis.threads import available_cpus, cpuinfo

log = logging.getLogger(__name__)

CACHE_FILE = "runtimes.json"
CANDIDATES = ("onnx", "onnx-int8", "openvino", "openvino-bf16")
OPENVINO = {"openvino": "f32", "openvino-bf16": "bf16"}  # runtime: inference precision
_OPENVINO_SHAPES = 4  # compiled batch shapes kept per OpenVINO model (a series uses one or two)
_FORMAT = 1
_MEMORY: dict[tuple[str, str, str], dict] = {}  # figures of bundles that cannot be written


class OnnxRunner:
    """An ONNX Runtime session over an ONNX model: ``threads`` intra-op threads, one
    inter-op thread (the graph runs in order), CUDA first where this onnxruntime has it."""

    def __init__(self, model_bytes: bytes, runtime: str = "onnx", threads: int = 1) -> None:
        import onnxruntime as ort

        from node.analysis.bundle import BundleError

        self.runtime = runtime
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        self._input = self.session.get_inputs()[0].name
        self._outputs = [output.name for output in self.session.get_outputs()]
        if len(self._outputs) != 2:
            raise BundleError(f"the ONNX model gives {len(self._outputs)} outputs, not 2")

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, features = self.session.run(self._outputs, {self._input: batch})
        return probabilities, features


class OpenVinoRunner:
    """OpenVINO's CPU plugin on the FP32 ONNX export: ``threads`` inference threads, one
    stream, the arithmetic of ``runtime`` (:data:`OPENVINO`: float32 always for ``openvino``;
    on a CPU with BF16 the plugin would otherwise pick BF16 itself). Each batch shape is
    compiled once (static shapes are the plugin's fast path; the last few are kept)."""

    def __init__(self, model_bytes: bytes, threads: int = 1, runtime: str = "openvino") -> None:
        import openvino as ov

        from node.analysis.bundle import BundleError

        self.runtime = runtime
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(model_bytes)
        except RuntimeError as exc:
            raise BundleError(f"OpenVINO cannot read the ONNX export ({exc})") from exc
        if len(self._model.outputs) != 2:
            raise BundleError(f"the ONNX model gives {len(self._model.outputs)} outputs, not 2")
        self._config = {
            "INFERENCE_PRECISION_HINT": OPENVINO[runtime],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads,
        }
        self._compiled: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self._lock = threading.Lock()  # one infer request per compiled model

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = tuple(batch.shape)
        with self._lock:
            compiled = self._compiled.get(shape)
            if compiled is None:
                model = self._model.clone()
                model.reshape({model.inputs[0]: list(shape)})
                compiled = self._core.compile_model(model, "CPU", self._config)
                self._compiled[shape] = compiled
                if len(self._compiled) > _OPENVINO_SHAPES:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(shape)
            outputs = compiled([np.ascontiguousarray(batch)])
            return np.array(outputs[0]), np.array(outputs[1])


def openvino_version() -> str | None:
    """The installed OpenVINO's version, None where the package is missing."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def bf16_arithmetic() -> bool:
    """Whether OpenVINO's CPU plugin can compute in BF16 on this CPU."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _unavailable(candidate: str) -> str | None:
    """Why ``candidate`` cannot run on this host, None when it can."""
    if candidate in OPENVINO and not openvino_version():
        return f"the {candidate} runtime needs the openvino package"
    if candidate == "openvino-bf16" and not bf16_arithmetic():
        return "the openvino-bf16 runtime needs a CPU with BF16 arithmetic"
    return None


@dataclass
class Choice:
    """The runtime chosen: on ``keras`` the reference runner when the gate made one, else
    None (``batch_size`` None: the caller's). ``results``: per candidate, its gate figures
    and timing."""

    runtime: str
    runner: OnnxRunner | gate.Runner | None
    batch_size: int | None
    results: dict[str, dict] = field(default_factory=dict)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def host_keys(threads: int) -> tuple[str, str]:
    """The keys the gate (CPU model, onnxruntime, the INT8 recipe, openvino) and the timings
    (also CPUs, threads) are kept under in ``runtimes.json``."""
    import onnxruntime

    gate_key = f"{cpu_model()} | onnxruntime {onnxruntime.__version__} | {quantize.recipe()}"
    if openvino := openvino_version():
        gate_key += f" | openvino {openvino}"
    return gate_key, f"{gate_key} | {available_cpus()} cpus | {threads} threads"


def read_cache(folder: Path, model_sha256: str, gate_sha256: str) -> dict:
    """``runtimes.json`` of this model and gate data (else the figures kept in memory for a
    read-only folder, else empty)."""
    empty = {"format": _FORMAT, "model_sha256": model_sha256, "gate_sha256": gate_sha256}
    key = (str(Path(folder).resolve()), model_sha256, gate_sha256)
    try:
        stored = json.loads((Path(folder) / CACHE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        stored = None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s), gating again", Path(folder) / CACHE_FILE, exc)
        stored = None
    if isinstance(stored, dict) and all(stored.get(k) == v for k, v in empty.items()):
        return {"gates": {}, "timings": {}, **stored}
    return json.loads(json.dumps(_MEMORY.get(key) or {**empty, "gates": {}, "timings": {}}))


def write_cache(folder: Path, cache: dict) -> None:
    """Keep ``cache`` in ``runtimes.json`` (in memory, logged, where it cannot be written)."""
    path = Path(folder) / CACHE_FILE
    text = json.dumps(cache, indent=2, sort_keys=True) + "\n"
    try:
        atomic.write_bytes(path, text.encode("utf-8"), mode=0o644)
    except OSError as exc:
        key = (str(Path(folder).resolve()), cache["model_sha256"], cache["gate_sha256"])
        _MEMORY[key] = json.loads(text)
        log.warning("%s: cannot be written (%s); the gate's figures are kept in memory", path, exc)


def choose_runtime(
    folder: Path,
    info,
    data,
    requested: str,
    *,
    model_sha256: str,
    threads: int,
    float_model: Callable[[], bytes],
    keras_runner: Callable[[], gate.Runner],
    statistics=None,
    progress: bool = False,
) -> Choice:
    """Gate (once) and time (once) each candidate of ``requested`` and choose.

    Parameters
    ----------
    folder, info, data
        The bundle folder, its :class:`~node.analysis.bundle.ModelInfo` and
        :class:`~node.analysis.gate_data.GateData`.
    requested
        ``auto`` (every candidate; Keras when none passes) or one of :data:`CANDIDATES` (a
        :class:`~node.analysis.bundle.BundleError` with the figures when it fails the gate).
    model_sha256
        SHA-256 of ``model.keras``.
    threads
        Intra-op threads of the sessions.
    float_model, keras_runner
        The FP32 ONNX model (exported or cached) and the Keras reference, made when needed.
    statistics
        The bundle's out-of-distribution statistics (the study answers include its flag).
    progress
        Show a progress bar on stderr.
    """
    from tqdm import tqdm

    from node.analysis.bundle import BundleError

    if requested == "auto":
        candidates = tuple(c for c in CANDIDATES if _unavailable(c) is None)
    elif why := _unavailable(requested):
        raise BundleError(f"{folder}: {why}")
    else:
        candidates = (requested,)
    cache = read_cache(folder, model_sha256, data.sha256)
    gate_key, timing_key = host_keys(threads)
    gates = cache["gates"].setdefault(gate_key, {})
    timings = cache["timings"].setdefault(timing_key, {"threads": threads})
    to_gate = [c for c in candidates if c not in gates]
    to_time = [c for c in candidates if c not in timings and gates.get(c, {}).get("passed", 1)]
    steps = (1 + len(to_gate) if to_gate else 0) + len(to_time)
    unconverted: dict[str, dict] = {}
    runners: dict[str, OnnxRunner] = {}
    made: dict[str, object] = {}  # the FP32 model and the Keras reference, made once

    def once(name: str, make: Callable[[], object]):
        if name not in made:
            made[name] = make()
        return made[name]

    def runner(candidate: str) -> OnnxRunner:
        if candidate in runners:
            return runners[candidate]
        model = once("onnx", float_model)
        if candidate in OPENVINO:
            runners[candidate] = OpenVinoRunner(model, threads, candidate)
            return runners[candidate]
        if candidate != "onnx-int8":
            runners[candidate] = OnnxRunner(model, candidate, threads)
            return runners[candidate]
        model = quantize.int8_model(folder, model, data.calibration, model_sha256, data.sha256)
        try:
            runners[candidate] = OnnxRunner(model, candidate, threads)
        except Exception as exc:  # onnxruntime's own kinds: a model it cannot run is a failure
            raise quantize.QuantizationError(f"ONNX Runtime cannot load it ({exc})") from exc
        return runners[candidate]

    with tqdm(total=steps, disable=not progress or not steps, file=sys.stderr, unit="step") as bar:
        reference = None
        for candidate in to_gate:
            if reference is None:
                bar.set_description("Keras FP32 reference answers")
                reference = gate.answers(once("keras", keras_runner), data)
                bar.update()
            bar.set_description(f"{candidate}: conversion and agreement gate")
            found = _gate(runner, candidate, reference, data, info, statistics)
            # a conversion that failed (memory, a quantiser error) says nothing of the
            # runtime's answers: it is not cached, and the next load tries again
            (unconverted if "conversion_failed" in found else gates)[candidate] = found
            bar.update()
        for candidate in to_time:
            if gates.get(candidate, {}).get("passed"):
                bar.set_description(f"{candidate}: timing batch sizes")
                slices = gate.timing_slices(data.holdout)
                timings[candidate] = gate.fastest_batch(runner(candidate), slices)
            bar.update()
    if to_gate or to_time:
        write_cache(folder, cache)
    results = {c: {**gates.get(c, unconverted.get(c)), **timings.get(c, {})} for c in candidates}
    return _choose(folder, requested, results, runner, threads, made.get("keras"))


def _gate(runner, candidate, reference, data, info, statistics) -> dict:
    try:
        served = runner(candidate)
    except quantize.QuantizationError as exc:
        return {"passed": False, "reason": f"conversion failed: {exc}", "conversion_failed": True}
    found = gate.compare(reference, gate.answers(served, data), data, info, statistics)
    found["checked_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return found


def _choose(folder, requested, results, runner, threads, keras) -> Choice:
    from node.analysis.bundle import BundleError

    for candidate, result in results.items():
        if result.get("conversion_failed"):
            log.warning(
                "%s not used: %s (tried again at the next load)", candidate, result["reason"]
            )
        elif not result["passed"]:
            figures = gate.describe(result)
            log.warning(
                "%s fails the agreement gate, not used: %s%s",
                candidate,
                result["reason"],
                f" ({figures})" if figures else "",
            )
    passing = [c for c, result in results.items() if result["passed"]]
    if not passing:
        if requested != "auto":
            result = results[requested]
            figures = gate.describe(result)
            raise BundleError(
                f"{folder}: {requested} fails the agreement gate against Keras FP32: "
                f"{result['reason']}" + (f" ({figures})" if figures else "")
            )
        log.warning("%s: no ONNX Runtime candidate passes the agreement gate: Keras serves", folder)
        return Choice("keras", keras, None, results)
    best = min(passing, key=lambda c: results[c]["seconds_per_slice"])
    log.info(
        "%s: serving %s, %.4f s/slice at batch %d on %d threads (%s)",
        folder,
        best,
        results[best]["seconds_per_slice"],
        results[best]["batch_size"],
        threads,
        ", ".join(f"{c} {results[c].get('seconds_per_slice', 0):.4f} s/slice" for c in passing),
    )
    return Choice(best, runner(best), results[best]["batch_size"], results)
