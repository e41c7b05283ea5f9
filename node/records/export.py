"""The de-identified export bundle: labelled studies as windowed PNG slices for training.

A bundle is ``images/<Class>/<key>.png``, ``manifest.csv`` (one row per image) and
``export.json``. The slices are chosen and windowed by the functions inference uses
(:func:`~node.analysis.eligible_series`, :func:`~node.analysis.windowed_lung_slices`) with
the node's analysis settings, so training sees what inference sees. Patients, studies,
series and instances appear only as salted keys (HMAC-SHA256); the salt never leaves the node.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from node import __version__, atomic
from node.analysis import imaging
from node.analysis.analyze import (
    AnalysisError,
    AnalysisOptions,
    eligible_series,
    windowed_lung_slices,
)
from node.analysis.result import CLASSES
from node.records import routing
from node.records.db import Instance, Label, Series, Study
from node.records.export_format import (
    FORMAT,
    IMAGES_FOLDER,
    INFO_FILE,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
)
from node.records.labels import (
    LabelConflict,
    check_keyword,
    classify_keywords,
    effective_keyword_classes,
)
from node.settings import Settings

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
SOURCE = "ainode-export"
KEY_HEX_CHARS = 32
SALT_FILE = "export_salt"
MIN_SALT_LENGTH = 16

Progress = Callable[[int, int], None]
"""Called after each study with (studies done, studies in all)."""


@dataclass
class ExportSummary:
    """What an export wrote: images and studies per class, patients, skipped studies, and
    instances left out because their pixel data is too large to decode (study and instance
    keys and the reason)."""

    out_dir: Path
    images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    studies: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    patients: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_instances: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The counts as export.json has them, plus where the bundle is."""
        return {
            "out_dir": str(self.out_dir),
            "images": dict(self.images),
            "studies": dict(self.studies),
            "patients": self.patients,
            "skipped": list(self.skipped),
            "skipped_instances": list(self.skipped_instances),
        }


class Pseudonymizer:
    """Salted keys: HMAC-SHA256 of a value, hex, truncated to :data:`KEY_HEX_CHARS`."""

    def __init__(self, salt: bytes) -> None:
        if len(salt) < MIN_SALT_LENGTH:
            raise ValueError(f"the export salt must be at least {MIN_SALT_LENGTH} bytes")
        self._salt = salt

    def key(self, value: str) -> str:
        """The salted key of ``value`` (the same value and salt always give the same key)."""
        digest = hmac.new(self._salt, value.encode("utf-8"), hashlib.sha256)
        return digest.hexdigest()[:KEY_HEX_CHARS]


def export_salt(settings: Settings) -> bytes:
    """``Settings.export_salt``, else the node's own salt, made once in ``data_dir`` (0600).

    A stable salt keeps a patient's key the same across exports, so training can split
    by patient over several exports.
    """
    if settings.export_salt:
        return settings.export_salt.encode("utf-8")
    path = settings.data_dir / SALT_FILE
    if not path.exists():
        # made once, 0600, never replaced: two first exports agree on one salt (a salt lost
        # in a crash would re-key later exports, so it is synced)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.create_exclusive(path, (secrets.token_hex(32) + "\n").encode("ascii"))
    salt = path.read_text(encoding="ascii").strip()
    if len(salt) < MIN_SALT_LENGTH:
        raise RuntimeError(
            f"the export salt in {path} is shorter than {MIN_SALT_LENGTH} characters"
        )
    return salt.encode("ascii")


