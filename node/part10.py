"""Encoded DICOM datasets: completeness check, header attributes and Part 10 file meta.

The ingest path never decodes pixel data: it checks that the encoded dataset is
structurally whole (every element's value fits, every undefined length is
closed), reads the header attributes the database needs, and writes the bytes
exactly as received behind a File Meta Information header.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from node import __version__
from node.store import check_uid

IMPLEMENTATION_CLASS_UID = (
    "2.25.147690549933150919621629165827312306498"  # a UUID-derived UID (2.25), fixed for ainode
)
IMPLEMENTATION_VERSION_NAME = f"AINODE_{__version__}"[:16]

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_UV = {b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
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
]
_TAG = {keyword: int(Tag(keyword)) for keyword in _HEADER_KEYWORDS}
_HEADER_TAG_SET = frozenset(_TAG.values())
_PN_DELIMITERS = frozenset({0x5E, 0x3D})  # "^" and "=" separate PN components and groups


class DatasetError(ValueError):
    """An encoded dataset that cannot be understood (corrupt, truncated, missing UIDs)."""


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


def check_complete(dataset_bytes: bytes, transfer_syntax_uid: str) -> dict[int, bytes]:
    """Raise :class:`DatasetError` unless the encoded dataset is structurally whole.

    Returns the raw values of the top-level header elements the database keeps.
    """
    if not dataset_bytes:
        raise DatasetError("the dataset is empty")
    data = dataset_bytes
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(dataset_bytes, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise DatasetError(f"the deflated dataset cannot be inflated: {exc}") from exc
    walker = _Walker(
        data,
        explicit=transfer_syntax_uid != ImplicitVRLittleEndian,
        endian=">" if transfer_syntax_uid == ExplicitVRBigEndian else "<",
    )
    walker.dataset(0, len(data), nested=False)
    return walker.found


class _Walker:
    """Walks element headers without reading values; raises on anything that does not fit."""

    def __init__(self, data: bytes, explicit: bool, endian: str) -> None:
        self.data, self.explicit, self.endian = data, explicit, endian
        self.found: dict[int, bytes] = {}

    def _tag_length(self, pos: int) -> tuple[int, bytes | None, int, int]:
        data, end = self.data, len(self.data)
        if pos + 8 > end:
            raise DatasetError(f"truncated: element header at byte {pos} is cut off")
        group, element = struct.unpack_from(self.endian + "HH", data, pos)
        tag = group << 16 | element
        if self.explicit and group != 0xFFFE:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS or vr in _UV:
                if pos + 12 > end:
                    raise DatasetError(f"truncated: header of ({group:04X},{element:04X}) cut off")
                (length,) = struct.unpack_from(self.endian + "L", data, pos + 8)
                return tag, vr, length, pos + 12
            if not vr.isalpha() or not vr.isupper():
                raise DatasetError(f"invalid VR {vr!r} in ({group:04X},{element:04X})")
            (length,) = struct.unpack_from(self.endian + "H", data, pos + 6)
            return tag, vr, length, pos + 8
        (length,) = struct.unpack_from(self.endian + "L", data, pos + 4)
        return tag, None, length, pos + 8

    def dataset(self, pos: int, end: int, nested: bool) -> int:
        """Walk elements from ``pos``; a nested dataset stops at an item delimiter."""
        previous = -1
        while pos < end:
            tag, vr, length, pos = self._tag_length(pos)
            if tag == _ITEM_END and nested:
                return pos
            if tag >> 16 == 0xFFFE:
                raise DatasetError(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if tag <= previous:
                raise DatasetError(f"elements out of order at ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            previous = tag
            if length == _UNDEFINED:
                pos = self.sequence(pos, end)
            elif pos + length > end:
                raise DatasetError(
                    f"truncated: ({tag >> 16:04X},{tag & 0xFFFF:04X}) needs {length} bytes, "
                    f"{end - pos} left"
                )
            else:
                if not nested and tag in _HEADER_TAG_SET:
                    self.found[tag] = self.data[pos : pos + length]
                pos += length
        if nested:
            raise DatasetError("truncated: an item of undefined length is not closed")
        return pos

    def sequence(self, pos: int, end: int) -> int:
        """Walk items (or pixel data fragments) up to the sequence delimiter."""
        while True:
            tag, _vr, length, pos = self._tag_length(pos)
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise DatasetError(f"expected an item in a sequence, got tag {tag:08X}")
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, nested=True)
            elif pos + length > end:
                raise DatasetError(f"truncated: an item needs {length} bytes, {end - pos} left")
            else:
                pos += length


def read_header(dataset_bytes: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Check the encoded dataset and read the attributes the database keeps.

    One pass over the element headers does both; values are decoded with the
    dataset's Specific Character Set.
    """
    found = check_complete(dataset_bytes, transfer_syntax_uid)
    charset = found.get(_TAG["SpecificCharacterSet"], b"").decode("ascii", "replace")
    encodings = convert_encodings([term.strip(" \x00") for term in charset.split("\\")])

    def text(keyword: str, delimiters: frozenset = frozenset()) -> str | None:
        raw = found.get(_TAG[keyword])
        if raw is None:
            return None
        return decode_bytes(raw, encodings, delimiters).strip(" \x00") or None

    def uid(keyword: str) -> str:
        raw = found.get(_TAG[keyword], b"").rstrip(b"\x00 ").decode("ascii", "replace")
        if not raw:
            raise DatasetError(f"the dataset has no {keyword}")
        try:
            return check_uid(raw, keyword)
        except ValueError as exc:
            raise DatasetError(str(exc)) from exc

    def integer(keyword: str) -> int | None:
        value = text(keyword)
        try:
            return int(value.split("\\")[0]) if value else None
        except ValueError:
            return None

    return InstanceHeader(
        sop_class_uid=uid("SOPClassUID"),
        sop_instance_uid=uid("SOPInstanceUID"),
        study_instance_uid=uid("StudyInstanceUID"),
        series_instance_uid=uid("SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        modality=text("Modality"),
        patient_id=text("PatientID"),
        patient_name=text("PatientName", _PN_DELIMITERS),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        accession_number=text("AccessionNumber"),
        study_description=text("StudyDescription"),
        series_description=text("SeriesDescription"),
        series_number=integer("SeriesNumber"),
        instance_number=integer("InstanceNumber"),
    )


def _short_element(tag: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def file_meta_bytes(header: InstanceHeader, source_ae: str | None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group for a received dataset.

    Encoded by hand (explicit VR little endian, as PS3.10 fixes it): the same
    bytes pydicom's ``write_file_meta_info`` gives, in a hundredth of its time,
    which is paid on every received instance.
    """
    elements = (
        struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2)
        + b"\x00\x01"
        + _short_element(0x00020002, b"UI", header.sop_class_uid.encode("ascii"), b"\x00")
        + _short_element(0x00020003, b"UI", header.sop_instance_uid.encode("ascii"), b"\x00")
        + _short_element(0x00020010, b"UI", header.transfer_syntax_uid.encode("ascii"), b"\x00")
        + _short_element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")
        + _short_element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")
    )
    if source_ae:
        elements += _short_element(0x00020016, b"AE", source_ae.encode("ascii", "replace"), b" ")
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(elements))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def split_part10(data: bytes) -> tuple[FileMetaDataset, bytes]:
    """Split a DICOM Part 10 file into its file meta and the encoded dataset bytes."""
    if data[128:132] != b"DICM":
        raise DatasetError("not a DICOM Part 10 file (no DICM prefix)")
    try:
        buffer = BytesIO(data)
        read_preamble(buffer, force=False)
        meta = _read_file_meta_info(buffer)
    except Exception as exc:  # any failure to read the meta group means the file is unusable
        raise DatasetError(f"the file meta information cannot be read: {exc}") from exc
    if "TransferSyntaxUID" not in meta:
        raise DatasetError("the file meta information has no TransferSyntaxUID")
    return meta, data[buffer.tell() :]
