"""The frozen part of the classifier computed once per image, so a stage trains only the rest.

With a frozen backbone (the seed's recipe: a new head on a frozen EfficientNet, then its top
blocks) every pass would recompute the frozen layers for every image, though they give the
same activations each time when the training copies are made offline. Here the frozen part
runs once over the training and validation shards and its output is stored beside them::

    shards/cache/<cut>-<key>/train-00000.npy   float16, memory-mapped when read
    shards/cache/<cut>-<key>/cache.json        written last: its presence means whole

``cut`` is where the network is split: ``pooled`` (the backbone's pooled features; the head
stage trains the dropout and classification layers on them) or the first fine-tuned block
(``blocks_14``, ``block7a``; the fine-tuning stage runs the top blocks on the activations at
their input). ``key`` hashes the frozen layers' weights, the cut, the input size and each
shard's SHA-256, so a changed backbone or shard never reads a stale cache.

The stage trains a *trainer* model built from the classifier's own layer objects, so the
classifier's weights are the ones that change and its checkpoints are whole models. Its
Dropout is the classifier's layer too, with the same random stream: a cached fit gives the
uncached fit's result up to the float16 rounding of the stored activations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from node import atomic
from training.model import HEAD_LAYER, backbone_of, first_layer_of_block
from training.samples import sha256_of
from training.shards import SHARD_DIR, PreparedRun

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
CACHE_INFO = "cache.json"
POOLED = "pooled"
CACHED_SPLITS = ("train", "val")
DROPOUT_LAYER, RGB_LAYER, RESIZE_LAYER = "top_dropout", "grey_to_rgb", "resize"


@dataclass(frozen=True)
class Split:
    """The classifier cut in two: ``frozen`` (slices → activations) and ``trainer``
    (activations → probabilities), sharing the classifier's layers."""

    cut: str
    frozen: keras.Model
    trainer: keras.Model
    # the backbone from the cut to its pooled output (None at the pooled cut): what turns this
    # cut's cached activations into the pooled ones without running the frozen part again
    top: keras.Model | None = None
    input_size: int = 0  # the side the classifier resizes slices to


def split_model(model: keras.Model, blocks: int = 0) -> Split:
    """Cut ``model`` (made by :func:`training.model.make_model` with a frozen base) before its
    top ``blocks`` backbone blocks, or after the backbone when ``blocks`` is 0."""
    base = backbone_of(model)
    # the RGB tensor the backbone is called on (make_model's last layer before it)
    before = keras.Model(model.inputs, model.get_layer(RGB_LAYER).output, name="to_rgb")
    slices = keras.Input(shape=(None, None, 1), dtype="uint8", name="slices")
    if blocks == 0:
        cut, bottom, top = POOLED, base, None
    else:
        cut, first = first_layer_of_block(base, blocks)
        bottom = keras.Model(base.input, first.input, name="frozen_blocks")
        top = keras.Model(first.input, base.output, name="top_blocks")
    frozen = keras.Model(slices, bottom(before(slices), training=False), name=f"frozen_{cut}")
    activations = keras.Input(shape=tuple(frozen.output.shape[1:]), name="activations")
    x = activations if top is None else top(activations, training=False)
    x = model.get_layer(DROPOUT_LAYER)(x)
    outputs = model.get_layer(HEAD_LAYER)(x)
    trainer = keras.Model(activations, outputs, name=f"trainer_{cut}")
    return Split(cut, frozen, trainer, top, int(model.get_layer(RESIZE_LAYER).height))


