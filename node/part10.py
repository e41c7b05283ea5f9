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

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
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
_HEADER_TAGS = [Tag(keyword) for keyword in _HEADER_KEYWORDS]


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


def check_complete(dataset_bytes: bytes, transfer_syntax_uid: str) -> None:
    """Raise :class:`DatasetError` unless the encoded dataset is structurally whole."""
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


class _Walker:
    """Walks element headers without reading values; raises on anything that does not fit."""

    def __init__(self, data: bytes, explicit: bool, endian: str) -> None:
        self.data, self.explicit, self.endian = data, explicit, endian

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
    """Check the encoded dataset and read the attributes the database keeps."""
    check_complete(dataset_bytes, transfer_syntax_uid)
    try:
        ds = _read_plain(dataset_bytes, UID(transfer_syntax_uid))
    except Exception as exc:  # pydicom raises many types for bad bytes; all mean "cannot parse"
        raise DatasetError(f"the dataset cannot be parsed: {exc}") from exc
    return _header_from(ds, transfer_syntax_uid)


def _read_plain(dataset_bytes: bytes, syntax: UID) -> Dataset:
    data = dataset_bytes
    if syntax == DeflatedExplicitVRLittleEndian:
        data = zlib.decompress(dataset_bytes, -zlib.MAX_WBITS)
    is_implicit = syntax == ImplicitVRLittleEndian
    is_little = syntax != ExplicitVRBigEndian
    ds = read_dataset(
        BytesIO(data), is_implicit, is_little, stop_when=_stop_at_pixels, specific_tags=_HEADER_TAGS
    )
    ds.set_original_encoding(is_implicit, is_little)
    return ds


def _stop_at_pixels(tag, vr, length) -> bool:
    return tag >= 0x7FE00010


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _header_from(ds: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = ds.get(keyword)
        if not value:
            raise DatasetError(f"the dataset has no {keyword}")
        try:
            uids[keyword] = check_uid(str(value), keyword)
        except ValueError as exc:
            raise DatasetError(str(exc)) from exc
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        modality=_text(ds, "Modality"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
    )


def file_meta_bytes(header: InstanceHeader, source_ae: str | None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group for a received dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.sop_class_uid
    meta.MediaStorageSOPInstanceUID = header.sop_instance_uid
    meta.TransferSyntaxUID = header.transfer_syntax_uid
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


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
