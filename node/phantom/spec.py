"""What to generate: PhantomSpec, its validation, the classes and scanner constants."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

import numpy as np

CLASSES = ("covid", "normal", "pneumonia")
_CHARSETS = ("ISO_IR 100", "ISO_IR 192")
_PYTHON_CODECS = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}

# Scanner-like constants.
_Z_TOP = -60.0
_INTERCEPT = -1024
_PADDING_STORED = -2000
_HU_MIN, _HU_MAX = -1024, 3071
_NOISE_SD = 10.0
# A [1, 2, 1] / 4 blur in both directions keeps this fraction of white-noise sd.
_BLUR_NOISE_GAIN = 0.375
_MANUFACTURER = "ainode phantom"


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate: the finding, size, seed and the identifying DICOM attributes.

    Every field is validated on construction; a bad value raises ``ValueError`` naming it.
    ``None`` UIDs are derived deterministically from the other fields, so the same spec
    always yields the same study, series and SOP Instance UIDs.
    """

    finding: str = "normal"
    slices: int = 60
    seed: int = 0
    patient_name: str = "PHANTOM^CHEST"
    patient_id: str = "PH0001"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    accession_number: str = "ACC0001"
    study_description: str = "Tórax Simple"
    series_description: str = "Torax 5mm"
    study_date: str = "20260110"
    study_time: str = "101500"
    charset: str = "ISO_IR 192"
    rows: int = 512
    columns: int = 512

    def __post_init__(self) -> None:
        if self.finding not in CLASSES:
            raise ValueError(f"finding must be one of {', '.join(CLASSES)}, got {self.finding!r}")
        _check_int("slices", self.slices, 1, 600)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("rows", self.rows, 64, 1024)
        _check_int("columns", self.columns, 64, 1024)
        if self.charset not in _CHARSETS:
            raise ValueError(f"charset must be one of {', '.join(_CHARSETS)}, got {self.charset!r}")
        for name, limit in _TEXT_LIMITS.items():
            _check_text(name, getattr(self, name), limit, self.charset)
        if self.patient_sex not in ("M", "F", "O", ""):
            raise ValueError(f"patient_sex must be M, F, O or empty, got {self.patient_sex!r}")
        _check_date("study_date", self.study_date, allow_empty=False)
        _check_date("patient_birth_date", self.patient_birth_date, allow_empty=True)
        if self.patient_birth_date and self.patient_birth_date > self.study_date:
            raise ValueError(
                f"patient_birth_date must not be after study_date {self.study_date}, "
                f"got {self.patient_birth_date!r}"
            )
        _check_time("study_time", self.study_time)
        _check_uid("study_instance_uid", self.study_instance_uid)
        _check_uid("series_instance_uid", self.series_instance_uid)


# Field -> maximum length of its DICOM value representation (PN component group, LO, SH).
_TEXT_LIMITS = {
    "patient_name": 64,
    "patient_id": 64,
    "accession_number": 16,
    "study_description": 64,
    "series_description": 64,
}


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")


def _check_text(name: str, value: object, limit: int, charset: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters, got {value!r}")
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        raise ValueError(
            f"{name} must not contain backslashes or control characters, got {value!r}"
        )
    try:
        value.encode(_PYTHON_CODECS[charset])
    except UnicodeEncodeError:
        raise ValueError(f"{name} cannot be encoded in {charset}, got {value!r}") from None


def _check_date(name: str, value: object, *, allow_empty: bool) -> None:
    if allow_empty and value == "":
        return
    try:
        if not (isinstance(value, str) and re.fullmatch(r"[0-9]{8}", value)):
            raise ValueError
        datetime.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise ValueError(f"{name} must be a date YYYYMMDD, got {value!r}") from None


def _check_time(name: str, value: object) -> None:
    try:
        if not (isinstance(value, str) and re.fullmatch(r"[0-9]{6}", value)):
            raise ValueError
        datetime.datetime.strptime(value, "%H%M%S")
    except ValueError:
        raise ValueError(f"{name} must be a time HHMMSS, got {value!r}") from None


_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def _check_uid(name: str, value: object) -> None:
    if value is None:
        return
    # Checked here rather than with pydicom's UID, which warns as it validates.
    if not (isinstance(value, str) and len(value) <= 64 and _UID_PATTERN.fullmatch(value)):
        raise ValueError(f"{name} must be a valid DICOM UID (at most 64 characters), got {value!r}")