@dataclass(frozen=True)
class FeatureCache:
    """The frozen part's output for each training and validation shard, on disk."""

    folder: Path
    info: dict

    def load(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``index`` of ``split``: memory-mapped float16 activations, and its labels."""
        entry = self.info["shards"][split][index]
        features = np.load(self.folder / entry["file"], mmap_mode="r")
        return features, np.asarray(entry["labels"], dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        """The activations of one image."""
        return tuple(self.info["shape"])


def cache_key(split: Split, run: PreparedRun) -> tuple[str, dict[str, str]]:
    """The cache key of ``split`` on ``run`` and the shard hashes it covers."""
    digest = hashlib.sha256()
    for weight in split.frozen.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    shape = list(split.frozen.output.shape[1:])
    digest.update(json.dumps([split.cut, split.input_size, shape]).encode())
    shards = {}
    for name in CACHED_SPLITS:
        for path in run.shard_files(name):
            shards[path.name] = sha256_of(path)
            digest.update(f"{path.name}:{shards[path.name]}".encode())
    return digest.hexdigest(), shards


def open_or_build(
    run: PreparedRun,
    split: Split,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    source: tuple[FeatureCache, keras.Model] | None = None,
) -> tuple[FeatureCache, dict]:
    """The cache of ``split`` on ``run``: read back when its key matches, else computed (and
    any stale cache of the same cut removed). Returns it with what the run's notes say.

    With a ``source`` (the cache at a lower cut, and the layers from there to this one) the
    activations are computed from that cache instead of from the images: the head stage of a
    fit that will fine-tune its top blocks caches their input once and pools it, rather than
    running the frozen part twice."""
    key, shard_hashes = cache_key(split, run)
    root = run.folder / SHARD_DIR / CACHE_DIR
    folder = root / f"{split.cut}-{key[:16]}"
    info_path = folder / CACHE_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("key") == key:
            return FeatureCache(folder, info), {"reused": True, **_summary(info)}
    started = time.perf_counter()
    for stale in root.glob(f"{split.cut}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[dict]] = {}
    shape = tuple(int(n) for n in split.frozen.output.shape[1:])
    for name in CACHED_SPLITS:
        shards[name] = []
        for index, path in enumerate(run.shard_files(name)):
            file = path.with_suffix(".npy").name
            if source is None:
                with np.load(path) as shard:
                    inputs, labels = shard["images"], shard["labels"]
                model = split.frozen
            else:
                (inputs, labels), model = source[0].load(name, index), source[1]
            _write_activations(model, inputs, folder / file, batch_size, progress)
            shards[name].append({"file": file, "shard": path.name, "labels": labels.tolist()})
    info = {
        "key": key,
        "cut": split.cut,
        "shape": list(shape),
        "dtype": "float16",
        "shard_sha256": shard_hashes,
        "shards": shards,
        "seconds": round(time.perf_counter() - started, 2),
        "computed_from": None if source is None else source[0].info["cut"],
    }
    atomic.write_text(info_path, json.dumps(info) + "\n")  # last: the cache is whole
    log.info(
        "cached %s activations of %d images in %.1f s", split.cut, _images(info), info["seconds"]
    )
    return FeatureCache(folder, info), {"reused": False, **_summary(info)}


def _write_activations(model, inputs: np.ndarray, path: Path, batch_size: int, progress) -> None:
    """``model`` over ``inputs`` (images, or float16 activations of a lower cut) in batches,
    into a float16 ``.npy`` written atomically."""
    shape = (len(inputs), *(int(n) for n in model.output.shape[1:]))
    partial = path.with_name(path.name + ".partial")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        if batch.dtype == np.float16:
            batch = batch.astype(np.float32)
        count = len(batch)
        if count < batch_size:  # padded to the traced shape: a new one would trace again
            padding = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, padding])
        out[start : start + count] = model.predict_on_batch(batch)[:count]
        if progress is not None:
            progress(len(batch))
    out.flush()
    del out
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _images(info: dict) -> int:
    return sum(len(entry["labels"]) for entries in info["shards"].values() for entry in entries)


def _summary(info: dict) -> dict:
    """What the fit summary records about a cache."""
    size = int(np.prod(info["shape"])) * 2
    return {
        "cut": info["cut"],
        "key": info["key"][:16],
        "images": _images(info),
        "activation_bytes_per_image": size,
        "build_seconds": info["seconds"],
        "computed_from": info.get("computed_from"),
    }


def restore_optimizer(trainer: keras.Model, path: Path, epoch: int) -> None:
    """Give ``trainer`` the optimizer state :func:`save_optimizer` saved for ``epoch``; a
    trainer is rebuilt from the classifier when a cached stage resumes, so its optimizer
    cannot travel inside ``last.keras``."""
    if not path.exists():
        log.warning("%s: missing; the optimizer starts afresh at shard %d", path.name, epoch)
        return
    with np.load(path) as saved:
        store = {key: saved[key] for key in saved.files if key != "epoch"}
        saved_epoch = int(saved["epoch"])
    if saved_epoch != epoch:
        log.warning(
            "%s is of shard %d, not %d; the optimizer starts afresh", path.name, saved_epoch, epoch
        )
        return
    trainer.optimizer.build(trainer.trainable_variables)
    trainer.optimizer.load_own_variables(store)


def save_optimizer(trainer: keras.Model, path: Path, epoch: int) -> None:
    """Save ``trainer``'s optimizer state (Adam's moments, its step count) for ``epoch``."""
    store: dict = {}
    trainer.optimizer.save_own_variables(store)
    with atomic.atomic_open(path) as handle:
        np.savez(handle, epoch=epoch, **{k: np.asarray(v) for k, v in store.items()})
