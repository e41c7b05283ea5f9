"""Read labelled CT slices into :class:`~training.samples.Sample` lists.

Two layouts here: the node's export bundle (:func:`read_export`) and the seed paper's class
folders (:func:`read_class_folders`); COVIDx CT-2A and CT-3A have their own reader in
:mod:`training.covidx`, which shares :class:`DatasetError` and the missing-image check.
Every reader returns absolute paths and a patient key per image, because splits are made by
patient: the seed paper split images at random, which puts slices of one patient in train and
test. :func:`read_patient_keys` reads a list of patients to keep out of every split.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from node.analysis.result import CLASSES
from node.records.export_format import FORMAT as EXPORT_FORMAT
from node.records.export_format import INFO_FILE, MANIFEST_COLUMNS, MANIFEST_FILE
from training.samples import Sample

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Folder names seen in the seed paper and public mirrors, compared lower-case without
# separators, so "Covid_19", "COVID-19", "covid19" and "COVID" are one class.
FOLDER_ALIASES = {
    "covid": "Covid_19",
    "covid19": "Covid_19",
    "normal": "Normal",
    "pneumonia": "Pneumonia",
}


class DatasetError(ValueError):
    """A dataset on disk is not what its reader expects; the message names file and line."""


def read_export(folder: str | os.PathLike) -> list[Sample]:
    """Read a node export bundle (``export.json`` + ``manifest.csv`` + ``images/``)."""
    root = Path(folder).resolve()
    _check_export_format(root / INFO_FILE)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: missing (an export bundle lists its images there)")
    samples, missing = [], []
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise DatasetError(
                f"{manifest}:1: columns must be exactly {','.join(MANIFEST_COLUMNS)}, "
                f"got {','.join(reader.fieldnames or [])}"
            )
        for row in reader:
            where = f"{manifest}:{reader.line_num}"
            path = _inside(root, row["path"], where)
            if not path.is_file():
                missing.append(row["path"])
                continue
            samples.append(_export_sample(row, path, f"export:{root.name}", where))
    _refuse_missing(manifest, missing)
    return samples


def _check_export_format(path: Path) -> None:
    """Refuse a bundle whose ``export.json`` is absent, unreadable or of another format."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (not an ainode export bundle)") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    found = info.get("format") if isinstance(info, dict) else None
    if found != EXPORT_FORMAT:
        raise DatasetError(f"{path}: format {found!r} is not {EXPORT_FORMAT!r}; refusing it")


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refusing absolute paths and anything that leaves ``root``."""
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if not relative or posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise DatasetError(f"{where}: path {relative!r} must be relative to the bundle")
    if ".." in posix.parts or ".." in windows.parts:
        raise DatasetError(f"{where}: path {relative!r} leaves the bundle ('..' refused)")
    path = (root / posix).resolve()
    # A symbolic link inside the bundle could still point outside it.
    if not path.is_relative_to(root):
        raise DatasetError(f"{where}: path {relative!r} resolves outside the bundle")
    return path


def _export_sample(row: dict[str, str], path: Path, source: str, where: str) -> Sample:
    """One manifest row as a sample; bad values become a :class:`DatasetError` at ``where``."""
    if row["label"] not in CLASSES:
        raise DatasetError(f"{where}: label {row['label']!r} is not one of {', '.join(CLASSES)}")
    try:
        index = int(row["slice_index"]) if row["slice_index"] else None
        return Sample(path, row["label"], row["patient"], row["study"], source, index)
    except ValueError as error:
        raise DatasetError(f"{where}: {_reason(error, path)}") from None


def _reason(error: ValueError, path: Path) -> str:
    """The message of a :class:`Sample` error without its path, which ``where`` names."""
    return str(error).removeprefix(f"{path}: ")


def _refuse_missing(listing: Path, missing: list[str]) -> None:
    """Raise naming how many listed images are absent and the first few."""
    if missing:
        first = ", ".join(missing[:5])
        raise DatasetError(f"{listing}: {len(missing)} listed image(s) missing, first: {first}")


def read_class_folders(
    folder: str | os.PathLike, patient_pattern: str | None = None
) -> list[Sample]:
    """Read the seed paper's layout: one folder per class (``Covid_19/``, ``Normal/`` …).

    Parameters
    ----------
    folder
        Holds the class folders; hidden entries and plain files beside them are ignored.
    patient_pattern
        Regular expression with one group, searched in each file name; the group is the
        patient key; a patient's images in one class folder form one study. Without it
        every image is its own patient and study, and a warning is logged: slices of one
        patient may then land in both train and test, as in the seed paper.
    """
    root = Path(folder).resolve()
    pattern = _patient_regex(patient_pattern)
    classes = _class_folders(root)
    if pattern is None:
        logger.warning(
            "%s: no patient_pattern, so every image is its own patient: patient-level "
            "separation of train/val/test cannot be guaranteed",
            root,
        )
    samples = []
    for class_folder, label in classes:
        for path in sorted(class_folder.rglob("*")):
            relative = path.relative_to(root)
            if path.suffix.lower() not in IMAGE_SUFFIXES or _hidden(relative):
                continue
            patient = _patient_from_name(path, pattern, relative)
            # A patient's images in one class folder are taken as one study of that class.
            study = f"{patient}/{label}" if pattern is not None else patient
            samples.append(Sample(path, label, patient, study, f"folders:{root.name}"))
    if not samples:
        raise DatasetError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images in the class folders")
    return samples


def _patient_regex(patient_pattern: str | None) -> re.Pattern[str] | None:
    """Compile ``patient_pattern``, which must have exactly one group."""
    if patient_pattern is None:
        return None
    try:
        pattern = re.compile(patient_pattern)
    except re.error as error:
        raise DatasetError(f"patient_pattern {patient_pattern!r}: {error}") from None
    if pattern.groups != 1:
        raise DatasetError(
            f"patient_pattern {patient_pattern!r} must have exactly one group, "
            f"it has {pattern.groups}"
        )
    return pattern


def _class_folders(root: Path) -> list[tuple[Path, str]]:
    """The class folders under ``root`` with their class; unknown folders are an error."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    found, unknown = [], []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        label = FOLDER_ALIASES.get(re.sub(r"[^a-z0-9]", "", entry.name.lower()))
        if label is None:
            unknown.append(entry.name)
        else:
            found.append((entry, label))
    if unknown:
        raise DatasetError(
            f"{root}: unknown class folder(s) {', '.join(unknown)}; "
            f"expected {', '.join(CLASSES)} (or COVID, covid19, normal, pneumonia)"
        )
    if not found:
        raise DatasetError(f"{root}: no class folders ({', '.join(CLASSES)})")
    return found


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _patient_from_name(path: Path, pattern: re.Pattern[str] | None, relative: Path) -> str:
    """The patient key of one class-folder image (its own path without a pattern)."""
    if pattern is None:
        return relative.with_suffix("").as_posix()
    match = pattern.search(path.name)
    if match is None or not match.group(1):
        raise DatasetError(f"{path}: file name does not match patient_pattern {pattern.pattern!r}")
    return match.group(1)


def read_patient_keys(path: str | os.PathLike) -> set[str]:
    """Patient keys listed in a text file, one per line; ``#`` starts a comment.

    The keys are those the readers give :attr:`Sample.patient`: COVIDx ``metadata.csv``
    patient ids (``COVIDCTMD-P001``), export pseudonyms, class-folder pattern groups.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (patient keys to exclude, one per line)") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 text file of patient keys") from None
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        key = line.split("#", 1)[0].strip()
        if len(key.split()) > 1:
            raise DatasetError(f"{path}:{number}: {key!r} is not one patient key (one per line)")
        if key:
            keys.add(key)
    if not keys:
        raise DatasetError(f"{path}: no patient keys (one per line; '#' starts a comment)")
    return keys
