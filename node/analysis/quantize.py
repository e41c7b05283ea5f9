"""ONNX Runtime INT8: the float ONNX export quantised statically, cached beside the bundle.

Static quantisation in the QDQ format (what ONNX Runtime's CPU kernels fuse into integer
convolutions: VNNI on x86 where the CPU has it), signed weights per output channel,
unsigned 8-bit activations whose ranges are measured (min/max: two numbers per tensor however
many slices) on the bundle's calibration slices (:mod:`node.analysis.gate_data`). The input
path (resize, grey to RGB, rescaling), the first convolution, the global pooling (the
penultimate features) and the classification head stay in float: they cost little, and an
error there reaches every later layer, or the answer itself. Whether the result may serve is
the agreement gate's call (:mod:`node.analysis.gate`), never this module's.

Weights are 8-bit on a CPU with 8-bit dot-product instructions (VNNI: AVX512-VNNI, AVX-VNNI,
AMX) and 7-bit elsewhere (ONNX Runtime's ``reduce_range``). Without VNNI, ONNX Runtime's x86
kernels add pairs of uint8 x int8 products into 16-bit sums, which saturate for large
activations times large weights; 7-bit weights cannot. Measured on an AVX2-only CPU: the
test suite's threshold model with 8-bit weights agreed with Keras on 81 % of the hold-out
slices (refused by the gate), with 7-bit weights on 100 % (max probability difference
0.0005; served, 3.4x faster than ONNX Runtime FP32).

The model is cached as ``model.int8.onnx`` with the SHA-256 of the ``model.keras`` and of the
gate data it was made from; either changing makes a new one.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from node import atomic
from node.analysis.bundle_format import INT8_FILE
from node.analysis.threads import cpuinfo, parse_cpuinfo

log = logging.getLogger(__name__)

# a new recipe makes cached models stale; {weights}: s8 with VNNI, s7 without (see above)
RECIPE = "qdq-u8{weights}-per-channel-minmax/1"
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo's names
_KEYS = ("ainode.source_sha256", "ainode.gate_sha256", "ainode.quantization")
# One slice per calibration run: ONNX Runtime's calibrator holds the activations of a whole
# batch at once, and for EfficientNetB7 @512 that is ~1.3 GB a slice on top of ~5.5 GB
# (quantising it peaked at 6.8 GB with 1 slice per run, 9.4 GB with 3, >24 GB with 8);
# the ranges (min/max over all slices) do not depend on it.
_CALIBRATION_BATCH = 1
_MEMORY: dict[tuple[str, str, str, str], bytes] = {}  # models of bundles that cannot be written


class QuantizationError(RuntimeError):
    """The float model could not be quantised (the message says why)."""


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """The instruction-set flags of this CPU, or of the ``/proc/cpuinfo`` ``text`` given;
    empty where they cannot be read (not Linux)."""
    entries = cpuinfo() if text is None else parse_cpuinfo(text)
    return frozenset(entries.get("flags", "").split())


def int8_dot_products() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (VNNI or AMX), which let ONNX
    Runtime use 8-bit weights without saturating (else they are quantised to 7 bits)."""
    return bool(cpu_flags() & VNNI_FLAGS)


def recipe(vnni: bool | None = None) -> str:
    """The quantisation recipe (kept in the INT8 model and in the gate's key) on a CPU with
    or without VNNI; on this host's CPU when ``vnni`` is not given."""
    vnni = int8_dot_products() if vnni is None else vnni
    return RECIPE.format(weights="s8" if vnni else "s7")


def cached_int8(folder: Path, source_sha256: str, gate_sha256: str) -> bytes | None:
    """The cached INT8 model when it was made from this model and gate data, else None."""
    import onnx

    cached = Path(folder) / INT8_FILE
    kept = _MEMORY.get((str(Path(folder).resolve()), source_sha256, gate_sha256, recipe()))
    if kept is not None:
        return kept
    if not cached.is_file():
        return None
    try:
        proto = onnx.load_model(cached)
    except Exception as exc:  # a damaged cache is made again, never served
        log.warning("%s: unreadable (%s), quantising again", cached, exc)
        return None
    metadata = {p.key: p.value for p in proto.metadata_props}
    wanted = dict(zip(_KEYS, (source_sha256, gate_sha256, recipe()), strict=True))
    if any(metadata.get(key) != value for key, value in wanted.items()):
        return None
    return proto.SerializeToString()


