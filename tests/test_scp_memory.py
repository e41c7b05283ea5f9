"""The SCP's memory stays flat while large multi-frame objects arrive (datasets go to disk).

A slow test (~1 min on 2 cores, ~4 GB of disk under tmp_path, removed at the end):
the node runs as ``ainode scp`` in its own process, so the resident set measured is
the node's alone, and four DCMTK storescu processes each push a distinct ~500 MiB
Enhanced CT (1000 frames of 512x512, 16 bits) at once. Held in memory the four
datasets would take at least 2 GB; spooled to disk as they arrive the node's
resident set grows by a few tens of MB at most.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import EnhancedCTImageStorage
from sqlalchemy import select

from node.records.db import Instance
from node.runtime import build_node
from tests.config import write_config
from tests.peers import echoscu, stop_process, storescu, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SENDERS = 4
FRAMES = 1000  # 1000 frames of 512 x 512 x 16 bits: 500 MiB of pixel data per instance
ROWS = COLUMNS = 512
MAX_GROWTH_MB = 150  # the node's resident set may grow this much while receiving


def enhanced_ct_header(sop_instance_uid: str, study_uid: str, series_uid: str) -> Dataset:
    """The attributes of a multi-frame CT, without its pixel data (written after it)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientName = "MEMORY^FLAT"
    ds.PatientID = "MEM-0001"
    ds.StudyDate = "20250101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "MEM0001"
    ds.StudyDescription = "Tórax Simple"
    ds.SeriesDescription = "multi-frame push"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = FRAMES
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    return ds


def write_multiframe(path: Path, header: Dataset) -> int:
    """Write ``header`` then FRAMES frames of int16 pixel data, a few MB at a time."""
    dcmwrite(path, header, enforce_file_format=True)
    rng = np.random.default_rng(7)
    frame = rng.integers(-1024, 3000, size=(ROWS, COLUMNS), dtype=np.int16).tobytes()
    length = len(frame) * FRAMES
    chunk = frame * 16
    with path.open("ab") as out:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for start in range(0, FRAMES, 16):
            out.write(chunk if FRAMES - start >= 16 else frame * (FRAMES - start))
    return path.stat().st_size


def copy_with_uid(source: Path, target: Path, old_uid: str, new_uid: str) -> None:
    """A copy of ``source`` whose SOP Instance UID (same length) is ``new_uid``."""
    assert len(old_uid) == len(new_uid)
    shutil.copyfile(source, target)
    with target.open("r+b") as out:
        head = out.read(4096)
        assert head.count(old_uid.encode()) == 2  # file meta and dataset
        out.seek(0)
        out.write(head.replace(old_uid.encode(), new_uid.encode()))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler(threading.Thread):
    """The peak resident set of a process, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_kib(pid)
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, rss_kib(self.pid))
                self.samples += 1


def push_concurrently(port: int, files: list[Path], log_path: Path, pid: int) -> dict:
    """Push ``files`` at once (one storescu each), sampling the node's RSS meanwhile."""
    before = rss_kib(pid)
    sampler = RssSampler(pid)
    sampler.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(len(files)) as pool:
            results = list(
                pool.map(lambda path: storescu("127.0.0.1", port, [path], timeout=300), files)
            )
    finally:
        sampler.halt.set()
        sampler.join()
    seconds = time.monotonic() - started
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr + log_path.read_text()
    return {
        "before": before,
        "peak": sampler.peak,
        "after": rss_kib(pid),
        "seconds": seconds,
        "samples": sampler.samples,
    }


def test_scp_memory_stays_flat_while_four_senders_push_500mb_each(make_settings, tmp_path):
    settings = make_settings()
    sources = tmp_path / "sources"
    sources.mkdir()
    try:
        started = time.monotonic()
        root = f"2.25.{uuid.uuid4().int}"
        uids = [f"{root}.{index + 1}" for index in range(SENDERS)]
        files = [sources / f"mf{index}.dcm" for index in range(SENDERS)]
        size = write_multiframe(files[0], enhanced_ct_header(uids[0], f"{root}.8", f"{root}.9"))
        for index in range(1, SENDERS):
            copy_with_uid(files[0], files[index], uids[0], uids[index])
        written = time.monotonic() - started

        config = write_config(settings, tmp_path / "node.toml")
        log_path = tmp_path / "node.log"
        with log_path.open("ab") as log:
            node = subprocess.Popen(
                [sys.executable, "-m", "ainode.cli", "--config", str(config), "scp"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            started = time.monotonic()
            wait_for_port("127.0.0.1", settings.dicom_port, timeout=60)
            warm = echoscu("127.0.0.1", settings.dicom_port, calling_ae="ECHOSCU")
            assert warm.returncode == 0, warm.stdout + warm.stderr + log_path.read_text()
            start = time.monotonic() - started
            time.sleep(0.5)
            push = push_concurrently(settings.dicom_port, files, log_path, node.pid)
        finally:
            stop_process(node, timeout=30)

        growth_mb = (push["peak"] - push["before"]) / 1024
        print(
            f"\nnode RSS: {push['before'] / 1024:.0f} MB before, peak {push['peak'] / 1024:.0f}"
            f" MB (+{growth_mb:.0f} MB), {push['after'] / 1024:.0f} MB after "
            f"({push['samples']} samples); {SENDERS} x {size / 2**20:.0f} MiB pushed in "
            f"{push['seconds']:.1f} s ({SENDERS * size / 2**20 / push['seconds']:.0f} MiB/s); "
            f"files written in {written:.1f} s, node started in {start:.1f} s"
        )
        built = build_node(settings)
        try:
            with built.session_factory() as session:
                stored = {
                    r.sop_instance_uid: r.size_bytes for r in session.scalars(select(Instance))
                }
            kept = [p for p in built.store.root.rglob("*") if p.is_file()]
        finally:
            built.close()
        assert sorted(stored) == sorted(uids)
        assert all(abs(stored_size - size) < 4096 for stored_size in stored.values()), stored
        assert len(kept) == SENDERS, kept
        assert growth_mb < MAX_GROWTH_MB, f"node RSS grew {growth_mb:.0f} MB while receiving"
    finally:
        shutil.rmtree(sources, ignore_errors=True)
        shutil.rmtree(settings.data_dir, ignore_errors=True)
