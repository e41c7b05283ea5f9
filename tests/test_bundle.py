"""Model bundles: the committed demo classifies unseen phantoms; bad bundles are refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from node.analysis import (
    bundle,  # noqa: E402
    imaging,  # noqa: E402
    keras_model,  # noqa: E402
)
from node.analysis.bundle import BundleError, ModelBundle, ModelInfo, write_bundle  # noqa: E402
from node.analysis.result import CLASSES, ModelIdentity, aggregate  # noqa: E402
from node.settings import DEMO_MODEL_DIR, Settings  # noqa: E402
from tests.config import format1  # noqa: E402
from training.demo import MIN_FINDING_FRACTION as VISIBLE  # noqa: E402
from training.demo import lung_slices  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # Keras 3.15 with NumPy 2, inside get_weights()
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

DEMO = DEMO_MODEL_DIR
UNSEEN_SEEDS = (9001, 9002)  # training.demo uses seeds 1000..1053
# Per class. Measured on these two seeds: Covid_19 0.92, Normal 0.94, Pneumonia 1.00; on
# seeds 9001..9006 0.90 / 0.98 / 0.95, the worst single study 0.70.
MIN_SLICE_ACCURACY = 0.80


@pytest.fixture(scope="module")
def demo() -> ModelBundle:
    """The committed demo bundle on the Keras runtime (TensorFlow imports once per module)."""
    return ModelBundle.load(DEMO)


@pytest.fixture(scope="module")
def studies() -> dict[str, list[list[tuple[int, float, np.ndarray]]]]:
    """Per class, the lung-bearing 512 x 512 slices of each unseen seed's study."""
    found: dict[str, list] = {name: [] for name in CLASSES}
    for seed in UNSEEN_SEEDS:
        for name, chosen in lung_slices(seed, slices=40, size=512).items():
            found[name].append(chosen)
    return found


@pytest.fixture(scope="module")
def unseen(studies) -> dict[str, list[np.ndarray]]:
    """Per class and seed, the slices labelled with the class (as training.demo labels them)."""
    return {
        name: [
            np.stack(
                [image for _, finding, image in chosen if name == "Normal" or finding >= VISIBLE]
            )
            for chosen in per_seed
        ]
        for name, per_seed in studies.items()
    }


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A private copy of the demo bundle, so an ONNX export is not cached in the repository."""
    target = tmp_path / "demo"
    target.mkdir()
    for path in DEMO.iterdir():
        if path.name != "model.onnx":  # model.keras, model.json and the statistics it names
            shutil.copy2(path, target / path.name)
    return target


def _tiny_model(input_size: int = 32):
    """A small model with the bundle contract (uint8 slices in, 3 probabilities out)."""
    import keras

    inputs = keras.Input(shape=(None, None, 1), dtype="uint8", name="slices")
    x = keras.layers.Resizing(input_size, input_size)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def tiny_info() -> ModelInfo:
    """The demo's model.json, made to describe the tiny model."""
    demo_info = format1(ModelInfo.from_json(DEMO / "model.json"))
    return demo_info.replace(name="tiny", input_size=32, demo=False)


@pytest.fixture
def tiny_bundle(tmp_path, tiny_info) -> Path:
    """A freshly written tiny bundle to damage (quicker to load than the demo)."""
    return write_bundle(_tiny_model(), tiny_info, tmp_path / "tiny")


def _edit_json(folder: Path, **changes) -> None:
    data = json.loads((folder / "model.json").read_text())
    data.update(changes)
    (folder / "model.json").write_text(json.dumps(data))


# --------------------------------------------------------------------------- the demo


def test_demo_bundle_is_small_and_says_it_is_a_demo(demo):
    shipped = [path for path in DEMO.iterdir() if path.name not in bundle.CACHE_FILES]
    size = sum(path.stat().st_size for path in shipped)
    assert size <= 20_000_000  # model, model.json, its statistics and gate data
    assert demo.info.demo is True
    assert "NOT for clinical use" in demo.info.description
    assert demo.info.identity() == ModelIdentity("ainode-demo-phantom", "0.4.0", demo=True)
    assert "DEMO" in demo.info.identity().label
    assert demo.info.classes == CLASSES


def test_preprocessing_versions_match_the_imaging_module():
    assert imaging.PREPROCESSING_VERSION in bundle.PREPROCESSING_VERSIONS
    assert {imaging.PREPROCESSING_VERSION} == bundle.PREPROCESSING_VERSIONS


def test_demo_classifies_unseen_phantom_slices(demo, unseen):
    for name, studies in unseen.items():
        probs = demo.predict(np.concatenate(studies))
        accuracy = float((probs.argmax(axis=1) == CLASSES.index(name)).mean())
        assert accuracy >= MIN_SLICE_ACCURACY, f"{name}: {accuracy:.2f} of slices right"


