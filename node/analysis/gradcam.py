"""Where the model looked: Grad-CAM maps of the slices that drive a study's answer.

Grad-CAM (Selvaraju, Cogswell, Das, Vedantam, Parikh and Batra, "Grad-CAM: Visual Explanations
from Deep Networks via Gradient-based Localization", ICCV 2017, arXiv:1610.02391) weights each
channel of a convolutional feature map by the mean gradient of the class score (the logit,
before the softmax) over that map, sums the channels and keeps the positive part: the regions
whose features raise the class.

Which feature map: the model's last one, unless it has fewer than :data:`MIN_CELLS` cells a
side; then the last residual block output that has (the paper's trade-off between semantics
and resolution). EfficientNet-Lite0 at 128 px ends in a 4 x 4 map, one cell per quarter of
the image's width, which cannot tell one lung region from the next; the map explained is then
the 8 x 8 output of its last stride-16 block (``blocks_10_add``). On the demo model's key
COVID slices of phantoms (seeds 2000-2006, 3 key slices each) the strongest cell of the last
4 x 4 map holds lesion in 16 of 21 slices (a random lung cell would in 44 %); measured with
``tests/test_gradcam.py`` (seeds 2000-2004), the strongest cell of the 8 x 8 map holds lesion
in 15 of 15 (a random lung cell would in 22 %).

A map is stored at its own resolution as uint8 (0 = no evidence, 255 = the slice's strongest)
and upsampled bilinearly only to be shown, so nothing finer than the model saw is suggested.
The maps are computed with TensorFlow (``GradientTape``) on the bundle's Keras model, also
where ONNX Runtime or OpenVINO serves the bundle (:meth:`node.analysis.bundle.ModelBundle.gradcam`),
in one graph traced on the first call for every batch and slice size; a study's key slices
go through it as one batch. Op by op (eagerly), EfficientNetB7 @512 took 14.1 s for a study's
3 key slices on 2 cores; the graph takes 1.3 s (8.5 s on the first call, which traces it).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.analysis.bundle import ModelBundle
    from node.analysis.imaging import DecodeLimits, Window
    from node.analysis.result import StudyResult

METHOD = "Grad-CAM (Selvaraju et al., ICCV 2017)"
MIN_CELLS = 8  # a map coarser than 8 x 8 cannot tell one lung region from the next
# the colours of the overlay, low to high evidence (transparent where there is none)
_COLOURS = np.array(
    [[0, 0, 128], [0, 96, 255], [0, 220, 220], [120, 255, 60], [255, 220, 0], [255, 40, 0]],
    dtype=np.float64,
)


class GradCamError(ValueError):
    """A model Grad-CAM cannot explain (no convolutional feature map); the message says why."""


@dataclass(frozen=True)
class _Parts:
    """The model split at its last feature map: input → (feature map, logits)."""

    features: object  # callable: uint8 batch → (feature map, the head's input)
    layer: str


def _feature_layers(model) -> list:
    """(container, layer) of every layer with a 4-D output, in order (nested backbones too)."""
    found = []
    for layer in model.layers[1:]:
        if getattr(layer, "layers", None):  # a nested backbone
            found += _feature_layers(layer)
        elif len(getattr(layer.output, "shape", ())) == 4:
            found.append((model, layer))
    return found


def _explained_layer(model):
    """(container, layer) of the feature map to explain: the last one, or where that has fewer
    than :data:`MIN_CELLS` cells a side, the last residual block output with that many."""
    import keras

    layers = _feature_layers(model)
    if not layers:
        raise GradCamError("the model has no convolutional feature map to explain")

    def side(entry) -> int:
        shape = entry[1].output.shape
        return min(shape[1] or 0, shape[2] or 0)

    if side(layers[-1]) >= MIN_CELLS:
        return layers[-1]
    fine = [entry for entry in layers if side(entry) >= MIN_CELLS]
    blocks = [entry for entry in fine if isinstance(entry[1], keras.layers.Add)]
    return (blocks or fine or layers)[-1]


def _split(model) -> _Parts:
    """Split a Keras classifier (flat, or input stages → nested backbone → head layers)."""
    import keras

    container, layer = _explained_layer(model)
    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense):
        raise GradCamError(f"the model's last layer must be Dense, got {type(last).__name__}")

    if container is model:
        trunk = keras.Model(model.inputs, [layer.output, last.input])
        return _Parts(lambda x: trunk(x, training=False), layer.name)
    index = model.layers.index(container)
    before = keras.Model(model.inputs, model.layers[index - 1].output)
    inner = keras.Model(container.inputs, [layer.output, container.outputs[0]])
    after = model.layers[index + 1 : -1]  # pooling is inside the backbone; dropout, etc.

    def features(x):
        feature_map, pooled = inner(before(x, training=False), training=False)
        for step in after:
            pooled = step(pooled, training=False)
        return feature_map, pooled

    return _Parts(features, layer.name)


class GradCam:
    """Grad-CAM maps of one Keras classifier (built once, reused for every slice)."""

    def __init__(self, model) -> None:
        import keras

        self._parts = _split(model)
        last = model.layers[-1]
        # the class scores before the softmax (Grad-CAM's y^c): a saturated probability has
        # no gradient left
        self._logits = lambda x: (
            keras.ops.matmul(x, last.kernel) + (last.bias if last.use_bias else 0.0)
        )
        self._compiled = None  # the graph of _cam, traced on the first call (any slice size)

    @property
    def layer(self) -> str:
        """The name of the feature map explained."""
        return self._parts.layer

    def maps(self, slices: np.ndarray, class_index: int) -> np.ndarray:
        """uint8 ``(N, h, w)`` maps (feature-map resolution) of windowed uint8 ``slices``
        ``(N, H, W)`` for class ``class_index``; each scaled to its own maximum (a map with no
        positive evidence is all 0)."""
        import tensorflow as tf

        batch = np.asarray(slices)
        if batch.dtype != np.uint8 or batch.ndim not in (3, 4):
            raise ValueError(f"slices must be uint8 (N, H, W), got {batch.dtype} {batch.shape}")
        if batch.ndim == 3:
            batch = batch[..., np.newaxis]
        if self._compiled is None:
            # one graph for every batch and slice size: run eagerly, TensorFlow dispatches
            # each of a large backbone's ~1,000 operations on its own (EfficientNetB7 @512:
            # about 4x slower per slice)
            self._compiled = tf.function(
                self._cam,
                input_signature=(
                    tf.TensorSpec((None, None, None, 1), tf.uint8),
                    tf.TensorSpec((), tf.int32),
                ),
            )
        cam = self._compiled(tf.constant(batch), tf.constant(class_index, tf.int32)).numpy()
        peak = cam.max(axis=(1, 2), keepdims=True)
        scaled = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
        return np.round(scaled * 255).astype(np.uint8)

    def _cam(self, batch, class_index):
        """ReLU(Σ_k α_k^c A^k): the class-discriminative map before scaling."""
        import tensorflow as tf

        with tf.GradientTape() as tape:
            feature_map, pooled = self._parts.features(batch)
            tape.watch(feature_map)
            score = tf.gather(self._logits(pooled), class_index, axis=1)
        gradients = tape.gradient(score, feature_map)
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # α_k^c
        return tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1))


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A stored map at ``size`` (rows, columns), bilinear, float 0..1 (as Grad-CAM shows it)."""
    image = Image.fromarray(np.asarray(heatmap, dtype=np.uint8))
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR)) / 255.0


