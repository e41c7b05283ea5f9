"""Sanity checks that the real peer helpers in tests/peers.py start, talk DICOM and stop."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.peers import (
    LOOPBACK,
    OrthancServer,
    echoscu,
    free_port,
    getscu,
    start_orthanc,
    start_postgres,
    stop_process,
    storescp,
    storescu,
)


def _alive(pid: int) -> bool:
    """True when pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def make_ct(study_uid: str, series_uid: str, number: int) -> Dataset:
    """Build a tiny 16x16 CT slice (explicit VR LE, complete file meta)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Peers^Test"
    ds.PatientID = "PEERS-1"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    pixels = (np.arange(256, dtype=np.int16).reshape(16, 16) * 4 - 500 + number).astype(np.int16)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture
def ct_study(tmp_path: Path) -> tuple[str, Path]:
    """Write a 3-slice CT study; return (StudyInstanceUID, folder)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    folder = tmp_path / "study"
    folder.mkdir()
    for number in (1, 2, 3):
        make_ct(study_uid, series_uid, number).save_as(
            folder / f"ct{number}.dcm", enforce_file_format=True
        )
    return study_uid, folder


@pytest.fixture
def orthanc(tmp_path: Path):
    """A fresh Orthanc for one test (killed afterwards: a clean stop costs ~3.5 s)."""
    server = start_orthanc(tmp_path / "orthanc")
    yield server
    server.stop(kill=True)


def test_orthanc_starts_with_dicomweb(orthanc: OrthancServer) -> None:
    """Orthanc answers /system and lists the DICOMweb plugin."""
    assert "dicom-web" in orthanc.get("/plugins")
    system = orthanc.get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.http_url.startswith("http://127.0.0.1:")


def test_upload_and_qido(orthanc: OrthancServer, ct_study: tuple[str, Path]) -> None:
    """Uploaded instances show up in REST and in QIDO-RS."""
    study_uid, folder = ct_study
    assert orthanc.upload_dir(folder) == 3
    assert len(orthanc.instances()) == 3
    study_id = orthanc.find_study(study_uid)
    assert study_id in orthanc.studies()
    assert orthanc.find_study(generate_uid()) is None
    resp = requests.get(
        orthanc.dicomweb_url + "/studies",
        headers={"Accept": "application/dicom+json"},
        timeout=10,
    )
    resp.raise_for_status()
    uids = [study["0020000D"]["Value"][0] for study in resp.json()]
    assert uids == [study_uid]
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    series = client.search_for_series(study_instance_uid=study_uid)
    assert series[0]["00201209"]["Value"] == [3]


def test_echoscu_to_orthanc(orthanc: OrthancServer) -> None:
    """C-ECHO to Orthanc succeeds from an unknown AE."""
    result = echoscu(LOOPBACK, orthanc.dicom_port, calling_ae="ECHOSCU", called_ae=orthanc.aet)
    assert result.returncode == 0, result.stdout + result.stderr


def test_storescu_to_storescp_keeps_syntax(tmp_path: Path, ct_study: tuple[str, Path]) -> None:
    """storescu sends plain and compressed files unchanged to a DCMTK storescp."""
    study_uid, folder = ct_study
    ds = pydicom.dcmread(folder / "ct2.dcm")
    ds.compress(JPEGLSLossless)
    ds.save_as(folder / "ct2.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(folder / "ct3.dcm")
    ds.compress(RLELossless)
    ds.save_as(folder / "ct3.dcm", enforce_file_format=True)
    sent = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).file_meta.TransferSyntaxUID
        for p in folder.glob("*.dcm")
    }
    port = free_port()
    out = tmp_path / "received"
    scp = storescp(port, out, aet="STORESCP")
    try:
        result = storescu(LOOPBACK, port, folder, called_ae="STORESCP")
        assert result.returncode == 0, result.stdout + result.stderr
        single = storescu(LOOPBACK, port, [folder / "ct2.dcm"], called_ae="STORESCP")
        assert single.returncode == 0, single.stdout + single.stderr
    finally:
        stop_process(scp)
    assert not _alive(scp.pid)
    received = {}
    for path in out.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        received[ds.SOPInstanceUID] = ds.file_meta.TransferSyntaxUID
        assert ds.StudyInstanceUID == study_uid
    assert received == sent


def test_getscu_from_orthanc(
    orthanc: OrthancServer, ct_study: tuple[str, Path], tmp_path: Path
) -> None:
    """C-GET of a study from Orthanc once the calling AE is a known modality."""
    study_uid, folder = ct_study
    orthanc.upload_dir(folder)
    orthanc.add_modality("getscu", "GETSCU", LOOPBACK, free_port())
    out = tmp_path / "got"
    result = getscu(
        LOOPBACK,
        orthanc.dicom_port,
        calling_ae="GETSCU",
        called_ae=orthanc.aet,
        study_instance_uid=study_uid,
        out_dir=out,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    files = [p for p in out.iterdir() if p.is_file()]
    assert len(files) == 3
    assert {pydicom.dcmread(p).StudyInstanceUID for p in files} == {study_uid}


def test_orthanc_store_to_modality(
    orthanc: OrthancServer, ct_study: tuple[str, Path], tmp_path: Path
) -> None:
    """Orthanc C-STOREs a study to a runtime-registered storescp."""
    study_uid, folder = ct_study
    orthanc.upload_dir(folder)
    port = free_port()
    scp = storescp(port, tmp_path / "pushed", aet="PUSHED")
    try:
        orthanc.add_modality("pushed", "PUSHED", LOOPBACK, port)
        answer = orthanc.store_to_modality("pushed", [orthanc.find_study(study_uid)])
        assert answer["InstancesCount"] == 3
    finally:
        stop_process(scp)
    assert len(list((tmp_path / "pushed").glob("*.dcm"))) == 3


def test_orthanc_stop_leaves_no_process(tmp_path: Path) -> None:
    """stop() ends Orthanc; a context manager does the same; stop() is idempotent."""
    started = time.monotonic()
    with start_orthanc(tmp_path / "o", modalities={"AINODE": ("AINODE", LOOPBACK, 11112)}) as srv:
        elapsed = time.monotonic() - started
        assert srv.get("/modalities") == ["AINODE"]
        pid = srv.process.pid
    assert elapsed < 30
    assert srv.process.returncode is not None
    assert not _alive(pid)
    srv.stop()


@pytest.mark.postgres
def test_postgres_private_cluster(tmp_path: Path) -> None:
    """A private cluster accepts SQLAlchemy and psycopg connections and stops cleanly."""
    import psycopg
    import sqlalchemy

    server = start_postgres(tmp_path / "pg")
    try:
        assert server.port != 5432
        url = server.create_database("ainode_test")
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/ainode_test"
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
        engine.dispose()
        with psycopg.connect(server.url("ainode_test", driver="postgresql")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert server.create_database("ainode_test") == url
        pid = int((server.datadir / "postmaster.pid").read_text().split()[0])
        assert _alive(pid)
    finally:
        server.stop()
    assert not _alive(pid)
    assert not server.workdir.exists()
    assert (tmp_path / "pg" / "postgres.log").exists()
