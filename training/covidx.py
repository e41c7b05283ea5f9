"""Read COVIDx CT-2A or CT-3A as published into :class:`~training.samples.Sample` lists.

:func:`read_covidx` keeps the official train/val/test splits and takes the label from each
split-file line's class number; :func:`covidx_variant` finds which release a folder holds.
Patient and study keys come from the file names (:data:`COVIDX_NAME_RULES`, checked against
``metadata.csv``), and a warning names patients found in more than one official split.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import defaultdict
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from training.datasets import DatasetError, _reason, _refuse_missing
from training.samples import SPLITS, Sample

logger = logging.getLogger(__name__)

COVIDX_CLASSES = {0: "Normal", 1: "Pneumonia", 2: "Covid_19"}
# The releases read, newest first: each has <split>_COVIDx_CT-<variant>.txt and
# <variant>_images/ (the Kaggle download's layout).
COVIDX_VARIANTS = ("3A", "2A")
COVIDX_PATIENT_COLUMN = "patient id"

# COVIDx file names per source, as written by COVIDNet-CT's dataset_construction/ and keyed as
# in its metadata.csv "patient id" column: (pattern, patient key, study key or None = the file
# stem without its trailing slice number). CT-3A adds COVID-CT-MD, STOIC and Stony Brook; its
# metadata.csv lists them as COVIDCTMD-P001 / -cap001 / -normal001, STOIC-<pid> and A<6 digits>.
COVIDX_NAME_RULES = tuple(
    (re.compile(pattern), patient, study)
    for pattern, patient, study in (
        # COVID-CT-MD (covid_ct_md.py): COVIDCTMD-<case folder>-<DICOM file stem>, e.g.
        # COVIDCTMD-cap004-IM0070, COVIDCTMD-normal075-IM0031; one scan per patient.
        (r"^(?P<p>COVIDCTMD-[A-Za-z]+\d+)-", r"\g<p>", r"\g<p>"),
        # STOIC (stoic.py): STOIC-<pid>-<slice>, e.g. STOIC-10011-0103; one scan per patient.
        (r"^(?P<p>STOIC-\d+)-\d+$", r"\g<p>", r"\g<p>"),
        # Stony Brook COVID-19-NY-SBU, a TCIA collection (stonybrook.py):
        # <pid>-<study folder, spaces as '-'>-<series number>-<slice>, e.g.
        # A002304-01-12-1901-NA-CT-CHEST-PULMONARY-ANGIO-WITH-IV-CON-70694-4-0039. Taken from
        # the script and its stonybrook_metadata.csv: the released train split, the only one
        # with these slices, was not available to check against.
        (r"^(?P<p>A\d{6})-(?P<s>\d\d-\d\d-\d{4}-.+)-\d+-\d+$", r"\g<p>", r"\g<p>-\g<s>"),
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


def covidx_split_files(variant: str) -> dict[str, str]:
    """The official split files of a COVIDx CT release, e.g. ``train_COVIDx_CT-3A.txt``."""
    return {split: f"{split}_COVIDx_CT-{variant}.txt" for split in SPLITS}


def covidx_variant(folder: str | os.PathLike, variant: str = "auto") -> str:
    """Which COVIDx CT release ``folder`` holds, ``"2A"`` or ``"3A"``.

    ``"auto"`` looks at which release's split files are there (and, if both are, which one is
    complete or has its ``<variant>_images/`` folder); a variant given is only checked.
    """
    if variant != "auto":
        if variant not in COVIDX_VARIANTS:
            choices = ", ".join(("auto", *sorted(COVIDX_VARIANTS)))
            raise DatasetError(f"COVIDx variant {variant!r} is not one of {choices}")
        return variant
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    present = {
        v: [(root / n).is_file() for n in covidx_split_files(v).values()] for v in COVIDX_VARIANTS
    }
    found = [v for v in COVIDX_VARIANTS if any(present[v])]
    if len(found) > 1:  # both releases' files: the complete one, else the one with its images
        complete = [v for v in found if all(present[v])]
        with_images = [v for v in found if (root / f"{v}_images").is_dir()]
        found = next(
            (narrower for narrower in (complete, with_images) if len(narrower) == 1), found
        )
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(
            f"{root}: holds split files of both COVIDx CT-2A and CT-3A; choose one "
            "(--covidx-variant 2A or 3A)"
        )
    looked = "; ".join(
        f"{', '.join(covidx_split_files(v).values())} (CT-{v})" for v in COVIDX_VARIANTS
    )
    raise DatasetError(f"{root}: no COVIDx split files; looked for {looked}")


def read_covidx(
    folder: str | os.PathLike,
    split_files: dict[str, str | os.PathLike] | None = None,
    use_box: bool = True,
    variant: str = "auto",
) -> list[Sample]:
    """Read COVIDx CT-2A or CT-3A as published, keeping its official train/val/test splits.

    Parameters
    ----------
    folder
        Holds the split files, ``metadata.csv`` and ``<variant>_images/`` (or ``images/``, or
        the images themselves).
    split_files
        ``{split: path}``, relative to ``folder`` or absolute; default the release's three
        ``<split>_COVIDx_CT-<variant>.txt`` files. Each line is ``filename class xmin ymin xmax
        ymax``; the label comes from the class number (0 Normal, 1 Pneumonia, 2 COVID-19),
        never from the file name.
    use_box
        Keep each line's lung box in :attr:`Sample.box`.
    variant
        ``"2A"``, ``"3A"`` or ``"auto"`` (found from the folder by :func:`covidx_variant`).

    Notes
    -----
    Patient and study keys are parsed from the file name by :data:`COVIDX_NAME_RULES` (the
    source naming schemes and the "patient id" format of COVIDx's ``metadata.csv``), and a
    warning counts parsed patients that ``metadata.csv`` does not list. A name no rule knows
    takes the longest ``metadata.csv`` patient id it starts with; failing that, the file stem
    without its trailing slice number is both patient and study; such names are counted in
    one warning.
    """
    root = Path(folder).resolve()
    if split_files is None:
        variant = covidx_variant(root, variant)
        split_files = covidx_split_files(variant)
    elif variant != "auto":
        variant = covidx_variant(root, variant)
    images = _covidx_image_folder(root, None if variant == "auto" else variant)
    known = _covidx_patient_ids(root / "metadata.csv")
    source = f"covidx:{root.name}"
    samples, missing, unparsed, unlisted = [], [], [], set()
    for split, name in split_files.items():
        if split not in SPLITS:
            raise DatasetError(f"split_files: {split!r} is not one of {', '.join(SPLITS)}")
        listing = root / name
        if not listing.is_file():
            raise DatasetError(f"{listing}: missing (COVIDx {split} split file)")
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                where = f"{listing}:{number}"
                sample, how = _covidx_sample(line, where, images, split, use_box, known)
                samples.append(replace(sample, source=source))
                if not sample.path.is_file():
                    missing.append(f"{sample.path.name} ({listing.name}:{number})")
                if how is None:
                    unparsed.append(sample.path.name)
                elif how == "rule" and known and sample.patient not in known:
                    unlisted.add(sample.patient)
    _refuse_missing(images, missing)
    _warn_unknown_names(root, unparsed, sorted(unlisted))
    _warn_cross_split_patients(root, samples)
    return samples


def _covidx_image_folder(root: Path, variant: str | None) -> Path:
    """Where COVIDx keeps its images: ``<variant>_images/``, else ``images/``, else ``root``."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    variants = (variant,) if variant else COVIDX_VARIANTS
    for name in (*(f"{v}_images" for v in variants), "images"):
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
) -> tuple[Sample, str | None]:
    """One split-file line as a sample, and what knew its file name (see :func:`_keys_by`)."""
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
    patient, study, how = _keys_by(stem, known)
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
        return sample, how
    except ValueError as error:
        raise DatasetError(f"{where}: {_reason(error, images / name)}") from None


