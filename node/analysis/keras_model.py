"""A bundle's Keras model: loaded and checked against ``model.json``, served, exported to ONNX.

``model.keras`` is refused when its input, outputs or resizing disagree with
:class:`~node.analysis.model_info.ModelInfo`. The ONNX export is cached beside it as
``model.onnx``, stamped with the SHA-256 of the ``model.keras`` it came from. TensorFlow, Keras,
tf2onnx and onnx are imported inside the functions that need them, never with this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from node import atomic
from node.analysis.bundle_format import ONNX_FILE
from node.analysis.model_info import BundleError, ModelInfo
from node.analysis.ood import sha256_of

log = logging.getLogger(__name__)

_ONNX_SOURCE_KEY = "ainode.source_sha256"  # metadata: which model.keras the ONNX file came from
# metadata: what the export gives; "2" = [probabilities, penultimate features]. A model.onnx
# cached by an older export (probabilities only) lacks it and is exported again.
_ONNX_EXPORT_KEY, _ONNX_EXPORT = "ainode.export", "2"


class KerasRunner:
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


def feature_model(model):
    """``model`` with two outputs: its probabilities and the penultimate-layer features (the
    input of the classification layer), computed in one forward pass."""
    import keras

    head = model.outputs[0]._keras_history.operation
    return keras.Model(model.inputs, [model.outputs[0], head.input], name=f"{model.name}_features")


def load_keras(model_file: Path, info: ModelInfo):
    """``model.keras`` loaded without its training state and checked against ``info``."""
    import keras

    try:
        model = keras.saving.load_model(model_file, compile=False)
    except Exception as exc:  # Keras raises many kinds for a damaged file; translate them all
        raise BundleError(f"{model_file}: cannot be loaded as a Keras model ({exc})") from exc
    check_model(model, info, model_file)
    return model


def check_model(model, info: ModelInfo, where: Path | str) -> None:
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
    return policy_copy(model, "mixed_float16")


def policy_copy(model, policy: str):
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


def onnx_model(model_file: Path, info: ModelInfo) -> bytes:
    """The cached ``model.onnx`` when it was exported from this ``model.keras``, else a new one."""
    import onnx

    source = sha256_of(model_file)
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
    proto = _export_onnx(load_keras(model_file, info), model_file)
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
