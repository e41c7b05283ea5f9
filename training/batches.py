"""Batches for ``training.fit``: a shuffled stream of training shards, and exact passes over
an evaluation split — of the shards' images, or of their cached activations
(:mod:`training.feature_cache`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from training.augment import AugmentOptions, augment_image
from training.feature_cache import FeatureCache
from training.shards import PreparedRun


def train_batches(
    run: PreparedRun,
    batch_size: int,
    start_epoch: int,
    seed: int,
    augment: bool,
    cache: FeatureCache | None = None,
) -> tuple[Iterator, int]:
    """An endless stream of training batches, shard ``epoch % shards`` for each epoch, and the
    batches per epoch (every epoch yields as many, the smaller shards wrapping around).

    With a ``cache`` the batches are the shards' cached activations (float32), in the same
    order as the images would come."""
    files = run.shard_files("train")
    largest = max(s["images"] for s in run.info["shards"]["train"])
    steps = -(-largest // batch_size)
    options = AugmentOptions(**run.info["options"]["augment"])

    def stream():
        epoch = start_epoch
        while True:
            if cache is None:
                with np.load(files[epoch % len(files)]) as shard:
                    images, labels = shard["images"], shard["labels"]
            else:
                images, labels = cache.load("train", epoch % len(files))
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(labels))
            for step in range(steps):
                picks = order[
                    np.arange(step * batch_size, min((step + 1) * batch_size, largest)) % len(order)
                ]
                batch = images[picks] if cache is None else images[picks].astype(np.float32)
                if augment:
                    batch = np.stack([augment_image(b[..., 0], rng, options) for b in batch])[
                        ..., None
                    ]
                yield batch, labels[picks]
            epoch += 1

    return stream(), steps


def eval_batches(run: PreparedRun, split: str, batch_size: int) -> tuple[Iterator, int]:
    """An endless stream cycling through ``split`` in order, and the batches per pass."""
    sizes = [s["images"] for s in run.info["shards"][split]]
    steps = sum(-(-n // batch_size) for n in sizes)

    def stream():
        while True:
            for shard in run.read_shards(split):
                for start in range(0, len(shard["labels"]), batch_size):
                    yield (
                        shard["images"][start : start + batch_size],
                        shard["labels"][start : start + batch_size],
                    )

    return stream(), steps


def validation_data(
    run: PreparedRun, split: str, batch_size: int, cache: FeatureCache | None = None
):
    """``split`` as a ``tf.data.Dataset``: every iteration is one exact pass, in order (of
    the cached activations, with a ``cache``).

    Keras reads a plain Python generator ahead and replays what it read at the start of each
    validation, so an endless generator would score a shifting, partly repeated subset.
    """
    import tensorflow as tf

    size = run.info["image_size"]

    def shards():
        if cache is None:
            for shard in run.read_shards(split):
                yield shard["images"], shard["labels"]
        else:
            for index in range(len(run.shard_files(split))):
                yield cache.load(split, index)

    def one_pass():
        for images, labels in shards():
            for start in range(0, len(labels), batch_size):
                batch = images[start : start + batch_size]
                yield (
                    batch if cache is None else batch.astype(np.float32),
                    labels[start : start + batch_size],
                )

    spec = (
        tf.TensorSpec((None, size, size, 1), tf.uint8)
        if cache is None
        else tf.TensorSpec((None, *cache.shape), tf.float32),
        tf.TensorSpec((None,), tf.int64),
    )
    steps = sum(-(-s["images"] // batch_size) for s in run.info["shards"][split])
    dataset = tf.data.Dataset.from_generator(one_pass, output_signature=spec)
    # Its length, so Keras neither warns that the input "ran out of data" at the end of
    # every validation nor has to find the end by running into it.
    return dataset.apply(tf.data.experimental.assert_cardinality(steps))
