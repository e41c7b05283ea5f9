"""Training steps one by one: shards, balancing, augmentation, fit options and resumption
rules, devices, registration names; bad inputs get the message the user sees."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ainode.cli import main
from node.analysis.result import CLASSES
from node.settings import DEMO_MODEL_DIR
from tests.config import format1
from training import devices
from training.augment import AugmentOptions, augment_image
from training.fit import FitError, _start_state
from training.options import FitOptions
from training.register import check_component
from training.samples import Sample
from training.shards import (
    PreparedRun,
    PrepareError,
    PrepareOptions,
    _shard_sizes,
    plan_split,
    prepare,
)


def make_samples(root: Path, per_class: dict[str, int], patients: int = 6) -> list[Sample]:
    """Random 48 x 48 PNGs, ``per_class`` images each, spread over ``patients`` patients; the
    first two patients are val and test, the rest train."""
    rng = np.random.default_rng(0)
    samples = []
    for label, count in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / label / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(path)
            patient = f"p{i % patients}"
            split = {"p0": "val", "p1": "test"}.get(patient, "train")
            samples.append(Sample(path, label, patient, f"{patient}/{label}", "t", split=split))
    return samples


@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    return make_samples(tmp_path / "images", {"Covid_19": 12, "Normal": 30, "Pneumonia": 18})


def test_prepare_balances_train_only_and_keeps_shards_small(samples, tmp_path):
    info = prepare(samples, tmp_path / "run", PrepareOptions(image_size=32, shard_size=25))
    run = PreparedRun.open(tmp_path / "run")
    train = list(run.read_shards("train"))
    assert all(len(s["labels"]) <= 25 for s in train) and len(train) == len(
        run.shard_files("train")
    )
    counts = np.bincount(np.concatenate([s["labels"] for s in train]), minlength=3)
    assert counts.tolist() == [20, 20, 20]  # Normal has 20 training images; the others catch up
    assert info["shards"]["train"][0]["augmented"] + info["shards"]["train"][1]["augmented"] > 0
    for split in ("val", "test"):
        images = sum(len(s["labels"]) for s in run.read_shards(split))
        assert images == sum(1 for s in samples if s.split == split)  # nothing added or lost
        assert not any(s["augmented"].any() for s in run.read_shards(split))
    assert info["counts"]["train"] == {"Covid_19": 8, "Normal": 20, "Pneumonia": 12}
    assert len(info["manifest_sha256"]) == 64


def test_augmented_copies_differ_from_their_original_and_are_reproducible():
    image = np.zeros((64, 64), np.uint8)
    image[10:30, 20:50] = 200
    first = augment_image(image, np.random.default_rng(3), AugmentOptions())
    again = augment_image(image, np.random.default_rng(3), AugmentOptions())
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, image)


def test_balancing_plan_adds_copies_of_the_smaller_classes(samples):
    rows = [i for i, s in enumerate(samples) if s.split == "train"]
    entries = plan_split(samples, rows, balance=True, seed=0)
    by_class = {name: 0 for name in CLASSES}
    for entry in entries:
        by_class[samples[entry.row].label] += 1
    assert set(by_class.values()) == {20}
    assert {e.row for e in entries} == set(rows)  # every original is in
    assert plan_split(samples, rows, balance=True, seed=0) == entries  # deterministic


@pytest.mark.parametrize(
    ("total", "size", "expected"),
    [(10, 4, [4, 3, 3]), (8, 8, [8]), (0, 5, [0]), (9, 2, [2] * 4 + [1])],
)
def test_shards_are_as_even_as_possible(total, size, expected):
    assert sorted(_shard_sizes(total, size), reverse=True) == sorted(expected, reverse=True)
    assert sum(_shard_sizes(total, size)) == total


def test_prepare_refuses_bad_sample_sets(samples, tmp_path):
    no_split = [Sample(s.path, s.label, s.patient, s.study, s.source) for s in samples]
    with pytest.raises(PrepareError, match="60 samples have no split"):
        prepare(no_split, tmp_path / "a")
    leak = [*samples, samples[0].with_split("test")]  # p0 is in val already
    with pytest.raises(PrepareError, match="patient p0 is in both val and test"):
        prepare(leak, tmp_path / "b")
    no_train = [s for s in samples if s.split != "train"]
    with pytest.raises(PrepareError, match="the train split is empty"):
        prepare(no_train, tmp_path / "c")
    broken = samples[0].path.with_name("broken.png")
    broken.write_bytes(b"not a png")
    bad = [Sample(broken, "Covid_19", "p9", "p9", "t", split="train"), *samples]
    with pytest.raises(PrepareError, match="broken.png: not a readable image"):
        prepare(bad, tmp_path / "d", PrepareOptions(image_size=32))
    prepare(samples, tmp_path / "e", PrepareOptions(image_size=32))
    with pytest.raises(PrepareError, match="already a prepared run"):
        prepare(samples, tmp_path / "e", PrepareOptions(image_size=32))


def test_a_folder_that_is_not_a_run_says_what_to_do(tmp_path, capsys):
    assert main(["train", "fit", str(tmp_path)]) == 2
    assert "no prepare.json (run `ainode train prepare` first)" in capsys.readouterr().err


def test_prepare_without_sources_is_refused(tmp_path, capsys):
    assert main(["train", "prepare", "--out", str(tmp_path / "run")]) == 2
    assert "no images: give at least one --export, --folders or --covidx" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"patience": -1}, "patience must be >= 0"),
        ({"learning_rate": 0.0}, "learning_rate must be in"),
        ({"decay_rate": 1.5}, "decay_rate in"),
    ],
)
def test_fit_options_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        FitOptions(**changes)


def test_resuming_with_other_options_is_refused_until_restart(tmp_path):
    folder = tmp_path / "fit"
    state = _start_state(folder, FitOptions(input_size=64), restart=False)
    assert state["epoch"] == 0
    (folder / "state.json").write_text(json.dumps({**state, "epoch": 2}))
    (folder / "last.keras").write_bytes(b"checkpoint")
    assert _start_state(folder, FitOptions(input_size=64, epochs=20), restart=False)["epoch"] == 2
    with pytest.raises(FitError, match=r"other options \(input_size\).*--restart"):
        _start_state(folder, FitOptions(input_size=96), restart=False)
    # What the last start model gave goes too, so a restart from another bundle extracts anew.
    for name in ("backbone.weights.h5", "start_head.npz"):
        (folder / name).write_bytes(b"from the last start model")
    assert _start_state(folder, FitOptions(input_size=96), restart=True)["epoch"] == 0
    assert not any(
        (folder / n).exists() for n in ("last.keras", "backbone.weights.h5", "start_head.npz")
    )


def test_devices_fall_back_to_float32_on_one_cpu():
    chosen = devices.resolve_devices("auto", "auto")
    assert (chosen.gpus, chosen.policy, chosen.strategy_name) == (0, "float32", "default")
    asked = devices.resolve_devices("on", "auto")
    assert asked.policy == "float32"
    assert asked.notes == ["mixed precision asked for but no GPU is visible: training in float32"]


def test_devices_use_mixed_precision_and_mirroring_where_gpus_are(monkeypatch):
    # No GPU on this machine: the list of visible GPUs is the hardware that is not there.
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["GPU:0", "GPU:1"])
    chosen = devices.resolve_devices("auto", "auto")
    assert (chosen.gpus, chosen.policy, chosen.strategy_name) == (2, "mixed_float16", "mirrored")
    assert devices.resolve_devices("off", "default").policy == "float32"
    with pytest.raises(ValueError, match="strategy must be one of"):
        devices.resolve_devices("auto", "tpu")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "-dash", "x" * 65, "a..b"])
def test_registry_names_must_be_one_safe_folder(name):
    with pytest.raises(ValueError, match="use 1-64 letters"):
        check_component("name", name)


def test_a_model_trained_in_mixed_precision_is_registered_in_float32(tmp_path):
    import keras

    from node.analysis.bundle import ModelBundle, ModelInfo, write_bundle
    from training.model import make_model

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = make_model("EfficientNetB0", input_size=32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.get_layer("efficientnetb0").dtype_policy.name == "mixed_float16"
    demo = format1(ModelInfo.from_json(DEMO_MODEL_DIR / "model.json"))
    info = demo.replace(name="mixed", input_size=32, backbone="EfficientNetB0")
    bundle = ModelBundle.load(write_bundle(mixed, info, tmp_path / "bundle"))
    policies = {layer.dtype_policy.name for layer in bundle.model.layers}
    assert policies == {"float32"}  # the node, not the training run, picks the precision
    slices = np.random.default_rng(0).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    np.testing.assert_allclose(bundle.predict(slices), mixed.predict(slices[..., None]), atol=2e-2)


def test_validation_scores_the_whole_validation_split_every_shard(samples, tmp_path):
    """A model that cannot change (frozen pretrained base, a learning rate of 1e-12) must get
    the same validation accuracy after every shard: the accuracy over the whole split."""
    import csv

    import keras

    from training.fit import fit

    prepare(samples, tmp_path / "run", PrepareOptions(image_size=32, shard_size=10))
    options = FitOptions(
        backbone="EfficientNetLite0", input_size=32, batch_size=4, epochs=1, patience=99,
        learning_rate=1e-12, freeze_base=True, seed=1,
    )  # fmt: skip
    fit(tmp_path / "run", options)
    run = PreparedRun.open(tmp_path / "run")
    model = keras.models.load_model(tmp_path / "run" / "fit" / "last.keras", compile=False)
    [val] = list(run.read_shards("val"))
    expected = float((model.predict(val["images"], verbose=0).argmax(1) == val["labels"]).mean())
    with open(tmp_path / "run" / "fit" / "history.csv", newline="") as handle:
        scores = [float(row["val_accuracy"]) for row in csv.DictReader(handle)]
    assert len(scores) == len(run.shard_files("train")) >= 2
    assert scores == pytest.approx([expected] * len(scores), abs=1e-6)


def test_lite0_starts_from_the_shipped_imagenet_weights_by_default():
    import json

    from training.lite import efficientnet_lite
    from training.model import WEIGHTS_DIR, make_model, weights_origin

    model = make_model("EfficientNetLite0", input_size=64, freeze_base=True)  # allowed: pretrained
    notop = WEIGHTS_DIR / "efficientnet-lite0_notop.weights.h5"
    reference = efficientnet_lite("lite0", include_top=False, input_shape=(64, 64, 3),
                                  pooling="avg", weights=str(notop))  # fmt: skip
    grey = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
    rgb = np.repeat(grey.astype("float32"), 3, axis=-1)
    base = model.get_layer("efficientnetlite0")
    np.testing.assert_allclose(base.predict(rgb, verbose=0), reference.predict(rgb, verbose=0),
                               atol=1e-5)  # fmt: skip
    assert model.predict(grey, verbose=0).shape == (2, 3)
    random = make_model("EfficientNetLite0", input_size=64, weights="random")
    assert not np.allclose(
        random.get_layer("efficientnetlite0").get_weights()[0],
        model.get_layer("efficientnetlite0").get_weights()[0],
    )
    origin = weights_origin("EfficientNetLite0", None)
    provenance = json.loads((WEIGHTS_DIR / "efficientnet-lite0.provenance.json").read_text())
    assert origin["sha256"] == provenance["weights_notop"]["sha256"]
    assert origin["source_sha256"] == provenance["source"]["sha256"]
    assert "ImageNet" in origin["origin"]
    assert weights_origin("EfficientNetB0", None) == {"origin": "random initialisation"}
    with pytest.raises(ValueError, match="freeze_base=True with weights=None"):
        make_model("EfficientNetB0", input_size=64, freeze_base=True)


def test_fine_tuning_unfreezes_only_the_top_blocks_and_keeps_batchnorm_frozen():
    import keras

    from training.model import make_model, unfreeze_top_blocks

    for backbone, weights, first, last in [
        ("EfficientNetLite0", None, "blocks_14", "blocks_15"),  # the shipped ImageNet weights
        ("EfficientNetB0", "random", "block6d", "block7a"),
    ]:
        model = make_model(backbone, input_size=32, weights=weights, freeze_base=weights is None)
        chosen = unfreeze_top_blocks(model, 2)
        base = model.get_layer(backbone.lower())
        assert chosen == [first, last]
        trainable = {layer.name for layer in base.layers if layer.trainable and layer.weights}
        assert trainable and all(
            name.startswith((first, last, "top_", "conv_head")) for name in trainable
        )
        assert not any(
            isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for layer in base.layers
        )
        stem = base.get_layer("conv_stem" if "Lite" in backbone else "stem_conv")
        assert not stem.trainable
        with pytest.raises(ValueError, match="blocks must be in 1.."):
            unfreeze_top_blocks(model, 99)


def test_fine_tuning_stage_trains_the_top_blocks_at_a_lower_rate_and_resumes(samples, tmp_path):
    """Head stage on the frozen ImageNet Lite0, then two top blocks; the stem never moves,
    the top blocks do, and a longer second call resumes in the fine-tuning stage."""
    import csv

    import keras

    from training.fit import fit
    from training.model import make_model

    prepare(samples, tmp_path / "run", PrepareOptions(image_size=32, shard_size=30))
    shards = len(PreparedRun.open(tmp_path / "run").shard_files("train"))
    options = FitOptions(
        backbone="EfficientNetLite0", input_size=32, batch_size=8, epochs=1, patience=99,
        learning_rate=1e-3, freeze_base=True, fine_tune_blocks=2, fine_tune_epochs=1,
        fine_tune_lr=1e-4, seed=1,
    )  # fmt: skip
    summary = fit(tmp_path / "run", options)
    tuned = summary["fine_tune"]
    assert tuned["from_epoch"] == shards and tuned["blocks"] == ["blocks_14", "blocks_15"]
    assert summary["epochs_run"] == 2 * shards
    assert any("top 2 block(s)" in note for note in summary["notes"])
    start = make_model("EfficientNetLite0", input_size=32).get_layer("efficientnetlite0")
    last = keras.models.load_model(tmp_path / "run" / "fit" / "last.keras")
    base = last.get_layer("efficientnetlite0")
    for name, moved in [("conv_stem", False), ("blocks_3_project_conv", False),
                        ("blocks_15_project_conv", True), ("conv_head", True)]:  # fmt: skip
        before, after = (
            start.get_layer(name).get_weights()[0],
            base.get_layer(name).get_weights()[0],
        )
        assert (not np.array_equal(before, after)) == moved, name
    assert sum(int(np.prod(w.shape)) for w in last.trainable_weights) == tuned["trainable_weights"]

    longer = fit(tmp_path / "run", dataclasses.replace(options, fine_tune_epochs=2))
    assert longer["epochs_run"] == 3 * shards and longer["fine_tune"] == tuned
    with open(tmp_path / "run" / "fit" / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == list(range(3 * shards))
    seconds = [float(row["seconds"]) for row in rows]  # running training time, across calls
    assert (
        seconds[0] > 0
        and seconds == sorted(seconds)
        and seconds[-1] == pytest.approx(longer["seconds"], abs=0.1)
    )
    with pytest.raises(ValueError, match="fine_tune_blocks follows a head-only stage"):
        FitOptions(fine_tune_blocks=2)


def test_a_trained_start_model_gives_its_classifier_when_the_classes_match(tmp_path):
    """Continuing from a trained model (a bundle's or a .keras file) keeps its head; a head
    for other classes is left out, and the run says which happened."""
    from training.model import HEAD_FILE, backbone_weights, make_model, start_head_from

    trained = make_model("EfficientNetLite0", input_size=32, freeze_base=True)
    head = trained.get_layer("probabilities")
    learned = [np.full(w.shape, 0.5 + i, dtype=np.float32) for i, w in enumerate(head.weights)]
    head.set_weights(learned)
    trained.save(tmp_path / "trained.keras")
    extracted = backbone_weights(
        tmp_path / "trained.keras", "EfficientNetLite0", tmp_path / "b.weights.h5"
    )
    assert (tmp_path / HEAD_FILE).is_file()

    fresh = make_model("EfficientNetLite0", input_size=32, weights=extracted, freeze_base=True)
    note = start_head_from(fresh, tmp_path / HEAD_FILE, CLASSES)
    assert note.startswith("the classifier starts from the start model's")
    for got, want in zip(fresh.get_layer("probabilities").get_weights(), learned, strict=True):
        assert np.array_equal(got, want)

    other = tmp_path / "other.npz"
    np.savez(other, kernel=learned[0], bias=learned[1], classes=np.array(["A", "B", "C"]))
    fresh = make_model("EfficientNetLite0", input_size=32, weights=extracted, freeze_base=True)
    note = start_head_from(fresh, other, CLASSES)
    assert note == "the classifier starts fresh: the start model's classes (A, B, C) are not ours"
    assert not np.array_equal(fresh.get_layer("probabilities").get_weights()[1], learned[1])
    assert start_head_from(fresh, tmp_path / "none.npz", CLASSES).startswith(
        "the classifier starts fresh (the start model has none)"
    )
