"""Prepared runs: labelled samples → balanced, augmented, fixed-size uint8 shards on disk.

The seed paper trained on "super-batches" of 15,000 images because the whole set did not fit
in memory. Here the super-batch is a shard file: ``prepare`` streams the images from disk into
shards of ``shard_size`` images, and fitting reads one shard at a time (a checkpoint after
each), so memory stays flat however large the set is.

A prepared run folder holds::

    prepare.json           format, classes, image size, counts, manifest hash, options
    samples.csv            every source image with its split (training.samples columns)
    shards/train-00000.npz images (n, size, size, 1) uint8, labels, rows, augmented
    shards/val-00000.npz   ... never augmented, never balanced
    shards/test-00000.npz
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from node import atomic
from node.analysis.result import CLASSES
from training.augment import AugmentOptions, augment_image
from training.samples import SPLITS, Sample, read_samples, sha256_of, write_samples

FORMAT = "ainode-prepared/1"
PREPARE_FILE, SAMPLES_FILE, SHARD_DIR = "prepare.json", "samples.csv", "shards"


class PrepareError(ValueError):
    """The samples cannot be made into a run (an unreadable image, an empty split …)."""


@dataclass(frozen=True)
class PrepareOptions:
    """How samples become shards."""

    image_size: int = 512
    shard_size: int = 2000
    balance: bool = True
    crop: bool = True
    seed: int = 0
    augment: AugmentOptions = AugmentOptions()

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 32..1024, got {self.image_size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


@dataclass(frozen=True)
class Entry:
    """One image of a shard: a row of samples.csv, and which augmented copy (0 = original)."""

    row: int
    copy: int = 0


def load_image(sample: Sample, size: int, crop: bool = True) -> np.ndarray:
    """The sample's image as ``(size, size)`` uint8 grey (cropped to its box when asked)."""
    try:
        with Image.open(sample.path) as picture:
            picture = picture.convert("L")
            if crop and sample.box is not None:
                picture = picture.crop(sample.box)
            image = np.asarray(picture, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise PrepareError(f"{sample.path}: not a readable image ({exc})") from exc
    return resize_like_the_model(image, size)


def resize_like_the_model(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` at ``(size, size)`` by the model's own resize (bilinear, no antialiasing).

    The model resizes whatever it is given with Keras' ``Resizing``; an image made smaller
    another way (PIL's antialiased filter, say) has a different texture at the same size, and
    a model trained on it reads the node's slices worse.
    """
    if image.shape == (size, size):
        return image
    import tensorflow as tf

    resized = tf.image.resize(image[..., np.newaxis], (size, size), method="bilinear")
    return np.clip(np.round(resized.numpy()[..., 0]), 0, 255).astype(np.uint8)


def plan_split(samples: list[Sample], rows: list[int], balance: bool, seed: int) -> list[Entry]:
    """The shuffled entries of one split; with ``balance``, augmented copies of the smaller
    classes until every class has as many images as the largest."""
    rng = np.random.default_rng(seed)
    entries = [Entry(row) for row in rows]
    if balance:
        by_class: dict[str, list[int]] = {}
        for row in rows:
            by_class.setdefault(samples[row].label, []).append(row)
        target = max(len(members) for members in by_class.values())
        for members in by_class.values():
            order = rng.permutation(members).tolist()
            for extra in range(target - len(members)):
                entries.append(Entry(order[extra % len(order)], copy=1 + extra // len(order)))
    permutation = rng.permutation(len(entries))
    return [entries[i] for i in permutation]


def _shard_sizes(total: int, shard_size: int) -> list[int]:
    """Split ``total`` into the fewest shards of at most ``shard_size``, sizes within one."""
    count = max(1, -(-total // shard_size))
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def _render(samples: list[Sample], entry: Entry, options: PrepareOptions) -> np.ndarray:
    image = load_image(samples[entry.row], options.image_size, options.crop)
    if entry.copy:
        rng = np.random.default_rng([options.seed, entry.row, entry.copy])
        image = augment_image(image, rng, options.augment)
    return image


def write_shard(path: Path, images: np.ndarray, labels, rows, augmented) -> None:
    """Write one shard atomically (temp file, fsync, rename)."""
    with atomic.atomic_open(path) as handle:
        np.savez(
            handle,
            images=images[..., np.newaxis],
            labels=np.asarray(labels, dtype=np.int64),
            rows=np.asarray(rows, dtype=np.int64),
            augmented=np.asarray(augmented, dtype=bool),
        )


def prepare(
    samples: list[Sample],
    out: str | os.PathLike,
    options: PrepareOptions = PrepareOptions(),
    sources: list[dict] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write a prepared run for ``samples`` (each with its split) into ``out``; return its
    ``prepare.json``."""
    out = Path(out)
    if (out / PREPARE_FILE).exists():
        raise PrepareError(f"{out}: already a prepared run (choose another folder)")
    _check_samples(samples)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_samples(samples, out / SAMPLES_FILE)
    shards: dict[str, list[dict]] = {}
    for split_number, split in enumerate(SPLITS):
        rows = [i for i, s in enumerate(samples) if s.split == split]
        balance = options.balance and split == "train"  # never touch validation or test
        entries = plan_split(samples, rows, balance, options.seed + split_number)
        if split != "train":
            entries.sort(key=lambda e: e.row)  # evaluation reads them in samples order
        shards[split] = _write_split(samples, entries, split, out, options, progress)
    info = {
        "format": FORMAT,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "classes": list(CLASSES),
        "image_size": options.image_size,
        "options": {**asdict(options), "augment": asdict(options.augment)},
        "sources": sources or [],
        "manifest_sha256": sha256_of(out / SAMPLES_FILE),
        "counts": {split: _class_counts(samples, split) for split in SPLITS},
        "patients": {
            split: len({s.patient for s in samples if s.split == split}) for split in SPLITS
        },
        "shards": shards,
    }
    # Written last: its presence means the run is whole.
    atomic.write_text(out / PREPARE_FILE, json.dumps(info, indent=2) + "\n")
    return info


def _check_samples(samples: list[Sample]) -> None:
    if not samples:
        raise PrepareError("no samples to prepare")
    missing = [s.path for s in samples if s.split is None]
    if missing:
        raise PrepareError(f"{len(missing)} samples have no split (first: {missing[0]})")
    patients: dict[str, str] = {}
    for s in samples:
        if patients.setdefault(s.patient, s.split) != s.split:
            raise PrepareError(
                f"patient {s.patient} is in both {patients[s.patient]} and {s.split}"
            )
    for split in ("train", "val"):
        if not any(s.split == split for s in samples):
            raise PrepareError(f"the {split} split is empty")


def _write_split(samples, entries, split, out, options, progress) -> list[dict]:
    written, start = [], 0
    for number, size in enumerate(_shard_sizes(len(entries), options.shard_size)):
        chunk = entries[start : start + size]
        start += size
        if not chunk:
            continue
        images = np.empty((len(chunk), options.image_size, options.image_size), dtype=np.uint8)
        for i, entry in enumerate(chunk):
            images[i] = _render(samples, entry, options)
            if progress is not None:
                progress(1)
        labels = [CLASSES.index(samples[e.row].label) for e in chunk]
        name = f"{split}-{number:05d}.npz"
        write_shard(
            out / SHARD_DIR / name,
            images,
            labels,
            [e.row for e in chunk],
            [e.copy > 0 for e in chunk],
        )
        written.append(
            {"file": name, "images": len(chunk), "augmented": sum(e.copy > 0 for e in chunk)}
        )
    return written


def _class_counts(samples: list[Sample], split: str) -> dict[str, int]:
    counts = Counter(s.label for s in samples if s.split == split)
    return {name: counts.get(name, 0) for name in CLASSES}


@dataclass(frozen=True)
class PreparedRun:
    """A prepared run folder, read back."""

    folder: Path
    info: dict

    @classmethod
    def open(cls, folder: str | os.PathLike) -> PreparedRun:
        """Open ``folder``; a clear error when it is not a whole prepared run."""
        folder = Path(folder)
        try:
            info = json.loads((folder / PREPARE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise PrepareError(
                f"{folder}: no {PREPARE_FILE} (run `ainode train prepare` first)"
            ) from exc
        if info.get("format") != FORMAT:
            raise PrepareError(f"{folder}: format {info.get('format')!r}, expected {FORMAT!r}")
        return cls(folder, info)

    def shard_files(self, split: str) -> list[Path]:
        """The shard files of ``split`` in order."""
        return [self.folder / SHARD_DIR / s["file"] for s in self.info["shards"][split]]

    def images(self, split: str) -> int:
        """How many images the shards of ``split`` hold."""
        return sum(s["images"] for s in self.info["shards"][split])

    def samples(self) -> list[Sample]:
        """Every source sample (rows of samples.csv)."""
        return read_samples(self.folder / SAMPLES_FILE)

    def read_shards(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """The shards of ``split`` one at a time (only one is in memory)."""
        for path in self.shard_files(split):
            with np.load(path) as shard:
                yield {key: shard[key] for key in shard.files}
