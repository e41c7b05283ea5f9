"""Read labelled CT slices into :class:`~training.samples.Sample` lists.

Three layouts: the node's export bundle (:func:`read_export`), the seed paper's class folders
(:func:`read_class_folders`) and COVIDx CT-2 as published (:func:`read_covidx`). Every reader
returns absolute paths and a patient key per image, because splits are made by patient: the
seed paper split images at random, which puts slices of one patient in train and test.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path, PurePosixPath, PureWindowsPath

from node.analysis.result import CLASSES
from node.records.export_format import FORMAT as EXPORT_FORMAT
from node.records.export_format import INFO_FILE, MANIFEST_COLUMNS, MANIFEST_FILE
from training.samples import SPLITS, Sample

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

COVIDX_CLASSES = {0: "Normal", 1: "Pneumonia", 2: "Covid_19"}
COVIDX_SPLIT_FILES = {split: f"{split}_COVIDx_CT-2A.txt" for split in SPLITS}
COVIDX_IMAGE_FOLDERS = ("2A_images", "images", ".")
COVIDX_PATIENT_COLUMN = "patient id"

# COVIDx file names per source, as written by COVIDNet-CT's dataset_construction/ and keyed as
# in its metadata.csv "patient id" column: (pattern, patient key, study key or None = the file
# stem without its trailing slice number).
COVIDX_NAME_RULES = tuple(
    (re.compile(pattern), patient, study)
    for pattern, patient, study in (
        # CNCB: <NCP|CP|Normal>_<patient>_<scan>_<slice>, e.g. NCP_96_1328_0032
        (r"^(?P<p>(?:NCP|CP|Normal)_\d+)_(?P<s>\d+)_\d+$", r"\g<p>", r"\g<p>_\g<s>"),
        # COVID-CTset: 137covid_patient100_SR_2_IM00028
        (r"(?:^|_)(?P<p>patient\d+)_(?P<s>SR_\d+)_", r"\g<p>", r"\g<p>_\g<s>"),
        # TCIA and COVID-19-20: volume-covid19-A-0698_ct-0017, volume-covid19-A-0047_1_ct-0012;
        # the suffixes are further scans of the same TCIA patient.
        (r"^(?P<p>volume-covid19-A-\d+)", r"\g<p>", None),
        # iCTCF: HUST-Patient1314-0348
        (r"^(?P<p>HUST-Patient\d+)-\d+$", r"\g<p>", None),
        # LIDC-IDRI: LIDC-IDRI-0273-<series instance uid>-0093
        (r"^(?P<p>LIDC-IDRI-\d+)-", r"\g<p>", None),
        # Radiopaedia stacks: radiopaedia-<case rID>-<study>-<stack>-<slice>
        (r"^(?P<p>radiopaedia-\d+)-(?P<s>\d+)-", r"\g<p>", r"\g<p>-\g<s>"),
        # Radiopaedia segmentation cases: radiopaedia_10_85902_1-0123
        (r"^(?P<p>radiopaedia_\d+_\d+)_", r"\g<p>", None),
        # coronacases.org: coronacases_org_001-0123 (metadata: coronacases_001)
        (r"^coronacases_(?:org_)?(?P<n>\d+)", r"coronacases_\g<n>", None),
        # MosMedData (CT-2B): study_0255-0012
        (r"^(?P<p>study_\d+)", r"\g<p>", None),
    )
)


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


def read_covidx(
    folder: str | os.PathLike,
    split_files: dict[str, str | os.PathLike] | None = None,
    use_box: bool = True,
) -> list[Sample]:
    """Read COVIDx CT-2 as published, keeping its official train/val/test splits.

    Parameters
    ----------
    folder
        Holds ``2A_images/`` (or ``images/``, or the images themselves), the split files and
        ``metadata.csv``.
    split_files
        ``{split: path}``, relative to ``folder`` or absolute; default the three
        ``<split>_COVIDx_CT-2A.txt`` files. Each line is ``filename class xmin ymin xmax ymax``;
        the label comes from the class number (0 Normal, 1 Pneumonia, 2 COVID-19), never from
        the file name.
    use_box
        Keep each line's lung box in :attr:`Sample.box`.

    Notes
    -----
    Patient and study keys are parsed from the file name by :data:`COVIDX_NAME_RULES` (the
    source naming schemes and the "patient id" format of COVIDx's ``metadata.csv``). A name no
    rule knows takes the longest ``metadata.csv`` patient id it starts with; failing that, the
    file stem without its trailing slice number is both patient and study, with a warning.
    """
    root = Path(folder).resolve()
    images = _covidx_image_folder(root)
    known = _covidx_patient_ids(root / "metadata.csv")
    files = split_files if split_files is not None else COVIDX_SPLIT_FILES
    source = f"covidx:{root.name}"
    samples, missing, unparsed = [], [], []
    for split, name in files.items():
        if split not in SPLITS:
            raise DatasetError(f"split_files: {split!r} is not one of {', '.join(SPLITS)}")
        listing = root / name
        if not listing.is_file():
            raise DatasetError(f"{listing}: missing (COVIDx {split} split file)")
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                where = f"{listing}:{number}"
                sample, parsed = _covidx_sample(line, where, images, split, use_box, known)
                samples.append(replace(sample, source=source))
                if not sample.path.is_file():
                    missing.append(f"{sample.path.name} ({listing.name}:{number})")
                if not parsed:
                    unparsed.append(sample.path.name)
    _refuse_missing(images, missing)
    if unparsed:
        logger.warning(
            "%s: %d file name(s) follow no known COVIDx scheme (first: %s); their patient key "
            "is the name without its slice number",
            root,
            len(unparsed),
            ", ".join(unparsed[:3]),
        )
    _warn_cross_split_patients(root, samples)
    return samples


def _covidx_image_folder(root: Path) -> Path:
    """Where COVIDx keeps its images: ``2A_images/``, else ``images/``, else ``root``."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    for name in COVIDX_IMAGE_FOLDERS:
        if (root / name).is_dir():
            return (root / name).resolve()
    return root


def _covidx_patient_ids(metadata: Path) -> set[str]:
    """Patient ids from COVIDx's ``metadata.csv``, if present and in the published layout."""
    if not metadata.is_file():
        logger.warning("%s: missing; patient keys come from file names alone", metadata)
        return set()
    with open(metadata, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if COVIDX_PATIENT_COLUMN not in (reader.fieldnames or []):
            logger.warning("%s: no %r column; not used", metadata, COVIDX_PATIENT_COLUMN)
            return set()
        return {row[COVIDX_PATIENT_COLUMN].strip() for row in reader} - {""}


def _covidx_sample(
    line: str, where: str, images: Path, split: str, use_box: bool, known: set[str]
) -> tuple[Sample, bool]:
    """One split-file line as a sample, and whether a naming rule knew its file name."""
    fields = line.split()
    if len(fields) != 6:
        raise DatasetError(f"{where}: expected 'filename class xmin ymin xmax ymax', got {line!r}")
    name, number, *box_text = fields
    if "/" in name or "\\" in name or name.startswith("."):
        raise DatasetError(f"{where}: file name {name!r} must be a plain name in the image folder")
    if number not in {str(n) for n in COVIDX_CLASSES}:
        classes = ", ".join(f"{n} {label}" for n, label in COVIDX_CLASSES.items())
        raise DatasetError(f"{where}: unknown class number {number!r} (COVIDx: {classes})")
    try:
        box = tuple(int(value) for value in box_text)
    except ValueError:
        raise DatasetError(f"{where}: box {' '.join(box_text)!r} is not four integers") from None
    stem = Path(name).stem
    patient, study, parsed = covidx_keys(stem, known)
    index = re.search(r"(\d+)$", stem)
    try:
        sample = Sample(
            path=images / name,
            label=COVIDX_CLASSES[int(number)],
            patient=patient,
            study=study,
            source="covidx",
            slice_index=int(index.group(1)) if index else None,
            box=box if use_box else None,
            split=split,
        )
        return sample, parsed
    except ValueError as error:
        raise DatasetError(f"{where}: {_reason(error, images / name)}") from None


def covidx_keys(stem: str, known: Collection[str] = ()) -> tuple[str, str, bool]:
    """``(patient, study, parsed)`` for a COVIDx file stem; ``parsed`` is False on fallback."""
    without_slice = re.sub(r"[-_]\d+$", "", stem) or stem
    for pattern, patient, study in COVIDX_NAME_RULES:
        match = pattern.search(stem)
        if match:
            return match.expand(patient), match.expand(study) if study else without_slice, True
    prefixes = [key for key in known if re.match(re.escape(key) + r"(?:[-_]|$)", stem)]
    if prefixes:
        return max(prefixes, key=len), without_slice, True
    return without_slice, without_slice, False


def _warn_cross_split_patients(root: Path, samples: list[Sample]) -> None:
    """Warn when a patient key is in two official splits (COVIDx says none is)."""
    splits = defaultdict(set)
    for sample in samples:
        splits[sample.patient].add(sample.split)
    crossing = sorted(patient for patient, found in splits.items() if len(found) > 1)
    if crossing:
        logger.warning(
            "%s: %d patient(s) appear in more than one official split (first: %s)",
            root,
            len(crossing),
            ", ".join(crossing[:5]),
        )
