"""The storage SCP (pynetdicom) at the edges a PACS administrator meets: aborted, cut,
silent, trickling and non-DICOM connections, the association and pending-connection
limits, small PDUs, context negotiation, and the node stopping under open associations."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityWorklistInformationFind,
    Verification,
)
from sqlalchemy import func, select

from node.dicom.scp import start_scp
from node.ingest.part10 import split_part10
from node.records.db import Instance
from node.runtime import build_node
from tests.peers import echoscu, storescu


@contextmanager
def running_scp(make_settings, **overrides) -> Iterator:
    """A node with its SCP listening, built with these settings."""
    settings = make_settings(**overrides)
    node = build_node(settings, migrate=True)
    server = start_scp(settings, node.ingestor)
    try:
        yield node, server
    finally:
        server.shutdown()
        node.close()


def rows(node) -> int:
    with node.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def stored_files(node) -> list:
    return [p for p in node.store.root.rglob("*") if p.is_file()]


def ct_association(port: int, max_pdu: int = 16384) -> Association:
    """A pynetdicom association offering CT Image Storage (explicit VR LE) to the node."""
    ae = AE(ae_title="TESTSCU")
    ae.maximum_pdu_size = max_pdu
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    association = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert association.is_established
    return association


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV, built by hand as any other implementation would."""
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


def store_command(sop_instance_uid: str) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 1
    command.AffectedSOPInstanceUID = sop_instance_uid
    return bytes(encode(command, True, True))