def int8_model(
    folder: Path,
    float_model: bytes,
    calibration: np.ndarray,
    source_sha256: str,
    gate_sha256: str,
) -> bytes:
    """The INT8 model of ``float_model``: the cached one when it is of this model and gate
    data, else quantised now with ``calibration`` (uint8 ``(N, H, W)`` slices) and cached (in
    memory only, logged, when the bundle folder is read-only)."""
    cached = cached_int8(folder, source_sha256, gate_sha256)
    if cached is not None:
        return cached
    import onnx

    vnni = int8_dot_products()
    current, reduced = recipe(vnni), not vnni
    log.info(
        "%s: quantising to INT8 on %d calibration slices (%d-bit weights%s)",
        folder,
        len(calibration),
        7 if reduced else 8,
        ": this CPU has no VNNI" if reduced else "",
    )
    proto = quantize(float_model, calibration, reduce_range=reduced)
    # the float export's own metadata (which model.keras) is replaced by this model's
    kept = [p for p in proto.metadata_props if not p.key.startswith("ainode.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in zip(_KEYS, (source_sha256, gate_sha256, current), strict=True):
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise QuantizationError(f"the INT8 model is not valid ONNX ({exc})") from exc
    data = proto.SerializeToString()
    target = Path(folder) / INT8_FILE
    try:
        atomic.write_bytes(target, data, mode=0o644)
    except OSError as exc:
        log.warning("%s: cannot cache the INT8 model (%s); kept in memory", target, exc)
        _MEMORY[(str(Path(folder).resolve()), source_sha256, gate_sha256, current)] = data
    return data


def quantize(float_model: bytes, calibration: np.ndarray, reduce_range: bool = False):
    """Quantise ``float_model`` (ONNX bytes, input ``(N, H, W, 1)`` uint8) with
    ``calibration``, weights in 7 bits with ``reduce_range``; the ``onnx.ModelProto``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Slices(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.batches = iter(
                {name: np.ascontiguousarray(calibration[i : i + _CALIBRATION_BATCH, ..., None])}
                for i in range(0, len(calibration), _CALIBRATION_BATCH)
            )

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="ainode-int8-") as work, _quiet_quantiser():
        source, prepared, quantised = (Path(work) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        source.write_bytes(float_model)
        try:
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            model = onnx.load_model(prepared)
            quantize_static(
                prepared,
                quantised,
                Slices(model.graph.input[0].name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=reduce_range,
                nodes_to_exclude=float_nodes(model),
            )
            return onnx.load_model(quantised)
        except Exception as exc:  # the quantiser fails in many ways on a graph it cannot handle
            raise QuantizationError(f"INT8 quantisation failed ({exc})") from exc


def float_nodes(model) -> list[str]:
    """The nodes kept in float: up to and including the first convolution, and from the last
    global pooling on (the penultimate features and the classification head)."""
    nodes = list(model.graph.node)
    convolutions = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    pools = [
        i for i, node in enumerate(nodes) if node.op_type in ("GlobalAveragePool", "ReduceMean")
    ]
    if not convolutions:
        raise QuantizationError("the model has no convolution to quantise")
    head = pools[-1] if pools and pools[-1] > convolutions[-1] else len(nodes)
    return [n.name for n in nodes[: convolutions[0] + 1]] + [n.name for n in nodes[head:]]


@contextlib.contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """Keep the quantiser's INFO lines (one per rescaled weight channel, logged on the root
    logger) out of the node's log while it runs; its warnings still show."""
    import onnxruntime.quantization

    where = str(Path(onnxruntime.quantization.__file__).parent)

    def chatter(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(where)

    logging.root.addFilter(chatter)
    try:
        yield
    finally:
        logging.root.removeFilter(chatter)