def peak(heatmap: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """(row, column) of the map's maximum at ``size``: the centre of its strongest cell."""
    rows, columns = np.asarray(heatmap).shape
    r, c = np.unravel_index(int(np.argmax(heatmap)), (rows, columns))
    return int((r + 0.5) * size[0] / rows), int((c + 0.5) * size[1] / columns)


def overlay_rgba(heatmap: np.ndarray, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """The map as a colour overlay ``(rows, columns, 4)`` uint8: blue → red as evidence grows,
    transparent where there is none (the page's opacity slider scales it further)."""
    values = upsample(heatmap, size)
    scaled = values * (len(_COLOURS) - 1)
    low = np.clip(np.floor(scaled).astype(int), 0, len(_COLOURS) - 2)
    fraction = (scaled - low)[..., np.newaxis]
    rgb = _COLOURS[low] * (1 - fraction) + _COLOURS[low + 1] * fraction
    alpha = np.clip(values * 1.6, 0, 1) * 255
    return np.dstack([rgb, alpha]).round().astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grey or RGBA uint8 array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode(heatmap: np.ndarray) -> dict:
    """A map as stored in JSON: ``{"rows", "columns", "values"}`` (base64 of the uint8 bytes)."""
    heatmap = np.asarray(heatmap, dtype=np.uint8)
    return {
        "rows": int(heatmap.shape[0]),
        "columns": int(heatmap.shape[1]),
        "values": base64.b64encode(heatmap.tobytes()).decode("ascii"),
    }


def decode(stored: Mapping) -> np.ndarray:
    """A map stored by :func:`encode`; ``ValueError`` when it is not one."""
    try:
        rows, columns = int(stored["rows"]), int(stored["columns"])
        values = np.frombuffer(base64.b64decode(stored["values"], validate=True), np.uint8)
        return values.reshape(rows, columns)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a stored heatmap: {exc}") from exc


def key_slice_maps(
    result: StudyResult,
    evaluated: Sequence[Dataset],
    bundle: ModelBundle,
    window: Window,
    limits: DecodeLimits,
) -> StudyResult:
    """``result`` with a Grad-CAM map (``heatmap``, :func:`encode`) on each key slice, for the
    predicted class; the key slices' pixels are read again from ``evaluated`` (3 slices)."""
    import dataclasses

    from node.analysis import imaging

    if not result.key_slices:
        return result
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evaluated}
    pixels = []
    for key in result.key_slices:
        item = result.slices[int(key["position"])]
        hu = imaging.hounsfield_frames(by_uid[item.sop_instance_uid], limits)
        pixels.append(imaging.apply_window(hu[item.frame or 0], window))
    explainer = bundle.gradcam()
    class_index = result.classes.index(result.predicted_class)
    maps: list = [None] * len(pixels)
    for shape in {image.shape for image in pixels}:  # one batch per slice size (usually one)
        same = [i for i, image in enumerate(pixels) if image.shape == shape]
        found = explainer.maps(np.stack([pixels[i] for i in same]), class_index)
        for i, heatmap in zip(same, found, strict=True):
            maps[i] = heatmap
    keys = tuple(
        {**key, "heatmap": encode(heatmap)}
        for key, heatmap in zip(result.key_slices, maps, strict=True)
    )
    return dataclasses.replace(result, key_slices=keys)
