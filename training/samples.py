"""One labelled training image and the CSV it is listed in: the contract between datasets,
splits, shards and evaluation."""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from node.analysis.result import CLASSES

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """A labelled 2-D image on disk.

    ``patient`` is what splits are made by (no patient in two splits); ``study`` is what
    study-level evaluation aggregates over. Both are opaque keys: salted hashes in a node
    export, public IDs in COVIDx. ``box`` is a crop ``(xmin, ymin, xmax, ymax)`` in pixels of
    the file, applied when preparing if asked for.
    """

    path: Path
    label: str
    patient: str
    study: str
    source: str
    slice_index: int | None = None
    box: tuple[int, int, int, int] | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if self.label not in CLASSES:
            raise ValueError(f"{self.path}: label {self.label!r} is not one of {CLASSES}")
        if not self.patient or not self.study:
            raise ValueError(f"{self.path}: empty patient or study key")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"{self.path}: split {self.split!r} is not one of {SPLITS}")
        if self.box is not None:
            xmin, ymin, xmax, ymax = self.box
            if not (0 <= xmin < xmax and 0 <= ymin < ymax):
                raise ValueError(f"{self.path}: crop box {self.box} is empty or negative")

    def with_split(self, split: str) -> Sample:
        """The same sample assigned to ``split``."""
        return replace(self, split=split)


COLUMNS = tuple(f.name for f in fields(Sample))


def write_samples(samples: list[Sample], path: str | os.PathLike) -> None:
    """Write ``samples`` as CSV (one row per image, the columns of :class:`Sample`)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for s in samples:
            box = "" if s.box is None else " ".join(str(v) for v in s.box)
            index = "" if s.slice_index is None else s.slice_index
            row = (s.path, s.label, s.patient, s.study, s.source, index, box, s.split or "")
            writer.writerow(row)


def read_samples(path: str | os.PathLike) -> list[Sample]:
    """Read a CSV written by :func:`write_samples`."""
    samples = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            box = tuple(int(v) for v in row["box"].split()) if row["box"] else None
            samples.append(
                Sample(
                    path=Path(row["path"]),
                    label=row["label"],
                    patient=row["patient"],
                    study=row["study"],
                    source=row["source"],
                    slice_index=int(row["slice_index"]) if row["slice_index"] else None,
                    box=box,
                    split=row["split"] or None,
                )
            )
    return samples


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed (weights files are tens of MB)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