def test_demo_gets_every_unseen_study_right_from_all_its_lung_slices(demo, studies):
    for name, per_seed in studies.items():
        for chosen in per_seed:
            probs = demo.predict(np.stack([image for _, _, image in chosen]))
            assert aggregate(probs, CLASSES)[0] == name


@pytest.mark.parametrize("count", [1, 37])
def test_predict_shapes_with_batches_of_16(demo, unseen, count):
    pixels = np.concatenate(unseen["Normal"] * 3)[:count]
    assert len(pixels) == count
    probs = demo.predict(pixels, batch_size=16)
    assert probs.shape == (count, len(CLASSES)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        demo.predict(pixels[..., np.newaxis], batch_size=5), probs, atol=1e-5
    )


@pytest.mark.parametrize(
    ("slices", "batch_size", "message"),
    [
        (np.zeros((2, 64, 64), np.float32), 16, "slices must be a uint8"),
        (np.zeros((64, 64), np.uint8), 16, "slices must have shape"),
        (np.zeros((2, 64, 64, 3), np.uint8), 16, "slices must have shape"),
        (np.zeros((2, 64, 64), np.uint8), 0, "batch_size must be an integer >= 1"),
    ],
)
def test_predict_refuses_bad_input(demo, slices, batch_size, message):
    with pytest.raises(ValueError, match=message):
        demo.predict(slices, batch_size=batch_size)


def test_onnx_runtime_matches_keras(demo, unseen, demo_copy):
    pixels = np.concatenate([studies[0][::4] for studies in unseen.values()])
    onnx = ModelBundle.load(demo_copy, runtime="onnx")
    assert onnx.runtime == "onnx" and (demo_copy / "model.onnx").is_file()
    np.testing.assert_allclose(onnx.predict(pixels), demo.predict(pixels), atol=1e-4)
    again = ModelBundle.load(demo_copy, runtime="onnx")  # from the cache this time
    np.testing.assert_allclose(again.predict(pixels[:3]), onnx.predict(pixels[:3]), atol=1e-6)


def test_auto_runtime_serves_onnx_on_a_cpu_and_keras_where_a_gpu_is(
    tiny_bundle, monkeypatch, caplog
):
    """``model_runtime = "auto"`` (the default): ONNX Runtime on this CPU-only host, Keras
    where a GPU is visible (mocked: there is none here), and Keras with the reason logged
    when the bundle cannot be exported."""
    assert Settings().model_runtime == "auto"
    assert ModelBundle.load(tiny_bundle, runtime="auto").runtime == "onnx"
    assert (tiny_bundle / "model.onnx").is_file()
    monkeypatch.setattr(bundle, "_gpu_visible", lambda: True)
    assert ModelBundle.load(tiny_bundle, runtime="auto").runtime == "keras"
    monkeypatch.setattr(bundle, "_gpu_visible", lambda: False)

    def cannot_export(model, model_file):
        raise BundleError(f"{model_file}: cannot be exported to ONNX (op Foo)")

    (tiny_bundle / "model.onnx").unlink()
    monkeypatch.setattr(keras_model, "_export_onnx", cannot_export)
    with caplog.at_level(logging.WARNING, logger="node.analysis.bundle"):
        served = ModelBundle.load(tiny_bundle, runtime="auto")
    assert served.runtime == "keras"
    assert "ONNX Runtime cannot serve this bundle, using Keras" in caplog.text
    assert "cannot be exported to ONNX (op Foo)" in caplog.text
    with pytest.raises(BundleError, match="op Foo"):
        ModelBundle.load(tiny_bundle, runtime="onnx")  # asked for by name: the error stands


def test_mixed_precision_on_cpu_falls_back_to_float32(tiny_bundle, unseen, caplog):
    pixels = unseen["Covid_19"][0][:4]
    with caplog.at_level(logging.WARNING, logger="node.analysis.bundle"):
        mixed = ModelBundle.load(tiny_bundle, mixed_precision=True)
    assert "no GPU is visible" in caplog.text
    assert mixed.model.layers[2].dtype_policy.name == "float32"
    plain = ModelBundle.load(tiny_bundle)
    np.testing.assert_allclose(mixed.predict(pixels), plain.predict(pixels), atol=1e-6)


def test_mixed_precision_where_a_gpu_is_visible_computes_in_float16(
    tiny_bundle, unseen, monkeypatch
):
    pixels = unseen["Covid_19"][0][:4]
    monkeypatch.setattr(bundle, "_gpu_visible", lambda: True)  # the hardware that is not here
    mixed = ModelBundle.load(tiny_bundle, mixed_precision=True)
    assert mixed.model.layers[2].dtype_policy.name == "mixed_float16"
    assert mixed.model.layers[-1].dtype_policy.name == "float32"
    probs = mixed.predict(pixels)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, ModelBundle.load(tiny_bundle).predict(pixels), atol=1e-2)


