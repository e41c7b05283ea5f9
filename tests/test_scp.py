"""The storage SCP against DCMTK and Orthanc: what a PACS administrator sees."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from node import phantom
from node.ingest.part10 import split_part10
from node.records.db import Instance, Series, Study
from tests.conftest import orthanc_peer
from tests.peers import echoscu, fill_tmpfs, storescu, tmpfs


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    return split_part10(path.read_bytes())[1]


def count(node, model) -> int:
    with node.session_factory() as session:
        return session.scalar(select(func.count()).select_from(model))


def stored_files(node) -> list[Path]:
    return sorted(p for p in node.store.root.rglob("*") if p.is_file())


def test_echo_from_dcmtk(scp):
    result = echoscu("127.0.0.1", scp.settings.dicom_port, calling_ae="ECHOSCU")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dcmtk_push_of_60_slices_is_stored_whole_and_byte_identical(scp, chest_series):
    spec, files = chest_series
    result = storescu("127.0.0.1", scp.settings.dicom_port, files, calling_ae="STORESCU")
    assert result.returncode == 0, result.stdout + result.stderr

    with scp.session_factory() as session:
        study = session.scalars(select(Study)).one()
        assert (study.instance_count, study.series_count, study.modalities) == (60, 1, "CT")
        assert study.study_description == spec.study_description
        assert study.status == "receiving"
        stored = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    assert len(stored) == 60
    for path in files:
        original = dcmread(path, stop_before_pixels=True)
        instance = stored[original.SOPInstanceUID]
        kept = scp.store.path(instance.store_key)
        assert dataset_bytes(kept) == dataset_bytes(path)
        meta = dcmread(kept, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert meta.SourceApplicationEntityTitle == "STORESCU"
    assert not [p for p in stored_files(scp) if ".tmp" in p.name]


def test_repush_is_success_without_duplicate_rows(scp, chest_series):
    _spec, files = chest_series
    for _ in range(2):
        result = storescu("127.0.0.1", scp.settings.dicom_port, files[:10])
        assert result.returncode == 0, result.stdout + result.stderr
    assert count(scp, Instance) == 10
    assert count(scp, Series) == 1
    with scp.session_factory() as session:
        assert session.scalars(select(Study)).one().instance_count == 10
    assert len(stored_files(scp)) == 10


def test_orthanc_push_is_stored_whole_and_byte_identical(scp, orthanc, chest_series):
    _spec, files = chest_series
    assert orthanc.upload_dir(files[0].parent) == 60
    orthanc.add_modality("AINODE", "AINODE", "127.0.0.1", scp.settings.dicom_port)
    study_id = orthanc.studies()[0]
    orthanc.store_to_modality("AINODE", [study_id])

    assert count(scp, Instance) == 60
    with scp.session_factory() as session:
        rows = session.scalars(select(Instance)).all()
    for row in rows:
        assert row.source_ae == "ORTHANC"
        orthanc_id = orthanc.post("/tools/lookup", raw=row.sop_instance_uid.encode())[0]["ID"]
        original = orthanc.get(f"/instances/{orthanc_id}/file")
        assert dataset_bytes(scp.store.path(row.store_key)) == split_part10(original)[1]


def test_unknown_calling_ae_is_rejected_and_logged(scp, chest_series, caplog):
    _spec, files = chest_series
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    result = storescu("127.0.0.1", scp.settings.dicom_port, files[:1], calling_ae="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert count(scp, Instance) == 0
    assert any(
        "INTRUDER@127.0.0.1" in r.getMessage() and "not recognised" in r.getMessage()
        for r in caplog.records
    )


def test_association_refused_when_free_disk_below_threshold(make_settings, chest_series, caplog):
    from node.dicom.scp import start_scp
    from node.runtime import build_node

    settings = make_settings(min_free_disk_mb=10**12)
    node = build_node(settings, migrate=True)
    server = start_scp(settings, node.ingestor)
    caplog.set_level(logging.ERROR, logger="node.dicom.scp")
    try:
        result = storescu("127.0.0.1", settings.dicom_port, chest_series[1][:1])
    finally:
        server.shutdown()
        node.close()
    assert result.returncode != 0
    assert "Local Limit Exceeded" in result.stdout + result.stderr
    assert any(
        "below the" in r.getMessage() and "MB threshold" in r.getMessage() for r in caplog.records
    )


def _write_raw(path: Path, meta_source: Path, body: bytes) -> Path:
    """A Part 10 file with the meta of ``meta_source`` and an arbitrary dataset body."""
    meta: FileMetaDataset = dcmread(meta_source, stop_before_pixels=True).file_meta
    with path.open("wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta)
        out.write(body)
    return path


@pytest.mark.parametrize(
    ("damage", "expected_comment"),
    [
        (lambda body: body[: len(body) // 2], "truncated: (7FE0,0010)"),
        (lambda body: body[:300], "truncated"),
        (lambda body: b"\xde\xad\xbe\xef" * 64, "invalid VR"),
        (lambda body: b"", "the dataset is empty"),
    ],
    ids=["cut-in-pixels", "cut-in-header", "garbage", "empty"],
)
def test_bad_dataset_fails_alone_and_the_association_carries_on(
    scp, chest_series, tmp_path, monkeypatch, damage, expected_comment
):
    _spec, files = chest_series
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as they are
    bad = _write_raw(tmp_path / "bad.dcm", files[1], damage(dataset_bytes(files[1])))

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(path) for path in (files[0], bad, files[2])]
    assoc.release()

    assert [s.Status for s in statuses] == [0x0000, 0xC210, 0x0000]
    assert expected_comment in statuses[1].ErrorComment
    with scp.session_factory() as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
    good = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (files[0], files[2])}
    assert uids == good
    assert len(stored_files(scp)) == 2


def _remount_read_only(store: Path) -> None:
    # What ext4 does to itself on I/O errors (errors=remount-ro) while the node runs.
    subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)


@pytest.mark.parametrize(
    ("break_store", "expected"),
    [(fill_tmpfs, "No space left on device"), (_remount_read_only, "Read-only file system")],
    ids=["disk-full", "read-only"],
)
def test_store_that_cannot_write_answers_out_of_resources_and_records_nothing(
    make_settings, chest_series, tmp_path, break_store, expected
):
    """Real file systems (tmpfs) that fill up or turn read-only under a running node."""
    from node.dicom.scp import start_scp
    from node.runtime import build_node

    with tmpfs(tmp_path / "small-store") as store:
        settings = make_settings(store_url=store.as_uri())
        node = build_node(settings, migrate=True)
        server = start_scp(settings, node.ingestor)
        break_store(store)  # under the running SCP
        try:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title="AINODE")
            status = assoc.send_c_store(dcmread(chest_series[1][0]))
            assoc.release()
        finally:
            server.shutdown()
        assert status.Status == 0xA700
        assert expected in status.ErrorComment
        assert count(node, Instance) == 0
        assert count(node, Study) == 0
        leftovers = [p for p in store.rglob("*") if p.is_file() and p.name != "ballast"]
        assert leftovers == []
        node.close()


def test_node_refuses_to_start_on_a_store_it_cannot_write(make_settings, tmp_path, capsys):
    from ainode.cli import main
    from tests.config import write_config

    with tmpfs(tmp_path / "ro-store", "size=1m,ro") as store:
        config = write_config(make_settings(store_url=store.as_uri()), tmp_path / "a.toml")
        assert main(["--config", str(config), "serve"]) == 2
    err = capsys.readouterr().err
    assert f"cannot prepare the store at {store}" in err
    assert "Read-only file system" in err


@pytest.mark.parametrize("syntax", ["jpeg-lossless", "jpeg-ls", "jpeg2000", "rle", "implicit"])
def test_compressed_transfer_syntaxes_are_stored_as_sent(scp, tmp_path, syntax):
    spec = phantom.PhantomSpec(finding="pneumonia", slices=3, seed=11)
    files = phantom.write_series(spec, tmp_path / syntax, transfer_syntax=syntax)
    sent_syntax = dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert sent_syntax == phantom.TRANSFER_SYNTAXES[syntax]

    result = storescu("127.0.0.1", scp.settings.dicom_port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    with scp.session_factory() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
    assert len(rows) == 3
    for path in files:
        original = dcmread(path, stop_before_pixels=True)
        row = rows[original.SOPInstanceUID]
        assert row.transfer_syntax_uid == sent_syntax
        assert dataset_bytes(scp.store.path(row.store_key)) == dataset_bytes(path)


def test_node_echo_command_reaches_orthanc(orthanc, tmp_path, capsys):
    from ainode.cli import main

    config = tmp_path / "ainode.toml"
    peer = orthanc_peer(orthanc)
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[[peers]]\nname = "pacs"\n'
        f'ae_title = "{peer.ae_title}"\nport = {peer.port}\n'
    )
    assert main(["--config", str(config), "echo"]) == 0
    assert "C-ECHO ORTHANC@127.0.0.1" in capsys.readouterr().out


def test_push_leaves_only_final_files_in_the_store(scp, chest_series):
    """No temp file is left in the store after a push (they would leak disk)."""
    result = storescu("127.0.0.1", scp.settings.dicom_port, chest_series[1][:5])
    assert result.returncode == 0
    names = [p.name for p in scp.store.root.rglob("*") if p.is_file()]
    assert len(names) == 5 and all(n.endswith(".dcm") and not n.startswith(".") for n in names)


def test_node_sockets_disable_nagle(node):
    """Both ends of the node's associations set TCP_NODELAY (DIMSE stalls ~40 ms without)."""
    import socket

    from pynetdicom import evt
    from pynetdicom.sop_class import Verification

    from node.dicom.network import handle_conn_open
    from node.dicom.scp import start_scp

    server = start_scp(node.settings, node.ingestor)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        node.settings.dicom_port,
        ae_title="AINODE",
        evt_handlers=[(evt.EVT_CONN_OPEN, handle_conn_open)],
    )
    try:
        assert assoc.is_established
        ours = assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        theirs = [
            a.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for a in server.active_associations
        ]
    finally:
        assoc.release()
        server.shutdown()
    assert ours != 0
    assert len(theirs) == 1 and theirs[0] != 0


def test_cget_requests_at_most_128_presentation_contexts():
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    from node.dicom.pull import cget_contexts

    contexts = cget_contexts()
    assert 40 <= len(contexts) <= 128
    assert contexts[0][0] == StudyRootQueryRetrieveInformationModelGet
    assert (CTImageStorage, ["1.2.840.10008.1.2.1"]) in contexts