@dataclass(frozen=True)
class LabelFilter:
    """Which labels select a study for export (all when every field is None).

    The export and the web UI's preview of it both select through this, so they agree.
    """

    keywords: frozenset[str] | None  # case-folded
    since: datetime | None
    until: datetime | None = None  # exclusive

    @classmethod
    def of(
        cls,
        keywords: Sequence[str] | None,
        since: date | datetime | None = None,
        until: date | datetime | None = None,
    ) -> LabelFilter:
        """Keywords (case-insensitive), labelled from ``since`` to the end of ``until`` (UTC)."""
        folded = frozenset(k.casefold() for k in keywords) if keywords is not None else None
        return cls(folded, _as_utc(since), _end_utc(until))

    def selects(self, keyword: str, created_at: datetime) -> bool:
        """Whether one label (its keyword and when it was put) selects its study."""
        if self.keywords is not None and keyword.casefold() not in self.keywords:
            return False
        if self.until is not None and created_at >= self.until:
            return False
        return self.since is None or created_at >= self.since


class _Skip(Exception):
    """A study that is not exported; the reason carries no PHI. ``refused``: its instances
    too large to decode (SOP Instance UID → reason), as :class:`_Slices` has them."""

    def __init__(self, reason: str, refused: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.refused = refused or {}


@dataclass
class _Slices:
    """The exported slices of one study."""

    label: str
    keyword: str
    datasets: list[Dataset]
    frames: list[tuple[Dataset, int]]
    pixels: np.ndarray
    refused: dict[str, str] = field(default_factory=dict)  # too large to decode: not exported


def export_bundle(
    node: Node,
    out_dir: Path,
    keywords: Sequence[str] | None = None,
    since: date | datetime | None = None,
    progress: Progress | None = None,
    until: date | datetime | None = None,
) -> ExportSummary:
    """Export the node's labelled studies as a new bundle folder ``out_dir``.

    Parameters
    ----------
    node
        The node (settings, database, store).
    out_dir
        A folder that does not exist yet or is empty. The bundle is written beside it
        under a hidden name and renamed at the end, so a crash leaves no half bundle.
    keywords
        Only studies carrying one of these keywords (case-insensitive); None: any label.
    since
        Only studies labelled at or after this date (UTC midnight) or time.
    progress
        Called after each study with (done, total).
    until
        Only studies labelled before the end of this date (UTC) or before this time.

    A study is exported by its full labels once a label selects it. Its class comes from
    the labels of the series inference evaluates when that series has a class or exclude
    keyword, else from the study's labels.

    Raises
    ------
    FileExistsError
        When ``out_dir`` exists and is not an empty folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    wanted = None if keywords is None else [check_keyword(k) for k in keywords]
    selection = LabelFilter.of(wanted, since, until)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.partial"
    temp.mkdir()
    try:
        with node.session_factory() as session:
            mapping = effective_keyword_classes(node.settings, session)  # one for the bundle
        summary = _write_bundle(node, temp, selection, mapping, progress)
        info = _export_info(node.settings, mapping, summary, wanted, (since, until))
        _write_text(temp / INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above; replace cannot take a folder's place
        os.replace(temp, out_dir)  # a folder: node.atomic renames files only
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    atomic.fsync_folder(out_dir.parent)
    summary.out_dir = out_dir
    return summary


def _as_utc(since: date | datetime | None) -> datetime | None:
    if since is None:
        return None
    if not isinstance(since, datetime):
        return datetime.combine(since, time.min, tzinfo=UTC)
    return since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)


def _end_utc(until: date | datetime | None) -> datetime | None:
    """The exclusive end of ``until``: the next UTC midnight for a date."""
    if until is not None and not isinstance(until, datetime):
        return datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC)
    return _as_utc(until)


def _write_bundle(
    node: Node,
    folder: Path,
    selection: LabelFilter,
    mapping: Mapping[str, str | None],
    progress: Progress | None,
) -> ExportSummary:
    """Write the images and the manifest of every selected study into ``folder``."""
    keys = Pseudonymizer(export_salt(node.settings))
    with node.session_factory() as session:  # the series the analysis would read
        options = routing.options_with_rules(session, node.settings)
    summary = ExportSummary(folder)
    patients: set[str] = set()
    rows: list[dict] = []
    studies = _selected_studies(node, selection)
    for done, (study_uid, labels) in enumerate(studies, start=1):
        try:
            chosen = _study_slices(node, study_uid, labels, options, mapping)
        except _Skip as skip:
            summary.skipped.append({"study": keys.key(study_uid), "reason": str(skip)})
            _note_refused(summary, keys, study_uid, skip.refused)
        else:
            _note_refused(summary, keys, study_uid, chosen.refused)
            patient = _patient_key(keys, chosen.datasets[0], study_uid)
            rows += _write_images(folder, keys, chosen, study_uid, patient, options)
            summary.images[chosen.label] += len(chosen.frames)
            summary.studies[chosen.label] += 1
            patients.add(patient)
        if progress is not None:
            progress(done, len(studies))
    summary.patients = len(patients)
    _write_manifest(folder / MANIFEST_FILE, rows)
    return summary


def _note_refused(
    summary: ExportSummary, keys: Pseudonymizer, study_uid: str, refused: Mapping[str, str]
) -> None:
    """Record (and log, by key) the instances left out as too large to decode."""
    study = keys.key(study_uid)
    for sop_uid, reason in refused.items():
        instance = keys.key(sop_uid)
        summary.skipped_instances.append({"study": study, "instance": instance, "reason": reason})
        log.warning("export: instance %s of study %s left out: %s", instance, study, reason)


def _selected_studies(node: Node, selection: LabelFilter) -> list[tuple[str, list[Label]]]:
    """(Study Instance UID, all its labels) of the studies a label selects, oldest first."""
    with node.session_factory() as session:
        rows = session.execute(
            select(Label, Study.study_instance_uid)
            .join(Study, Label.study_id == Study.id)
            .order_by(Study.id, Label.id)
        ).all()
    by_study: dict[str, list[Label]] = {}
    for label, study_uid in rows:
        by_study.setdefault(study_uid, []).append(label)
    return [
        (uid, labels)
        for uid, labels in by_study.items()
        if any(selection.selects(label.keyword, label.created_at) for label in labels)
    ]


def _study_slices(
    node: Node,
    study_uid: str,
    labels: list[Label],
    options: AnalysisOptions,
    mapping: Mapping[str, str | None],
) -> _Slices:
    """The label and lung slices of a study, or :class:`_Skip` saying why it has none."""
    with node.session_factory() as session:
        removed = session.scalar(
            select(Study.pixels_removed_at).where(Study.study_instance_uid == study_uid)
        )
        if removed is not None:  # its files keep headers only (node.workflow.retention)
            raise _Skip("pixel data removed by retention")
        instances = session.execute(
            select(Instance.store_key, Series.id, Series.series_instance_uid)
            .join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Instance.id)
        ).all()
    series_ids = {series_uid: series_id for _key, series_id, series_uid in instances}
    if not any(label.series_id is not None for label in labels):
        _label(labels, None, mapping)  # skip excluded studies before reading pixels
    paths = [node.store.path(key) for key, *_ in instances]
    try:
        # never decodes a bomb; the series the rules choose
        datasets, skipped = eligible_series(paths, options.limits, options.choose_series)
    except AnalysisError as exc:
        raise _Skip("no usable CT series", _too_large(exc.skipped)) from None
    except (InvalidDicomError, OSError):
        raise _Skip("stored instance files cannot be read") from None
    refused = _too_large(skipped)
    series_id = series_ids[str(datasets[0].SeriesInstanceUID)]
    try:
        label, keyword = _label(labels, series_id, mapping)
    except _Skip as skip:
        raise _Skip(str(skip), refused) from None
    try:
        frames, pixels = windowed_lung_slices(datasets, options)
    except AnalysisError:
        raise _Skip("no lung-bearing slices", refused) from None
    except imaging.ImagingError:
        raise _Skip("pixel data cannot be read", refused) from None
    return _Slices(label, keyword, datasets, frames, pixels, refused)


def _too_large(skipped: Mapping[str, str]) -> dict[str, str]:
    """The skipped instances whose pixel data is too large to decode, with the reason."""
    return {uid: why for uid, why in skipped.items() if why.startswith(imaging.TOO_LARGE)}


def _label(
    labels: list[Label], series_id: int | None, mapping: Mapping[str, str | None]
) -> tuple[str, str]:
    """(class, keyword) for a series: its own labels when they decide, else the study's."""
    on_series = [x.keyword for x in labels if series_id is not None and x.series_id == series_id]
    on_study = [x.keyword for x in labels if x.series_id is None]
    try:
        label, keyword = classify_keywords(on_series, mapping)
        if keyword is None:  # the series' own labels are only plain tags, or there are none
            label, keyword = classify_keywords(on_study, mapping)
    except LabelConflict as conflict:
        raise _Skip(str(conflict)) from None
    if label is None:
        raise _Skip("excluded from training" if keyword else "no class keyword")
    return label, keyword


def _patient_key(keys: Pseudonymizer, ds: Dataset, study_uid: str) -> str:
    patient_id = str(ds.get("PatientID", "") or "").strip()
    # Without a Patient ID the study stands alone: pooling every anonymous study under one
    # key would put unrelated patients on one side of a split.
    return keys.key(patient_id if patient_id else f"study:{study_uid}")


def _write_images(
    folder: Path,
    keys: Pseudonymizer,
    chosen: _Slices,
    study_uid: str,
    patient: str,
    options: AnalysisOptions,
) -> list[dict]:
    """Write a study's PNGs under ``images/<Class>/`` and return their manifest rows."""
    class_folder = folder / IMAGES_FOLDER / chosen.label
    class_folder.mkdir(parents=True, exist_ok=True)
    positions = _head_first_positions(chosen.datasets)
    study, series = keys.key(study_uid), keys.key(str(chosen.datasets[0].SeriesInstanceUID))
    rows = []
    for (ds, frame), pixels in zip(chosen.frames, chosen.pixels, strict=True):
        sop_uid = str(ds.SOPInstanceUID)
        multi_frame = int(ds.get("NumberOfFrames", 1) or 1) > 1
        instance = keys.key(f"{sop_uid}:{frame + 1}" if multi_frame else sop_uid)
        path = class_folder / f"{instance}.png"
        path.write_bytes(imaging.to_png_bytes(pixels))
        rows.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "label": chosen.label,
                "keyword": chosen.keyword,
                "patient": patient,
                "study": study,
                "series": series,
                "instance": instance,
                "slice_index": positions[id(ds)] + frame,
                "window_center": f"{options.window.center:g}",
                "window_width": f"{options.window.width:g}",
                "source": SOURCE,
            }
        )
    return rows