def test_write_bundle_round_trip(tiny_info, unseen, tmp_path):
    pixels = unseen["Pneumonia"][0][:5]
    model = _tiny_model()
    written = write_bundle(model, tiny_info, tmp_path / "copy")
    assert sorted(p.name for p in written.iterdir()) == ["model.json", "model.keras"]
    again = ModelBundle.load(written)
    assert again.info == tiny_info
    np.testing.assert_allclose(again.predict(pixels), model.predict_on_batch(pixels[..., None]))
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(model, tiny_info, written)
    (written / "NOTES.txt").write_text("kept")
    (written / "model.onnx").write_bytes(b"stale export")
    assert write_bundle(model, tiny_info, written, overwrite=True) == written
    assert sorted(p.name for p in written.iterdir()) == ["NOTES.txt", "model.json", "model.keras"]
    assert not list(tmp_path.glob(".copy.*"))  # no temporary folder left behind


def test_write_bundle_refuses_a_model_that_disagrees(tiny_info, tmp_path):
    with pytest.raises(BundleError, match="model resizes to .* but input_size is 64"):
        write_bundle(_tiny_model(), tiny_info.replace(input_size=64), tmp_path / "x")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"preprocessing_version": "hu-window-uint8/2"},
            "preprocessing_version must be a version this node knows",
        ),
        ({"classes": ["Normal", "Covid_19", "Pneumonia"]}, "classes must be .* output order"),
        ({"classes": ["Covid_19", "Normal"]}, "classes must be"),
        ({"input_size": 16}, r"input_size must be an integer in 32\.\.1024"),
        ({"input_size": 2048}, r"input_size must be an integer in 32\.\.1024"),
        ({"input_size": "128"}, "input_size must be an integer"),
        ({"window_width": 0}, "window_width must be greater than 0"),
        ({"dataset_manifest_hash": "abc"}, "dataset_manifest_hash must be 64"),
        ({"created_at": "yesterday"}, "created_at must be an ISO 8601"),
        ({"framework": {"keras": "3"}}, "framework must be .* non-empty 'tensorflow' and 'keras'"),
        ({"demo": "yes"}, "demo must be true or false"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"colour": "blue"}, r"unknown fields \['colour'\]"),
    ],
)
def test_bad_model_json_is_refused_naming_file_and_field(tiny_bundle, changes, message):
    _edit_json(tiny_bundle, **changes)
    with pytest.raises(BundleError, match=message) as caught:
        ModelBundle.load(tiny_bundle)
    assert str(tiny_bundle / "model.json") in str(caught.value)


def test_missing_model_json_is_refused(tiny_bundle):
    (tiny_bundle / "model.json").unlink()
    with pytest.raises(BundleError, match="no model.json"):
        ModelBundle.load(tiny_bundle)


def test_missing_model_keras_is_refused(tiny_bundle):
    (tiny_bundle / "model.keras").unlink()
    with pytest.raises(BundleError, match="model.keras: missing"):
        ModelBundle.load(tiny_bundle)


def test_corrupt_model_keras_is_refused(tiny_bundle):
    data = (tiny_bundle / "model.keras").read_bytes()
    (tiny_bundle / "model.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cannot be loaded as a Keras model"):
        ModelBundle.load(tiny_bundle)


def test_model_that_disagrees_with_model_json_is_refused(tiny_bundle):
    _edit_json(tiny_bundle, input_size=64)
    with pytest.raises(BundleError, match="model resizes to .* but input_size is 64"):
        ModelBundle.load(tiny_bundle)


@pytest.mark.parametrize(
    ("path", "runtime", "message"),
    [
        ("nowhere", "keras", "no such model bundle folder"),
        (None, "torch", "runtime must be one of auto, keras, onnx"),
    ],
)
def test_load_refuses_bad_arguments(tiny_bundle, tmp_path, path, runtime, message):
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(tmp_path / path if path else tiny_bundle, runtime=runtime)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"backbone": "ResNet50"}, ValueError, "backbone must be one of EfficientNetB0"),
        ({"input_size": 16}, ValueError, r"input_size must be in 32\.\.1024"),
        ({"input_size": 96.0}, TypeError, "input_size must be an int"),
        ({"classes": 1}, ValueError, "classes must be an int >= 2"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"weights": "imagenet"}, ValueError, "weights='imagenet' downloads"),
        ({"weights": "/nowhere/b0.weights.h5"}, FileNotFoundError, "weights file"),
        ({"freeze_base": True}, ValueError, "freeze_base=True with weights=None"),
    ],
)
def test_make_model_refuses_bad_arguments(arguments, error, message):
    from training.model import make_model

    with pytest.raises(error, match=message):
        make_model(**arguments)
