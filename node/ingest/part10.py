"""Received DICOM files: read with pydicom, checked whole, and the attributes the database keeps.

The ingest path never decodes pixel data. pydicom walks the file's top-level
elements with deferred reads (values over 1 KiB are skipped, not loaded), which
parses every sequence (including VR UN of undefined length, read as implicit VR
per PS3.5 6.2.2) and finds the delimiter of encapsulated pixel data. pydicom
itself is lenient with a file that ends early (it stops at the end of the
file), so the walk also checks that the last element ends exactly where the
file does: a dataset cut anywhere is refused, not stored half.

Every kept value is kept as sent, however long (up to the 1 KiB read: a longer one is
read as absent) and whether or not it conforms to its VR: a PACS that holds it must
be able to send it. UIDs that are not valid DICOM UIDs are kept too; the store never
makes a path of one.
"""

from __future__ import annotations

import math
import struct
import tempfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

_HEADER_KEYWORDS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "BodyPartExamined",
    "SliceThickness",
]
_TAGS = {keyword: int(Tag(keyword)) for keyword in _HEADER_KEYWORDS}
_HEADER_TAGS = frozenset(_TAGS.values())
_UNDEFINED = 0xFFFFFFFF
_DEFER_BYTES = 1024
_INFLATE_CHUNK = 1 << 20
# What reading a malformed file can raise inside pydicom (never a coding error of ours).
_READ_ERRORS = (
    EOFError,
    InvalidDicomError,
    NotImplementedError,
    OSError,
    RecursionError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    struct.error,
)


class DatasetError(ValueError):
    """An encoded dataset that cannot be understood (corrupt, truncated, missing UIDs)."""


class DatasetMismatch(DatasetError):
    """A dataset whose SOP Class is not the one its C-STORE command names."""


class DatasetTooLarge(DatasetError):
    """A dataset over the node's size limit (inflated size for a deflated one)."""


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of a received instance that the database keeps."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_description: str | None
    series_description: str | None
    series_number: int | None
    instance_number: int | None
    body_part_examined: str | None = None
    slice_thickness: float | None = None  # mm


def read_header(path: Path, max_inflated_bytes: int = 2**31) -> InstanceHeader:
    """Check that the Part 10 file at ``path`` is whole and read the attributes kept.

    Raises :class:`DatasetError` naming what is wrong; a deflated dataset that would
    inflate beyond ``max_inflated_bytes`` raises :class:`DatasetTooLarge`.
    """
    with ExitStack() as stack:
        fp: BinaryIO = stack.enter_context(open(path, "rb"))
        meta = _file_meta(fp)
        syntax = str(meta.TransferSyntaxUID)
        if syntax == DeflatedExplicitVRLittleEndian:
            fp = stack.enter_context(_inflated(fp, path.parent, max_inflated_bytes))
        found = _walk(fp, syntax)
    return _header(found, syntax)


def _file_meta(fp: BinaryIO) -> FileMetaDataset:
    try:
        read_preamble(fp, force=False)
        meta = _read_file_meta_info(fp)
    except _READ_ERRORS as exc:
        raise DatasetError(f"the file meta information cannot be read: {exc}") from exc
    if "TransferSyntaxUID" not in meta:
        raise DatasetError("the file meta information has no TransferSyntaxUID")
    return meta


def _inflated(fp: BinaryIO, folder: Path, limit: int):
    """The deflated dataset that follows in ``fp``, inflated into a temp file (at most
    ``limit`` bytes: a small deflated stream can expand ~1000-fold)."""
    out = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (the caller closes it)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while chunk := fp.read(_INFLATE_CHUNK):
            while chunk:
                piece = inflater.decompress(chunk, _INFLATE_CHUNK)
                total += len(piece)
                if total > limit:
                    raise DatasetTooLarge(
                        f"the deflated dataset inflates beyond {limit // 2**20} MB"
                    )
                out.write(piece)
                chunk = inflater.unconsumed_tail
        out.write(inflater.flush())
        if not inflater.eof:
            raise DatasetError("the deflated dataset is truncated")
    except zlib.error as exc:
        out.close()
        raise DatasetError(f"the deflated dataset cannot be inflated: {exc}") from exc
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def _walk(fp: BinaryIO, syntax: str) -> dict[int, RawDataElement]:
    """Walk the top-level elements; return the raw header elements. Raises if not whole."""
    start = fp.tell()
    size = fp.seek(0, 2)
    fp.seek(start)
    if size == start:
        raise DatasetError("the dataset is empty")
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    found: dict[int, RawDataElement] = {}
    end, last = start, None
    try:
        for element in data_element_generator(fp, implicit, little, defer_size=_DEFER_BYTES):
            tag = int(element.tag)
            if element.VR is None and not implicit:
                raise DatasetError(f"invalid VR in {_name(tag)}: not the explicit VR it must be")
            if not isinstance(element, RawDataElement) or element.length == _UNDEFINED:
                end = fp.tell()  # a sequence (pydicom parsed it) or an undefined length
            else:
                end = element.value_tell + element.length
                if end > size:
                    raise DatasetError(
                        f"truncated: {_name(tag)} needs {element.length} bytes, "
                        f"{max(size - element.value_tell, 0)} left"
                    )
            last = tag
            if tag in _HEADER_TAGS:
                found[tag] = element
    except DatasetError:
        raise
    except RecursionError as exc:
        raise DatasetError("sequences nested too deeply to read") from exc
    except _READ_ERRORS as exc:
        raise DatasetError(f"cannot be read after {_name(last)}: {exc}") from exc
    if end != size:
        raise DatasetError(
            f"truncated: {size - end} bytes after {_name(last)} do not form a whole element"
        )
    return found


