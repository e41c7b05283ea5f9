"""Model bundles (training → node): ``model.json`` checked first, then the model, then inference.

A bundle is a folder with ``model.keras`` and ``model.json``. The node refuses a bundle whose
preprocessing, classes or input size it does not know before it loads any weights. TensorFlow,
tf2onnx and onnxruntime are imported only when a bundle is loaded, so the rest of the node
(web UI, DIMSE services) runs without them.

Beside them the node caches what it derives on this host (never shipped, made again when
``model.keras`` changes): ``model.onnx`` (the ONNX export), ``model.int8.onnx`` (its INT8
quantisation, :mod:`node.analysis.quantize`) and ``runtimes.json`` (the agreement gate's
figures and the timings, :mod:`node.analysis.runtimes`).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from node import atomic
from node.analysis import gate_data, ood
from node.analysis.result import CLASSES, ModelIdentity

if TYPE_CHECKING:
    from node.analysis.runtimes import OnnxRunner

log = logging.getLogger(__name__)

# Must equal node.analysis.imaging.PREPROCESSING_VERSION (a test checks); a new version of the pixel
# pipeline means old bundles are refused rather than fed pixels they were not trained on.
PREPROCESSING_VERSIONS = frozenset({"hu-window-uint8/1"})
RUNTIMES = ("auto", "keras", "onnx", "onnx-int8", "openvino", "openvino-bf16")
INPUT_SIZE_RANGE = (32, 1024)
MODEL_FILE, INFO_FILE, ONNX_FILE = "model.keras", "model.json", "model.onnx"
# what the node derives from a bundle on its host: never carried into a rewritten bundle
CACHE_FILES = (ONNX_FILE, "model.int8.onnx", "runtimes.json")
# model.json's format: 1 (no field) = class, probabilities, model identity; 2 adds what makes
# an answer checkable — calibration, operating point, out-of-distribution statistics. A bundle
# of format 1 is still served: uncalibrated, the most probable class, no OOD warning.
BUNDLE_FORMAT = 2
_ONNX_SOURCE_KEY = "ainode.source_sha256"  # metadata: which model.keras the ONNX file came from
# metadata: what the export gives; "2" = [probabilities, penultimate features]. A model.onnx
# cached by an older export (probabilities only) lacks it and is exported again.
_ONNX_EXPORT_KEY, _ONNX_EXPORT = "ainode.export", "2"
_KERAS_LOCK = threading.Lock()  # one on-demand Keras model per bundle, however many threads ask


class BundleError(ValueError):
    """A model bundle that cannot be served; the message names the file and the field."""


def _node_classes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or tuple(value) != CLASSES:
        raise ValueError("not the node's classes")
    return CLASSES


def _known_preprocessing(value: str) -> str:
    if value not in PREPROCESSING_VERSIONS:
        raise ValueError("unknown preprocessing")
    return value


def _aware_time(value: str) -> str:
    if datetime.datetime.fromisoformat(value).tzinfo is None:  # ValueError when not ISO 8601
        raise ValueError("no UTC offset")
    return value


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    """A private, JSON-clean copy (no NaN, no objects JSON cannot hold)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except TypeError as exc:  # pydantic reports ValueError only
        raise ValueError(str(exc)) from exc


def _has_versions(value: dict[str, Any]) -> dict[str, Any]:
    for key in ("tensorflow", "keras"):
        if not isinstance(value.get(key), str) or not value[key].strip():
            raise ValueError(f"no {key} version")
    return value


# Each field's description is the rule it follows: an error reads "<field> must be <rule>".
_Text = Annotated[str, StringConstraints(pattern=r"\S"), Field(description="a non-empty string")]
_JsonObject = Annotated[
    dict[str, Any],
    AfterValidator(_json_copy),
    Field(description="a JSON object (string keys; numbers, strings, lists, objects)"),
]