def _head_first_positions(datasets: Iterable[Dataset]) -> dict[int, int]:
    """Index of each instance's first frame in the series' head-first order of frames."""
    positions, position = {}, 0
    for ds in datasets:
        positions[id(ds)] = position
        position += int(ds.get("NumberOfFrames", 1) or 1)
    return positions


def _write_manifest(path: Path, rows: list[dict]) -> None:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, out.getvalue())


def _export_info(
    settings: Settings,
    mapping: Mapping[str, str | None],
    summary: ExportSummary,
    keywords: list[str] | None,
    labelled: tuple[date | datetime | None, date | datetime | None],
) -> dict:
    """The contents of export.json (``labelled``: the since and until of the labels)."""
    since, until = labelled
    return {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "node_version": __version__,
        "preprocessing_version": imaging.PREPROCESSING_VERSION,
        "keywords": keywords,
        "since": since.isoformat() if since is not None else None,
        "until": until.isoformat() if until is not None else None,
        "keyword_classes": dict(mapping),
        "window": {"center": settings.window_center, "width": settings.window_width},
        "counts": {
            "images": dict(summary.images),
            "studies": dict(summary.studies),
            "patients": summary.patients,
        },
        "skipped": summary.skipped,
        "skipped_instances": summary.skipped_instances,
    }


def _write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)