def _name(tag: int | None) -> str:
    if tag is None:
        return "the start"
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


_PN_DELIMITERS = {0x5E, 0x3D}  # component and group delimiters (PS3.5 6.2.1)
_TEXT_DELIMITERS = {0x5C}  # value delimiter
_CHARSET_TEXT = {"PatientName": _PN_DELIMITERS}  # the rest of the strings below are SH/LO
_CHARSET_KEYWORDS = {
    "AccessionNumber",
    "StudyDescription",
    "SeriesDescription",
    "PatientID",
    "PatientName",
}


def _header(found: dict[int, RawDataElement], syntax: str) -> InstanceHeader:
    """The kept attributes from the raw elements: every one is a string VR, decoded as
    pydicom does (``pydicom.charset`` for the character-set dependent ones), without building
    a ``Dataset`` (half the cost of reading a header)."""

    def raw(keyword: str) -> bytes | None:
        element = found.get(_TAGS[keyword])
        if not isinstance(element, RawDataElement):
            return None  # absent, or not a string where one belongs (a sequence)
        return element.value  # None when deferred (over 1 KiB)

    try:
        charset = raw("SpecificCharacterSet")
        terms = [t.strip(" \x00") for t in charset.decode("ascii").split("\\")] if charset else []
        encodings = convert_encodings(terms or None)
    except (UnicodeDecodeError, LookupError, ValueError):
        encodings = convert_encodings(None)

    def text(keyword: str) -> str | None:
        value = raw(keyword)
        if not value:
            return None
        try:
            if keyword in _CHARSET_KEYWORDS:
                delimiters = _CHARSET_TEXT.get(keyword, _TEXT_DELIMITERS)
                decoded = decode_bytes(value, encodings, delimiters)
            else:
                decoded = value.decode("ascii")
        except (UnicodeDecodeError, LookupError, ValueError):
            return None
        # NUL is padding in DICOM, and PostgreSQL text cannot hold it: drop it anywhere.
        return decoded.replace("\x00", "").strip(" ") or None

    def uid(keyword: str) -> str:
        # Kept as sent even when not a valid DICOM UID (UUID strings, over 64 characters:
        # de-identified sets hold them); the store never makes a path of one (key_for).
        value = text(keyword)
        if not value:
            raise DatasetError(f"the dataset has no {keyword}")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise DatasetError(f"the dataset's {keyword} holds control characters")
        return value

    def integer(keyword: str) -> int | None:
        value = text(keyword)
        try:
            return int(value.split("\\")[0]) if value else None
        except ValueError:
            return None

    def decimal(keyword: str) -> float | None:
        value = text(keyword)
        try:
            number = float(value.split("\\")[0]) if value else None
        except ValueError:
            return None
        return number if number is not None and math.isfinite(number) else None

    return InstanceHeader(
        sop_class_uid=uid("SOPClassUID"),
        sop_instance_uid=uid("SOPInstanceUID"),
        study_instance_uid=uid("StudyInstanceUID"),
        series_instance_uid=uid("SeriesInstanceUID"),
        transfer_syntax_uid=syntax,
        modality=text("Modality"),
        patient_id=text("PatientID"),
        patient_name=text("PatientName"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        accession_number=text("AccessionNumber"),
        study_description=text("StudyDescription"),
        series_description=text("SeriesDescription"),
        series_number=integer("SeriesNumber"),
        instance_number=integer("InstanceNumber"),
        body_part_examined=text("BodyPartExamined"),
        slice_thickness=decimal("SliceThickness"),
    )


def split_part10(data: bytes) -> tuple[FileMetaDataset, bytes]:
    """Split a DICOM Part 10 file into its file meta and the encoded dataset bytes."""
    if data[128:132] != b"DICM":
        raise DatasetError("not a DICOM Part 10 file (no DICM prefix)")
    buffer = BytesIO(data)
    meta = _file_meta(buffer)
    return meta, data[buffer.tell() :]