def covidx_keys(stem: str, known: Collection[str] = ()) -> tuple[str, str, bool]:
    """``(patient, study, parsed)`` for a COVIDx file stem; ``parsed`` is False on fallback."""
    patient, study, how = _keys_by(stem, known)
    return patient, study, how is not None


def _keys_by(stem: str, known: Collection[str]) -> tuple[str, str, str | None]:
    """``(patient, study, how)``: ``how`` is ``"rule"``, ``"metadata"`` or None (fallback)."""
    without_slice = re.sub(r"[-_]\d+$", "", stem) or stem
    for pattern, patient, study in COVIDX_NAME_RULES:
        match = pattern.search(stem)
        if match:
            return match.expand(patient), match.expand(study) if study else without_slice, "rule"
    prefixes = [key for key in known if re.match(re.escape(key) + r"(?:[-_]|$)", stem)]
    if prefixes:
        return max(prefixes, key=len), without_slice, "metadata"
    return without_slice, without_slice, None


def _warn_unknown_names(root: Path, unparsed: list[str], unlisted: list[str]) -> None:
    """One warning for the names no rule knows, one for parsed patients metadata.csv lacks."""
    if unparsed:
        logger.warning(
            "%s: %d file name(s) follow no known COVIDx scheme (first: %s); their patient key "
            "is the name without its slice number",
            root,
            len(unparsed),
            ", ".join(unparsed[:3]),
        )
    if unlisted:
        logger.warning(
            "%s: %d patient key(s) parsed from file names are not in metadata.csv's %r column "
            "(first: %s)",
            root,
            len(unlisted),
            COVIDX_PATIENT_COLUMN,
            ", ".join(unlisted[:3]),
        )


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