def send_half_an_instance(association: Association, path) -> None:
    """The command and half the dataset of ``path``, written on the association's socket."""
    meta, body = split_part10(path.read_bytes())
    assert str(meta.TransferSyntaxUID) == ExplicitVRLittleEndian
    cid = association.accepted_contexts[0].context_id
    sock = association.dul.socket.socket
    sock.sendall(pdata(cid, 0x03, store_command(str(meta.MediaStorageSOPInstanceUID))))
    sock.sendall(pdata(cid, 0x00, body[: len(body) // 2]))  # not the last fragment


def spooled(node) -> list:
    """Files in the node's spool: half-received datasets must not stay there."""
    return [p for p in (node.store.root / ".spool").rglob("*") if p.is_file()]


def wait_for_log(caplog, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if text in record.getMessage():
                return record.getMessage()
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}")


def test_sender_abort_mid_instance_stores_nothing_and_the_node_carries_on(
    scp, chest_series, caplog
):
    caplog.set_level(logging.INFO, logger="node.dicom.scp")
    files = chest_series[1]
    association = ct_association(scp.settings.dicom_port)
    send_half_an_instance(association, files[0])
    association.abort()

    line = wait_for_log(caplog, "aborted by the peer")
    assert "TESTSCU@127.0.0.1" in line and "an instance in transit was not stored" in line
    assert rows(scp) == 0 and stored_files(scp) == [] and spooled(scp) == []
    result = storescu("127.0.0.1", scp.settings.dicom_port, files[:2])
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(scp) == 2


def test_connection_cut_mid_instance_stores_nothing(scp, chest_series, caplog):
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    association = ct_association(scp.settings.dicom_port)
    send_half_an_instance(association, chest_series[1][0])
    # the sender's process dies: no A-ABORT, no release
    association.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    line = wait_for_log(caplog, "lost: the connection closed")
    assert "TESTSCU@127.0.0.1" in line and "an instance in transit was not stored" in line
    assert rows(scp) == 0 and stored_files(scp) == [] and spooled(scp) == []


def test_silent_association_is_aborted_after_the_network_timeout(make_settings, caplog):
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    with running_scp(make_settings, network_timeout=0.5) as (node, _server):
        association = ct_association(node.settings.dicom_port)  # then says nothing
        deadline = time.monotonic() + 10
        while association.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert association.is_aborted
    assert "silent for 0.5 s" in wait_for_log(caplog, "aborted: silent")


def test_sender_trickling_a_half_instance_is_cut_at_the_deadline(
    make_settings, chest_series, caplog
):
    """A byte now and then keeps pynetdicom's per-recv timeout from firing; the node's
    wall-clock deadline cuts the association and keeps nothing."""
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    with running_scp(make_settings, network_timeout=1) as (node, _server):
        association = ct_association(node.settings.dicom_port)
        sock = association.dul.socket.socket
        cid = association.accepted_contexts[0].context_id
        meta, body = split_part10(chest_series[1][0].read_bytes())
        sock.sendall(pdata(cid, 0x03, store_command(str(meta.MediaStorageSOPInstanceUID))))
        fragment = pdata(cid, 0x02, body)
        started = time.monotonic()
        sent = 0
        with pytest.raises(OSError):
            while time.monotonic() - started < 20:
                sock.sendall(fragment[sent : sent + 1])  # one byte every 0.3 s
                sent += 1
                time.sleep(0.3)
        cut_after = time.monotonic() - started
        line = wait_for_log(caplog, "aborted: silent for 1 s")
        assert "TESTSCU@127.0.0.1" in line and "an instance in transit was not stored" in line
        assert rows(node) == 0 and spooled(node) == []
    assert cut_after < 5


def test_connection_that_never_associates_is_closed_after_the_acse_timeout(make_settings, caplog):
    """A-ASSOCIATE-RQ announced, then trickled: closed after acse_timeout, wall clock."""
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    with running_scp(make_settings, acse_timeout=1) as (node, _server):
        port = node.settings.dicom_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"\x01\x00\x00\x00\x01\x00")  # A-ASSOCIATE-RQ of 256 bytes...
            with pytest.raises(OSError):
                for _ in range(60):
                    sock.sendall(b"\x00")  # ...sent a byte every 0.3 s
                    time.sleep(0.3)
            assert time.monotonic() - started < 5
        assert echoscu("127.0.0.1", port, calling_ae="ECHOSCU").returncode == 0
    assert "no association within 1 s" in wait_for_log(caplog, "aborted: no association")


@pytest.mark.parametrize(
    "sent",
    [b"GET / HTTP/1.1\r\nHost: node\r\n\r\n", b"\x01\x00\xff\xff\xff\xff"],
    ids=["http", "huge-length"],
)
def test_not_dicom_on_the_dicom_port_is_closed_and_the_node_carries_on(make_settings, sent):
    """Another protocol is aborted at once; a 4 GB announcement allocates nothing (pynetdicom
    reads what arrives) and is closed at the ACSE deadline."""
    with running_scp(make_settings, acse_timeout=1) as (node, _server):
        port = node.settings.dicom_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(sent)
            reply = b""
            while chunk := sock.recv(64):
                reply += chunk
        assert reply == b"" or reply[0] == 0x07  # an A-ABORT, or closed
        assert echoscu("127.0.0.1", port, calling_ae="ECHOSCU").returncode == 0


def test_association_beyond_the_limit_is_rejected_until_one_ends(make_settings, caplog):
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    with running_scp(make_settings, max_associations=2) as (node, server):
        port = node.settings.dicom_port
        open_ones = [ct_association(port) for _ in range(2)]
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        third = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert third.is_rejected
        rejection = third.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        refused = echoscu("127.0.0.1", port, calling_ae="ECHOSCU")
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
        open_ones.pop().release()
        deadline = time.monotonic() + 10
        while len(server.active_associations) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        result = echoscu("127.0.0.1", port, calling_ae="ECHOSCU")
        assert result.returncode == 0, result.stdout + result.stderr
        for association in open_ones:
            association.release()
    assert "already 2 associations open" in wait_for_log(caplog, "rejected")


def test_connections_not_yet_associated_are_capped(make_settings, caplog):
    """Idle connections that never send A-ASSOCIATE-RQ cannot use up the node's threads:
    beyond the cap they are closed at once, and each is closed at the ACSE deadline."""
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    with running_scp(make_settings, max_pending_connections=3, acse_timeout=2) as (
        node,
        server,
    ):
        port = node.settings.dicom_port
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        deadline = time.monotonic() + 10
        while len(server.active_associations) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            assert extra.recv(16) == b""  # closed at once
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert echoscu("127.0.0.1", port, calling_ae="ECHOSCU").returncode == 0
    assert "3 connections have not yet associated" in wait_for_log(caplog, "max_pending")


def test_small_pdus_reassemble_byte_identical(make_settings, chest_series, caplog):
    """A node limited to 4 kB PDUs gets each slice in ~130 fragments; the file is whole."""
    caplog.set_level(logging.INFO, logger="node.dicom.scp")
    files = chest_series[1][:3]
    with running_scp(make_settings, max_pdu_size=4096) as (node, _server):
        result = storescu("127.0.0.1", node.settings.dicom_port, files)
        assert result.returncode == 0, result.stdout + result.stderr
        with node.session_factory() as session:
            kept = {r.sop_instance_uid: r.store_key for r in session.scalars(select(Instance))}
        for path in files:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            stored = node.store.path(kept[uid]).read_bytes()
            assert split_part10(stored)[1] == split_part10(path.read_bytes())[1]
    assert "STORESCU@127.0.0.1" in wait_for_log(caplog, "released: 3 stored, 0 refused")


def test_unsupported_context_is_refused_and_the_rest_accepted(scp):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
    try:
        assert association.is_established
        accepted = {
            cx.abstract_syntax: cx.transfer_syntax[0] for cx in association.accepted_contexts
        }
        rejected = [cx.abstract_syntax for cx in association.rejected_contexts]
        assert accepted == {
            CTImageStorage: ImplicitVRLittleEndian,
            Verification: ImplicitVRLittleEndian,
        }
        assert rejected == [ModalityWorklistInformationFind]
        assert association.send_c_echo().Status == 0
    finally:
        association.release()


def test_lossless_compressed_syntax_is_preferred_when_several_are_offered(scp):
    jpeg_lossless = "1.2.840.10008.1.2.4.70"
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, jpeg_lossless])
    association = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
    try:
        assert association.accepted_contexts[0].transfer_syntax[0] == jpeg_lossless
    finally:
        association.release()


def test_concurrent_senders_are_all_stored(scp, tmp_path):
    """Three PACS pushing at once, one association each: every instance lands once."""
    from concurrent.futures import ThreadPoolExecutor

    from node import phantom
    from node.records.db import Study

    folders = []
    for index in range(3):
        spec = phantom.PhantomSpec(finding="normal", slices=8, seed=40 + index)
        folders.append(phantom.write_series(spec, tmp_path / f"study{index}"))
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(lambda files: storescu("127.0.0.1", scp.settings.dicom_port, files), folders)
        )
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    with scp.session_factory() as session:
        counts = sorted(s.instance_count for s in session.scalars(select(Study)))
    assert counts == [8, 8, 8]
    assert rows(scp) == 24 and len(stored_files(scp)) == 24


def test_stopping_node_aborts_open_associations_and_says_why(make_settings, caplog):
    caplog.set_level(logging.INFO, logger="node.dicom.scp")
    with running_scp(make_settings) as (node, server):
        association = ct_association(node.settings.dicom_port)
        deadline = time.monotonic() + 10
        while not server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        server.shutdown()
        deadline = time.monotonic() + 10
        while association.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert association.is_aborted
    assert "TESTSCU@127.0.0.1" in wait_for_log(caplog, "aborted: the node is stopping")
    assert not [r for r in caplog.records if "closed" in r.getMessage()]
