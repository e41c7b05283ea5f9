"""Transfer syntaxes: lossless re-encoding of datasets and writing a series as Part 10 files."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from node.phantom.dicom import generate_series
from node.phantom.spec import PhantomSpec

TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": str(ExplicitVRLittleEndian),
    "implicit": str(ImplicitVRLittleEndian),
    "jpeg-lossless": str(JPEGLosslessSV1),
    "jpeg-ls": str(JPEGLSLossless),
    "jpeg2000": str(JPEG2000Lossless),
    "rle": str(RLELossless),
}

# pydicom encoder plugin per compressed syntax; JPEG Lossless SV1 goes through DCMTK instead.
_ENCODING_PLUGINS = {
    RLELossless: "pydicom",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
}


def _syntax_uid(transfer_syntax: str) -> UID:
    """A short name or UID from TRANSFER_SYNTAXES, as a UID."""
    if transfer_syntax in TRANSFER_SYNTAXES:
        return UID(TRANSFER_SYNTAXES[transfer_syntax])
    if transfer_syntax in TRANSFER_SYNTAXES.values():
        return UID(transfer_syntax)
    names = ", ".join(TRANSFER_SYNTAXES)
    raise ValueError(
        f"transfer_syntax must be one of {names} or their UIDs, got {transfer_syntax!r}"
    )


def _syntax_name(transfer_syntax: str) -> str:
    uid = _syntax_uid(transfer_syntax)
    return next(name for name, value in TRANSFER_SYNTAXES.items() if value == uid)


def _dcmcjpeg() -> str:
    path = shutil.which("dcmcjpeg")
    if path is None:
        raise RuntimeError("jpeg-lossless needs DCMTK's dcmcjpeg (apt-get install dcmtk)")
    return path


def _run_dcmcjpeg(tool: str, source: Path, target: Path) -> None:
    # Process 14 selection value 1 with the true-lossless codec; keep the SOP Instance UID
    # because a lossless re-encoding is the same image.
    command = [tool, "--encode-lossless-sv1", "--true-lossless", "--uid-never", source, target]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dcmcjpeg failed on {source.name}: {done.stderr.strip()}")


def encode_dataset(ds: Dataset, transfer_syntax: str) -> Dataset:
    """A copy of ``ds`` in ``transfer_syntax`` (short name or UID), losslessly.

    Compressed input is decoded first. RLE, JPEG-LS and JPEG 2000 use pydicom's encoders;
    JPEG Lossless SV1 uses DCMTK's ``dcmcjpeg`` (``RuntimeError`` when it is missing).
    The SOP Instance UID is kept: the pixels are unchanged.
    """
    uid = _syntax_uid(transfer_syntax)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        raise ValueError("ds must have file_meta with a TransferSyntaxUID")
    out = copy.deepcopy(ds)
    if out.file_meta.TransferSyntaxUID.is_compressed:
        out.decompress(generate_instance_uid=False)
    if uid == JPEGLosslessSV1:
        tool = _dcmcjpeg()
        with tempfile.TemporaryDirectory(prefix="phantom-") as tmp:
            source, target = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
            out.save_as(source, enforce_file_format=True)
            _run_dcmcjpeg(tool, source, target)
            return dcmread(target)
    if uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = uid
        return out
    out.compress(uid, encoding_plugin=_ENCODING_PLUGINS[uid], generate_instance_uid=False)
    return out


def write_series(spec: PhantomSpec, out_dir: Path, transfer_syntax: str = "explicit") -> list[Path]:
    """Write one Part 10 file per slice as ``NNNN.dcm`` (Instance Number) under ``out_dir``."""
    uid = _syntax_uid(transfer_syntax)
    tool = _dcmcjpeg() if uid == JPEGLosslessSV1 else None  # fail before the slow part
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = generate_series(spec)
    paths = [out_dir / f"{ds.InstanceNumber:04d}.dcm" for ds in datasets]
    if tool is None:
        for ds, path in zip(datasets, paths, strict=True):
            encode_dataset(ds, uid).save_as(path, enforce_file_format=True)
        return paths
    with tempfile.TemporaryDirectory(prefix="phantom-") as tmp:
        sources = [Path(tmp) / path.name for path in paths]
        for ds, source in zip(datasets, sources, strict=True):
            ds.save_as(source, enforce_file_format=True)
        # One dcmcjpeg process per file; they are independent, so run them side by side.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(
                pool.map(lambda pair: _run_dcmcjpeg(tool, *pair), zip(sources, paths, strict=True))
            )
    return paths
