"""The frozen-stage feature cache: a cached fit gives the uncached fit's result, the cache is
computed once, read back memory-mapped, and never reused for another backbone or shard."""

from __future__ import annotations

import csv
import dataclasses
import json

import keras
import numpy as np
import pytest

from tests.test_training_steps import make_samples
from training.feature_cache import CACHE_DIR, open_or_build, split_model
from training.fit import fit
from training.model import backbone_of, make_model
from training.options import FitOptions
from training.shards import SHARD_DIR, PreparedRun, PrepareOptions, prepare

OPTIONS = FitOptions(
    backbone="EfficientNetLite0", input_size=32, batch_size=8, epochs=2, patience=99,
    learning_rate=1e-3, freeze_base=True, fine_tune_blocks=2, fine_tune_epochs=1,
    fine_tune_lr=1e-4, seed=1,
)  # fmt: skip


@pytest.fixture
def runs(tmp_path):
    """Two identical prepared runs of random 32-px images (one to fit each way)."""
    samples = make_samples(tmp_path / "images", {"Covid_19": 12, "Normal": 30, "Pneumonia": 18})
    for name in ("cached", "uncached"):
        prepare(samples, tmp_path / name, PrepareOptions(image_size=32, shard_size=30))
    return tmp_path / "cached", tmp_path / "uncached"


def history(run) -> list[dict[str, float]]:
    with open(run / "fit" / "history.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_a_cached_fit_gives_the_uncached_result_in_both_stages(runs):
    cached_run, uncached_run = runs
    cached = fit(cached_run, OPTIONS)
    uncached = fit(uncached_run, dataclasses.replace(OPTIONS, feature_cache=False))

    stages = cached["feature_cache"]
    assert set(stages) == {"head", "fine-tune"} and uncached["feature_cache"] == {}
    assert stages["head"]["cut"] == "pooled" and stages["fine-tune"]["cut"] == "blocks_14"
    assert stages["head"]["activation_bytes_per_image"] == 1280 * 2  # float16 features
    assert not stages["head"]["reused"] and stages["head"]["images"] == 70
    # The frozen part ran once: the head stage pooled the cached input of the tuned blocks,
    # which the fine-tuning stage then read back.
    assert stages["head"]["computed_from"] == "blocks_14" and stages["fine-tune"]["reused"]
    assert any("cached output" in note for note in cached["notes"])
    assert "no feature cache (--no-feature-cache)" in uncached["notes"]

    # Same shards, same losses and accuracies per shard, up to the float16 activations.
    rows, reference = history(cached_run), history(uncached_run)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference] == list(range(6))
    for row, expected in zip(rows, reference, strict=True):
        for column in ("loss", "val_loss"):
            assert row[column] == pytest.approx(expected[column], abs=5e-3), (row, expected)
        for column in ("accuracy", "val_accuracy"):
            assert row[column] == pytest.approx(expected[column], abs=0.11), (row, expected)

    # The checkpoints are whole classifiers (slices in), answering alike.
    val = next(PreparedRun.open(cached_run).read_shards("val"))["images"]
    for name in ("best.keras", "last.keras"):
        a = keras.models.load_model(cached_run / "fit" / name, compile=False).predict(val)
        b = keras.models.load_model(uncached_run / "fit" / name, compile=False).predict(val)
        assert np.abs(a - b).max() < 5e-3, name
    # The top blocks trained in the cached fine-tuning stage, the stem did not.
    start = make_model("EfficientNetLite0", input_size=32).get_layer("efficientnetlite0")
    tuned = keras.models.load_model(cached_run / "fit" / "last.keras", compile=False)
    base = tuned.get_layer("efficientnetlite0")
    for name, moved in (("conv_stem", False), ("blocks_15_project_conv", True)):
        before, after = (
            start.get_layer(name).get_weights()[0],
            base.get_layer(name).get_weights()[0],
        )
        assert (not np.array_equal(before, after)) == moved, name


def test_a_longer_fit_reads_the_cache_back_and_resumes_its_optimizer(runs):
    run, _ = runs
    fit(run, dataclasses.replace(OPTIONS, fine_tune_blocks=0))
    longer = fit(run, dataclasses.replace(OPTIONS, fine_tune_blocks=0, epochs=3))
    assert longer["feature_cache"]["head"]["reused"]
    assert longer["epochs_run"] == 6
    saved = np.load(run / "fit" / "last-optimizer.npz")
    assert int(saved["epoch"]) == 6 and int(saved["0"]) == 6 * 4  # Adam's step count: 4 a shard
    cache = run / SHARD_DIR / CACHE_DIR
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["pooled"]


def test_the_cache_is_float16_memory_mapped_and_keyed_by_weights_and_shards(runs):
    run_folder, _ = runs
    run = PreparedRun.open(run_folder)
    keras.utils.set_random_seed(0)
    model = make_model("EfficientNetLite0", input_size=32, freeze_base=True)
    split = split_model(model)
    cache, summary = open_or_build(run, split, batch_size=16)
    features, labels = cache.load("train", 0)
    assert isinstance(features, np.memmap) and features.dtype == np.float16
    assert features.shape == (run.info["shards"]["train"][0]["images"], 1280)
    shard = next(run.read_shards("train"))
    assert np.array_equal(labels, shard["labels"])
    expected = split.frozen.predict(shard["images"], verbose=0)
    assert np.allclose(features, expected, rtol=2e-3, atol=2e-3)
    assert not summary["reused"]

    again, summary = open_or_build(run, split_model(model), batch_size=16)
    assert summary["reused"] and again.folder == cache.folder

    # A changed frozen weight (another backbone) or a changed shard: computed anew, the stale
    # cache removed.
    conv = backbone_of(model).get_layer("conv_stem")
    conv.kernel.assign(conv.kernel * 1.01)
    changed, summary = open_or_build(run, split_model(model), batch_size=16)
    assert not summary["reused"] and changed.folder != cache.folder
    assert not cache.folder.exists()
    path = run.shard_files("val")[0]
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["images"] = 255 - arrays["images"]
    np.savez(path, **arrays)
    rebuilt, summary = open_or_build(run, split_model(model), batch_size=16)
    assert not summary["reused"] and rebuilt.folder != changed.folder
    info = json.loads((rebuilt.folder / "cache.json").read_text())
    assert set(info["shard_sha256"]) == {
        p.name for s in ("train", "val") for p in run.shard_files(s)
    }


def test_online_augmentation_turns_the_cache_off_and_says_so(runs):
    run, _ = runs
    options = dataclasses.replace(OPTIONS, fine_tune_blocks=0, epochs=1, online_augment=True)
    summary = fit(run, options)
    assert summary["feature_cache"] == {}
    assert (
        "no feature cache: online augmentation changes every image on every pass"
        in (summary["notes"])
    )
    assert not (run / SHARD_DIR / CACHE_DIR).exists()


def test_a_frozen_backbone_gives_the_same_activations_in_training_mode():
    """Keras 3 passes a functional model's ``training=True`` to every layer inside it; the
    frozen base must still run deterministically (no stochastic depth) during fit."""
    keras.utils.set_random_seed(0)
    model = make_model("EfficientNetLite0", input_size=32, freeze_base=True)
    features = keras.Model(model.inputs, model.get_layer("top_dropout").input)
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    inference = np.asarray(features(x, training=False))
    for _ in range(3):
        assert np.array_equal(np.asarray(features(x, training=True)), inference)