class ModelInfo(BaseModel):
    """What ``model.json`` says about a model; every field is validated on construction.

    Construction raises :class:`BundleError` naming each bad field, its rule and the value
    given. The instance is frozen: :meth:`replace` makes a changed, validated copy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: _Text
    version: _Text
    classes: Annotated[tuple[str, ...], BeforeValidator(_node_classes)] = Field(
        description=f"{list(CLASSES)} in this output order"
    )
    input_size: int = Field(
        ge=INPUT_SIZE_RANGE[0],
        le=INPUT_SIZE_RANGE[1],
        description="an integer in {}..{}".format(*INPUT_SIZE_RANGE),
    )
    window_center: float = Field(description="a finite number")
    window_width: float = Field(gt=0, description="greater than 0 HU and finite")
    preprocessing_version: Annotated[str, AfterValidator(_known_preprocessing)] = Field(
        description=f"a version this node knows ({', '.join(sorted(PREPROCESSING_VERSIONS))})"
    )
    backbone: _Text
    dataset_manifest_hash: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="64 lowercase hex digits (SHA-256)"
    )
    metrics: _JsonObject
    framework: Annotated[
        dict[str, Any], AfterValidator(_json_copy), AfterValidator(_has_versions)
    ] = Field(description="a JSON object with non-empty 'tensorflow' and 'keras' strings")
    created_at: Annotated[str, AfterValidator(_aware_time)] = Field(
        description="an ISO 8601 time with a UTC offset"
    )
    demo: bool = Field(default=False, description="true or false")
    description: str = Field(default="", description="a string")
    weights: _JsonObject = Field(default_factory=dict)  # origin and SHA-256 of the start
    format_version: int = Field(
        default=1, ge=1, le=BUNDLE_FORMAT, description=f"an integer in 1..{BUNDLE_FORMAT}"
    )
    # format 2 (each validated by the module that applies it; empty: not fitted)
    calibration: _JsonObject = Field(default_factory=dict)  # node.analysis.calibration
    operating_point: _JsonObject = Field(default_factory=dict)  # node.analysis.calibration
    ood: _JsonObject = Field(default_factory=dict)  # node.analysis.ood
    # optional in format 2: the slices faster runtimes are gated on (node.analysis.gate_data);
    # empty: served by Keras or ONNX Runtime FP32 as before, never INT8
    gate: _JsonObject = Field(default_factory=dict)

    def __init__(self, /, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise BundleError(_explain(exc, fields)) from exc

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelInfo:
        """Read and validate ``model.json``; errors name the file and the field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BundleError(f"{path}: no {INFO_FILE} (is this a model bundle?)") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: not readable JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{path}: must hold a JSON object")
        try:
            return cls(**data)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from exc

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``model.json`` atomically (temp file, fsync, rename)."""
        text = json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
        atomic.write_bytes(path, text.encode("utf-8"), mode=0o644)

    def replace(self, **changes: Any) -> ModelInfo:
        """A copy with ``changes``, validated again (``model_copy`` would not check them)."""
        return type(self)(**{**self.model_dump(), **changes})

    def identity(self) -> ModelIdentity:
        """The identity that travels with every result and every SR."""
        return ModelIdentity(name=self.name, version=self.version, demo=self.demo)


def _explain(error: ValidationError, given: dict[str, Any]) -> str:
    """Unknown and missing fields, then each field that breaks its rule, in field order."""
    fields = ModelInfo.model_fields
    bad = {e["loc"][0] for e in error.errors() if e["loc"]}
    unknown = sorted(str(name) for name in bad if name not in fields)
    missing = sorted(name for name in fields if name in bad and name not in given)
    parts = [f"unknown fields {unknown}"] if unknown else []
    parts += [f"missing fields {missing}"] if missing else []
    for name, field in fields.items():
        if name in bad and name in given:
            shown = repr(given[name])
            shown = shown if len(shown) <= 200 else f"{shown[:200]}..."
            parts.append(f"{name} must be {field.description}, got {shown}")
    return "; ".join(parts)


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _auto_runtime(gpu: bool) -> str:
    """What ``auto`` serves with: Keras on a GPU, else ONNX Runtime when it can be used (FP32
    or INT8, as the agreement gate allows: :mod:`node.analysis.runtimes`)."""
    if gpu:
        return "keras"
    needed = ("onnxruntime", "tf2onnx", "onnx")
    return "onnx" if all(importlib.util.find_spec(name) for name in needed) else "keras"


class ModelBundle:
    """A loaded model bundle: its :class:`ModelInfo` and batched inference."""

    def __init__(
        self,
        info: ModelInfo,
        runner: _KerasRunner | OnnxRunner,
        folder: Path,
        ood_statistics: ood.OodStatistics | None = None,
        gate: dict[str, dict] | None = None,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(info, ModelInfo):
            raise TypeError(f"info must be a ModelInfo, got {type(info).__name__}")
        self.info = info
        self.folder = Path(folder)
        self._runner = runner
        # the out-of-distribution statistics model.json names (None: the bundle cannot warn)
        self.ood_statistics = ood_statistics
        # per ONNX Runtime candidate, the agreement gate's figures and its timing on this host
        # (runtimes.json); empty when no gate ran (Keras asked for, or no gate data)
        self.gate = dict(gate or {})
        # slices per forward pass: the fastest measured for the runtime on this host, else 16
        self.batch_size = batch_size or 16
        _check_batch_size(self.batch_size)

    @property
    def runtime(self) -> str:
        """``keras``, ``onnx`` or ``onnx-int8`` (what ``auto`` chose, for a bundle loaded
        with it)."""
        return self._runner.runtime

    @property
    def session_options(self):
        """The ONNX Runtime session options in use (threads), None on the Keras runtime."""
        session = getattr(self._runner, "session", None)
        return session.get_session_options() if session is not None else None

    @property
    def model(self):
        """The Keras model served (the ``keras`` runtime only)."""
        if not isinstance(self._runner, _KerasRunner):
            raise AttributeError("an onnx-runtime bundle has no Keras model")
        return self._runner.model

    def keras_model(self):
        """The bundle's Keras model: the one served, or where ONNX Runtime serves, ``model.keras``
        loaded on the first call and kept (Grad-CAM needs TensorFlow's gradients)."""
        if isinstance(self._runner, _KerasRunner):
            return self._runner.model
        with _KERAS_LOCK:
            if getattr(self, "_keras", None) is None:
                self._keras = _load_keras(self.folder / MODEL_FILE, self.info)
            return self._keras

    def gradcam(self):
        """The :class:`node.analysis.gradcam.GradCam` of :meth:`keras_model` (built once)."""
        from node.analysis.gradcam import GradCam

        model = self.keras_model()
        with _KERAS_LOCK:
            if getattr(self, "_gradcam", None) is None:
                self._gradcam = GradCam(model)
            return self._gradcam

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        runtime: str = "keras",
        mixed_precision: bool = False,
        threads: int = 0,
        progress: bool = False,
    ) -> ModelBundle:
        """Validate ``model.json``, then load ``model.keras`` (or its cached ONNX export).

        Parameters
        ----------
        path
            The bundle folder.
        runtime
            ``keras`` (TensorFlow), ``onnx`` (ONNX Runtime FP32; ``model.onnx`` is exported
            from ``model.keras`` on first use and cached beside it), ``onnx-int8`` (ONNX
            Runtime INT8, made from the export with the bundle's calibration slices and
            cached as ``model.int8.onnx``), ``openvino`` / ``openvino-bf16`` (the ONNX export
            on OpenVINO's CPU plugin, FP32 / BF16) or ``auto``: Keras where a GPU is visible, else
            the fastest ONNX candidate that passes the agreement gate
            (:mod:`node.analysis.runtimes`), Keras when none does, when onnxruntime or tf2onnx
            is missing or when the export fails (logged). A bundle without gate data is served
            by ONNX Runtime FP32 under ``auto`` and cannot be served by ``onnx-int8``. An ONNX
            runtime asked for by name that fails the gate is refused (:class:`BundleError`
            with the figures).
        mixed_precision
            Compute in float16 where a GPU is visible; on a CPU this is logged and ignored.
        threads
            ONNX Runtime intra-op threads; 0: this host's CPUs shared among its
            model-serving workers (:func:`node.analysis.threads.intra_op_threads`).
        progress
            Show the conversion, the gate and the timing as a progress bar on stderr.
        """
        if runtime not in RUNTIMES:
            raise BundleError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        folder = Path(path)
        if not folder.is_dir():
            raise BundleError(f"{folder}: no such model bundle folder")
        info = ModelInfo.from_json(folder / INFO_FILE)
        from node.analysis import calibration  # it builds on this module

        calibration.check(info)  # a bad calibration is refused now, not at the first answer
        model_file = folder / MODEL_FILE
        if not model_file.is_file():
            raise BundleError(f"{model_file}: missing (the bundle has no model)")
        try:
            statistics = ood.read_statistics(folder, info.ood)
        except (ood.OodError, OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{folder / INFO_FILE}: ood: {exc}") from exc
        try:
            gating = gate_data.read_gate_data(folder, info.gate)
        except (gate_data.GateDataError, OSError) as exc:
            raise BundleError(f"{folder / INFO_FILE}: gate: {exc}") from exc
        gpu = _gpu_visible() if mixed_precision or runtime == "auto" else False
        if mixed_precision and not gpu:
            log.warning("mixed_precision asked for but no GPU is visible: running in float32")
            mixed_precision = False
        chosen = _auto_runtime(gpu) if runtime == "auto" else runtime
        if chosen != "keras":
            if mixed_precision:
                log.warning("mixed_precision applies to the keras runtime only: ignored")
            try:
                return cls._load_onnx(folder, info, statistics, gating, runtime, threads, progress)
            except Exception as exc:  # auto falls back; an explicit onnx says why it cannot
                if runtime != "auto":
                    raise
                log.warning("ONNX Runtime cannot serve this bundle, using Keras: %s", exc)
        runner = _KerasRunner(_load_keras(model_file, info), mixed_precision)
        return cls(info, runner, folder, statistics)

    @classmethod
    def _load_onnx(cls, folder, info, statistics, gating, runtime, threads, progress):
        """The bundle on ONNX Runtime: gated when it has gate data (Keras when ``auto`` finds
        no candidate that passes), else FP32 as asked."""
        from node.analysis import runtimes
        from node.analysis.threads import intra_op_threads

        model_file = folder / MODEL_FILE
        threads = intra_op_threads(threads)
        if gating is None:
            if runtime == "onnx-int8":
                raise BundleError(
                    f"{folder / INFO_FILE}: no gate data (model.json's gate): onnx-int8 needs "
                    "the bundle's calibration slices and its agreement gate"
                )
            if runtime == "auto":
                log.info("%s: no gate data in the bundle: serving ONNX Runtime FP32", folder)
            runner = runtimes.OnnxRunner(_onnx_model(model_file, info), "onnx", threads)
            return cls(info, runner, folder, statistics)
        choice = runtimes.choose_runtime(
            folder,
            info,
            gating,
            runtime,
            model_sha256=_sha256(model_file),
            threads=threads,
            float_model=lambda: _onnx_model(model_file, info),
            keras_runner=lambda: _KerasRunner(_load_keras(model_file, info)),
            statistics=statistics,
            progress=progress,
        )
        runner = choice.runner or _KerasRunner(_load_keras(model_file, info))
        return cls(info, runner, folder, statistics, choice.results, choice.batch_size)

    def predict_with_features(
        self, slices: np.ndarray, batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (as :meth:`predict`) and the penultimate-layer features the
        out-of-distribution score is computed on, float32 ``(N, features)``, from the same
        forward pass (every runtime gives them)."""
        batch = _check_slices(slices)
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        outputs = [
            self._runner(batch[start : start + batch_size])
            for start in range(0, len(batch), batch_size)
        ]
        if not outputs:
            classes = len(self.info.classes)
            return np.zeros((0, classes), np.float32), None
        probabilities = np.concatenate([p for p, _ in outputs]).astype(np.float32, copy=False)
        features = np.concatenate([f for _, f in outputs]).astype(np.float32, copy=False)
        return probabilities, features

    def predict(self, slices: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of windowed slices.

        Parameters
        ----------
        slices
            uint8 ``(N, H, W)`` or ``(N, H, W, 1)`` windowed slices at any size.
        batch_size
            Slices per forward pass (None: :attr:`batch_size`, the runtime's fastest).

        Returns
        -------
        numpy.ndarray
            float32 ``(N, classes)``, rows in ``info.classes`` order.
        """
        batch = _check_slices(slices)
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        outputs = [
            self._runner(batch[start : start + batch_size])[0]
            for start in range(0, len(batch), batch_size)
        ]
        if not outputs:
            return np.zeros((0, len(self.info.classes)), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def feature_model(model):
    """``model`` with two outputs: its probabilities and the penultimate-layer features (the
    input of the classification layer), computed in one forward pass."""
    import keras

    head = model.outputs[0]._keras_history.operation
    return keras.Model(model.inputs, [model.outputs[0], head.input], name=f"{model.name}_features")


def _check_slices(slices: object) -> np.ndarray:
    """``(N, H, W, 1)`` uint8 from ``(N, H, W)`` or ``(N, H, W, 1)`` uint8; errors name it."""
    if not isinstance(slices, np.ndarray) or slices.dtype != np.uint8:
        kind = getattr(slices, "dtype", type(slices).__name__)
        raise ValueError(f"slices must be a uint8 numpy array of windowed pixels, got {kind}")
    if slices.ndim == 3:
        slices = slices[..., np.newaxis]
    if slices.ndim != 4 or slices.shape[-1] != 1 or 0 in slices.shape[1:3]:
        raise ValueError(f"slices must have shape (N, H, W) or (N, H, W, 1), got {slices.shape}")
    return np.ascontiguousarray(slices)


class _KerasRunner:
    """A ``tf.function`` with a shape-polymorphic signature: no retracing, no eager memory."""

    runtime = "keras"

    def __init__(self, model, mixed_precision: bool = False) -> None:
        import tensorflow as tf

        self.model = _mixed_precision_copy(model) if mixed_precision else model
        both = feature_model(self.model)
        spec = tf.TensorSpec((None, None, None, 1), tf.uint8, name="slices")
        self._serve = tf.function(lambda x: both(x, training=False), input_signature=[spec])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, features = self._serve(batch)
        return probabilities.numpy(), features.numpy()


def _load_keras(model_file: Path, info: ModelInfo):
    """``model.keras`` loaded without its training state and checked against ``info``."""
    import keras

    try:
        model = keras.saving.load_model(model_file, compile=False)
    except Exception as exc:  # Keras raises many kinds for a damaged file; translate them all
        raise BundleError(f"{model_file}: cannot be loaded as a Keras model ({exc})") from exc
    _check_model(model, info, model_file)
    return model


def _check_model(model, info: ModelInfo, where: Path | str) -> None:
    """Refuse a model whose input, output or resizing disagrees with ``model.json``."""
    import keras

    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[-1] != 1:
        shapes = [tuple(t.shape) for t in model.inputs]
        raise BundleError(f"{where}: model input must be (batch, H, W, 1), got {shapes}")
    outputs = model.outputs[0].shape
    if len(model.outputs) != 1 or outputs[-1] != len(info.classes):
        raise BundleError(
            f"{where}: model gives {outputs[-1]} outputs but model.json lists "
            f"{len(info.classes)} classes"
        )
    sizes = {
        (layer.height, layer.width)
        for layer in model.layers
        if isinstance(layer, keras.layers.Resizing)
    }
    if sizes and sizes != {(info.input_size, info.input_size)}:
        raise BundleError(
            f"{where}: model resizes to {sorted(sizes)} but input_size is {info.input_size}"
        )


def _mixed_precision_copy(model):
    """The same model computing in float16 (outputs stay float32), with the same weights."""
    return _policy_copy(model, "mixed_float16")


def _policy_copy(model, policy: str):
    """The same model, weights and all, with every layer but the outputs on ``policy``."""
    outputs = set(model.output_names) if policy != "float32" else set()

    def convert(node: Any, layer: str | None = None) -> Any:
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and layer not in outputs:
                return {**node, "config": {**node["config"], "name": policy}}
            layer = node.get("name", layer) if "class_name" in node else layer
            return {key: convert(value, layer) for key, value in node.items()}
        if isinstance(node, list):
            return [convert(value, layer) for value in node]
        return node

    copy = model.__class__.from_config(convert(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def _sha256(path: Path) -> str:
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def _onnx_model(model_file: Path, info: ModelInfo) -> bytes:
    """The cached ``model.onnx`` when it was exported from this ``model.keras``, else a new one."""
    import onnx

    source = _sha256(model_file)
    cached = model_file.with_name(ONNX_FILE)
    if cached.is_file():
        try:
            proto = onnx.load_model(cached)
            metadata = {p.key: p.value for p in proto.metadata_props}
            if metadata.get(_ONNX_SOURCE_KEY) == source and (
                metadata.get(_ONNX_EXPORT_KEY) == _ONNX_EXPORT
            ):
                return proto.SerializeToString()
        except Exception as exc:  # a damaged cache is rebuilt, never served
            log.warning("%s: unreadable (%s), exporting again", cached, exc)
    log.info("%s: exporting to ONNX for ONNX Runtime (once, cached as %s)", model_file, ONNX_FILE)
    proto = _export_onnx(_load_keras(model_file, info), model_file)
    proto.metadata_props.add(key=_ONNX_SOURCE_KEY, value=source)
    proto.metadata_props.add(key=_ONNX_EXPORT_KEY, value=_ONNX_EXPORT)
    data = proto.SerializeToString()
    try:
        atomic.write_bytes(cached, data, mode=0o644)
    except OSError as exc:  # a read-only bundle still serves, from memory
        log.warning("%s: cannot cache the ONNX export (%s); using it from memory", cached, exc)
    return data


def _export_onnx(model, model_file: Path):
    """Convert the Keras model to ONNX with tf2onnx (uint8 input of any size; outputs: the
    probabilities, then the penultimate features, as :func:`feature_model`)."""
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise BundleError(
            f"{model_file}: the onnx runtime needs tf2onnx to export ({exc})"
        ) from exc
    spec = (tf.TensorSpec((None, None, None, 1), tf.uint8, name="slices"),)
    try:
        proto, _ = tf2onnx.convert.from_keras(feature_model(model), input_signature=spec, opset=17)
    except Exception as exc:  # tf2onnx fails in many ways on an op it does not know
        raise BundleError(f"{model_file}: cannot be exported to ONNX ({exc})") from exc
    return proto


def write_bundle(
    model,
    info: ModelInfo,
    folder: str | os.PathLike,
    overwrite: bool = False,
    extra_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``model.keras`` and ``model.json`` (and ``extra_files``, copied beside them: the
    statistics ``model.json`` refers to) into ``folder`` atomically and read them back.

    The bundle is built in a temporary folder beside ``folder``, loaded back and checked, then
    renamed into place, so a reader sees the old bundle or the new one, never half of one. The
    model is saved in float32 without its optimizer state.
    """
    if not isinstance(info, ModelInfo):
        raise TypeError(f"info must be a ModelInfo, got {type(info).__name__}")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise BundleError(f"{folder}: already exists (pass overwrite=True to replace it)")
    _check_model(model, info, "model")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        temp.chmod(0o755)
        # No optimizer, no compile state, and float32 whatever the model was trained in (a
        # mixed-precision run on GPUs): the node chooses its own precision when it loads.
        _policy_copy(model, "float32").save(temp / MODEL_FILE)
        info.to_json(temp / INFO_FILE)
        for extra in map(Path, extra_files):
            shutil.copy2(extra, temp / extra.name)
        ModelBundle.load(temp)  # proves the written files are a valid bundle
        _keep_other_files(folder, temp)
        old = folder.with_name(f".{folder.name}.old") if folder.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(temp, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def _keep_other_files(old: Path, new: Path) -> None:
    """Carry files kept beside a model (notes, ignore rules) over; never a stale cache."""
    if not old.is_dir():
        return
    for path in old.iterdir():
        own = path.name in (MODEL_FILE, INFO_FILE, *CACHE_FILES) or (new / path.name).exists()
        if path.is_file() and not own:  # the new bundle's own statistics win
            shutil.copy2(path, new / path.name)
