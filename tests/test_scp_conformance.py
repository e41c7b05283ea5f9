"""What a vendor PACS may send that the node must get right: UN of undefined length and
private sequences kept byte for byte, SOP class checks, size and inflation limits,
big-endian and deflated syntaxes, deep nesting, called AE, non-storage requests, and one
implementation identity on every AE the node runs."""

from __future__ import annotations

import logging
import socket
import struct
import time
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE, N_GET
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from sqlalchemy import func, select

from node.dicom.network import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.ingest.part10 import split_part10
from node.records.db import Instance
from tests.peers import echoscu, free_port
from tests.test_scp_edges import pdata, running_scp, spooled, wait_for_log
from tests.test_scp_fuzz import A_ASSOCIATE_AC, A_RELEASE_RP, REQUEST

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def rows(node) -> int:
    with node.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def stored_files(node) -> list[Path]:
    return [p for p in node.store.root.rglob("*") if p.is_file()]


def insert_before(body: bytes, tag: int, raw: bytes) -> bytes:
    """``raw`` element bytes inserted into an explicit VR LE dataset before ``tag``."""
    stream = BytesIO(body)
    for element in data_element_generator(stream, False, True, defer_size=64):
        if int(element.tag) >= tag:
            start = element.value_tell - (12 if element.VR in LONG_VRS else 8)
            return body[:start] + raw + body[start:]
    return body + raw


def with_body(source: Path, body: bytes, path: Path, syntax: str | None = None) -> Path:
    """A Part 10 file with the file meta of ``source`` (syntax optionally changed)."""
    meta = dcmread(source, stop_before_pixels=True).file_meta
    if syntax:
        meta.TransferSyntaxUID = syntax
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    path.write_bytes(out.getvalue() + body)
    return path


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr.decode() in LONG_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


ITEM, ITEM_END, SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
UNDEFINED = b"\xff\xff\xff\xff"


def private_block() -> bytes:
    """A private creator, a UN of undefined length holding implicit VR items (PS3.5 6.2.2,
    as a PACS forwards a private sequence it does not know), and a defined-length SQ."""
    creator = element(0x00090010, b"LO", b"AINODE TEST ")
    implicit_item = struct.pack("<HHI", 0x0009, 0x1010, 4) + b"ABCD"
    un_undefined = (
        struct.pack("<HH2s2x", 0x0009, 0x1001, b"UN")
        + UNDEFINED
        + ITEM
        + UNDEFINED
        + implicit_item
        + ITEM_END
        + b"\x00" * 4
        + SEQ_END
        + b"\x00" * 4
    )
    inner = element(0x00091010, b"LO", b"VENDOR")
    sq = element(0x00091002, b"SQ", ITEM + struct.pack("<I", len(inner)) + inner)
    return creator + un_undefined + sq


def send_raw(port: int, path: Path, syntax: str = ExplicitVRLittleEndian):
    """C-STORE ``path`` as its bytes are (pynetdicom's chunked send); returns the status."""
    ae = AE(ae_title="TESTSCU")
    meta = split_part10(path.read_bytes()[:4096])[0]
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [syntax])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        association = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert association.is_established
        status = association.send_c_store(path)
        association.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return status


def dataset_bytes(path: Path) -> bytes:
    return split_part10(path.read_bytes())[1]


def test_un_of_undefined_length_and_private_sequences_are_stored_byte_identical(
    scp, chest_series, tmp_path
):
    source = chest_series[1][0]
    body = insert_before(dataset_bytes(source), 0x00100000, private_block())
    path = with_body(source, body, tmp_path / "private.dcm")
    assert dcmread(path)[0x00091001].VR == "SQ"  # pydicom reads the UN as a sequence

    assert send_raw(scp.settings.dicom_port, path).Status == 0x0000
    with scp.session_factory() as session:
        row = session.scalars(select(Instance)).one()
    assert dataset_bytes(scp.store.path(row.store_key)) == body


def test_elements_out_of_order_are_read_and_kept_as_sent(scp, chest_series, tmp_path):
    """PS3.5 asks for ascending tags; a PACS that breaks it still gets its study stored."""
    source = chest_series[1][1]
    late = element(0x00080070, b"LO", b"LATE VENDOR ")  # Manufacturer after (0010,xxxx)
    body = insert_before(dataset_bytes(source), 0x00200000, late)
    path = with_body(source, body, tmp_path / "order.dcm")
    assert send_raw(scp.settings.dicom_port, path).Status == 0x0000
    with scp.session_factory() as session:
        row = session.scalars(select(Instance)).one()
    assert dataset_bytes(scp.store.path(row.store_key)) == body


def test_sequences_nested_two_thousand_deep_are_refused_not_aborted(scp, chest_series, tmp_path):
    source = chest_series[1][2]
    depth = 2000
    opening = struct.pack("<HH2s2x", 0x0040, 0xA730, b"SQ") + UNDEFINED + ITEM + UNDEFINED
    nested_open = (struct.pack("<HH2s2x", 0x0040, 0xA730, b"SQ") + UNDEFINED + ITEM + UNDEFINED) * (
        depth - 1
    )
    closing = (ITEM_END + b"\x00" * 4 + SEQ_END + b"\x00" * 4) * depth
    body = insert_before(dataset_bytes(source), 0x0040A731, opening + nested_open + closing)
    path = with_body(source, body, tmp_path / "deep.dcm")
    status = send_raw(scp.settings.dicom_port, path)
    assert status.Status == 0xC210
    assert "nested too deeply" in status.ErrorComment
    assert rows(scp) == 0 and stored_files(scp) == []


def _store_primitive(command_class: str, dataset: bytes, instance: str) -> C_STORE:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = command_class
    request.AffectedSOPInstanceUID = instance
    request.Priority = 2
    request.DataSet = BytesIO(dataset)
    return request


@pytest.mark.parametrize(
    ("command_class", "dataset_class", "expected", "comment"),
    [
        (MRImageStorage, CTImageStorage, 0x0122, "SOP class differs from its context"),
        (CTImageStorage, MRImageStorage, 0xA900, "dataset SOP class differs from the command's"),
    ],
    ids=["command-vs-context", "dataset-vs-command"],
)
def test_sop_class_mismatch_gets_the_failure_status_and_nothing_is_kept(
    scp, chest_series, command_class, dataset_class, expected, comment
):
    source = dcmread(chest_series[1][3])
    source.SOPClassUID = dataset_class
    out = BytesIO()
    source.save_as(out, implicit_vr=False, little_endian=True)
    body = split_part10(out.getvalue())[1] if out.getvalue()[128:132] == b"DICM" else b""
    if not body:  # written without file meta: the bytes are the dataset
        body = out.getvalue()

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    association = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
    assert association.is_established
    context_id = association.accepted_contexts[0].context_id
    # A misbehaving sender, written the way pynetdicom's own send_c_store works: its
    # reactor paused, the request sent as is, the response read back.
    association._reactor_checkpoint.clear()
    while not association._is_paused:
        time.sleep(0.001)
    association.dimse.send_msg(
        _store_primitive(command_class, body, str(source.SOPInstanceUID)), context_id
    )
    _cx, response = association.dimse.get_msg(block=True)
    association._reactor_checkpoint.set()
    association.release()
    assert response.Status == expected
    assert comment in response.ErrorComment
    assert rows(scp) == 0 and stored_files(scp) == []


def test_dataset_over_the_size_limit_is_refused_and_nothing_kept(
    make_settings, chest_series, tmp_path
):
    source = dcmread(chest_series[1][0])
    source.PixelData = bytes(3 * 2**20)  # 3 MB: over a 1 MB limit
    path = tmp_path / "big.dcm"
    source.save_as(path, enforce_file_format=True)
    with running_scp(make_settings, max_dataset_mb=1) as (node, _server):
        status = send_raw(node.settings.dicom_port, path)
        assert status.Status == 0xA700
        assert "dataset larger than 1 MB" in status.ErrorComment
        assert rows(node) == 0 and stored_files(node) == []


def deflated(path: Path, out: Path) -> Path:
    body = dataset_bytes(path)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = compressor.compress(body) + compressor.flush()
    return with_body(path, packed, out, DeflatedExplicitVRLittleEndian)


def test_deflated_dataset_is_stored_as_sent(scp, chest_series, tmp_path):
    path = deflated(chest_series[1][4], tmp_path / "deflated.dcm")
    assert send_raw(scp.settings.dicom_port, path, DeflatedExplicitVRLittleEndian).Status == 0
    with scp.session_factory() as session:
        row = session.scalars(select(Instance)).one()
    assert row.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert scp.store.path(row.store_key).read_bytes()[-200:] == path.read_bytes()[-200:]
    assert dataset_bytes(scp.store.path(row.store_key)) == dataset_bytes(path)


def test_deflate_bomb_is_refused_at_the_ceiling(make_settings, chest_series, tmp_path):
    """5 MB of zeros deflate to a few kB; inflated past max_dataset_mb it is refused."""
    source = dcmread(chest_series[1][5])
    source.PixelData = bytes(5 * 2**20)
    plain = tmp_path / "plain.dcm"
    source.save_as(plain, enforce_file_format=True)
    bomb = deflated(plain, tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 100_000
    with running_scp(make_settings, max_dataset_mb=1) as (node, _server):
        status = send_raw(node.settings.dicom_port, bomb, DeflatedExplicitVRLittleEndian)
        assert status.Status == 0xA700
        assert "inflates beyond 1 MB" in status.ErrorComment
        assert rows(node) == 0 and stored_files(node) == []


def test_big_endian_dataset_is_read_and_stored(scp, chest_series, tmp_path):
    source = dcmread(chest_series[1][6])
    path = tmp_path / "big-endian.dcm"
    source.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    dcmwrite(path, source, implicit_vr=False, little_endian=False, force_encoding=True)
    assert send_raw(scp.settings.dicom_port, path, ExplicitVRBigEndian).Status == 0
    with scp.session_factory() as session:
        row = session.scalars(select(Instance)).one()
    assert row.transfer_syntax_uid == ExplicitVRBigEndian
    assert row.instance_number == int(source.InstanceNumber)
    assert dataset_bytes(scp.store.path(row.store_key)) == dataset_bytes(path)


def test_called_ae_is_checked_when_required(make_settings, caplog):
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    with running_scp(make_settings, require_called_aet=True) as (node, _server):
        port = node.settings.dicom_port
        wrong = echoscu("127.0.0.1", port, calling_ae="ECHOSCU", called_ae="NOTME")
        assert wrong.returncode != 0
        assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
        assert echoscu("127.0.0.1", port, calling_ae="ECHOSCU").returncode == 0
    assert "called AE 'NOTME' is not this node's 'AINODE'" in wait_for_log(caplog, "rejected")


def test_a_non_storage_request_on_a_storage_context_is_answered_not_aborted(scp, caplog):
    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
    storage = next(c for c in association.accepted_contexts if c.abstract_syntax == CTImageStorage)
    request = N_GET()
    request.MessageID = 3
    request.RequestedSOPClassUID = CTImageStorage
    request.RequestedSOPInstanceUID = "1.2.3"
    association.dimse.send_msg(request, storage.context_id)
    assert "N-GET from TESTSCU@127.0.0.1 refused" in wait_for_log(caplog, "not a storage")
    time.sleep(0.2)
    assert association.is_established
    assert association.send_c_echo().Status == 0
    association.release()


def test_every_node_ae_shows_one_implementation_identity(scp, make_settings, tmp_path, capsys):
    """The SCP answers with the node's implementation UID and version, and so does the node
    as an SCU (here: `ainode echo` to a pynetdicom SCP that records what it was told)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="AINODE")
    seen_as_scp = (
        association.acceptor.implementation_class_uid,
        association.acceptor.implementation_version_name,
    )
    association.release()
    assert seen_as_scp == (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)

    from ainode.cli import main
    from node.settings import Peer
    from tests.config import write_config

    told = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(Verification)
    port = free_port()

    def record(event):
        requestor = event.assoc.requestor
        told.append((requestor.implementation_class_uid, requestor.implementation_version_name))

    server = pacs.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_ACCEPTED, record)]
    )
    try:
        settings = make_settings(peers=[Peer(name="pacs", ae_title="PACS", port=port)])
        assert main(["--config", str(write_config(settings, tmp_path / "e.toml")), "echo"]) == 0
    finally:
        server.shutdown()
    assert told == [(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)]
    assert "C-ECHO PACS@127.0.0.1" in capsys.readouterr().out


def test_nothing_is_left_in_the_spool_after_a_push(scp, chest_series):
    status = send_raw(scp.settings.dicom_port, chest_series[1][7])
    assert status.Status == 0
    assert spooled(scp) == []
    assert rows(scp) == 1


def read_pdu(sock) -> tuple[int, bytes]:
    """One whole PDU from ``sock``: (type, body)."""

    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, f"connection closed after {data.hex()}"
            data += chunk
        return data

    header = exactly(6)
    return header[0], exactly(struct.unpack(">I", header[2:6])[0])


def raw_command(context_id: int, command: Dataset, *, last: bool = True) -> bytes:
    """A P-DATA-TF carrying one command set (implicit VR LE, with its group length)."""
    body = bytes(encode(command, True, True))
    command = Dataset()
    command.CommandGroupLength = len(body)
    return pdata(context_id, 0x03 if last else 0x01, bytes(encode(command, True, True)) + body)


def command(field: int, message_id: int, with_dataset: bool = False) -> Dataset:
    ds = Dataset()
    ds.AffectedSOPClassUID = Verification
    ds.CommandField = field
    ds.MessageID = message_id
    ds.CommandDataSetType = 0x0000 if with_dataset else 0x0101
    return ds


def response_to(sock) -> Dataset:
    kind, body = read_pdu(sock)
    assert kind == 0x04, (kind, body.hex())
    length, _context, control = struct.unpack(">IBB", body[:6])
    assert control == 0x03 and length == len(body) - 4, body.hex()
    return decode(BytesIO(body[6:]), True, True)


@pytest.mark.parametrize("with_dataset", [False, True], ids=["no-dataset", "dataset-follows"])
def test_unknown_dimse_command_is_answered_and_the_association_carries_on(
    make_settings, caplog, with_dataset
):
    """PS3.7 lets a receiver answer an operation it does not know with 0x0211; pynetdicom
    alone fails to decode the message and aborts. The sender sees a response with that
    status (and the command field of the request with its response bit), the data set
    that followed the request is read and dropped, and the next C-ECHO on the same
    association is answered as usual."""
    caplog.set_level(logging.INFO, logger="node.dicom.scp")
    with (
        running_scp(make_settings) as (node, _server),
        socket.create_connection(("127.0.0.1", node.settings.dicom_port), timeout=10) as sock,
    ):
        sock.sendall(REQUEST)  # CT Image Storage (context 1) and Verification (context 3)
        kind, _ = read_pdu(sock)
        assert kind == A_ASSOCIATE_AC
        sock.sendall(raw_command(3, command(0x0FF1, 7, with_dataset)))
        if with_dataset:  # a data set in two fragments, in PDUs of their own
            sock.sendall(pdata(3, 0x00, b"\x08\x00\x16\x00\x02\x00\x00\x00" + b"1\x00"))
            sock.sendall(pdata(3, 0x02, b"\x08\x00\x18\x00\x02\x00\x00\x00" + b"2\x00"))
        answer = response_to(sock)
        assert answer.CommandField == 0x8FF1
        assert answer.MessageIDBeingRespondedTo == 7
        assert answer.Status == 0x0211
        assert answer.CommandDataSetType == 0x0101
        assert answer.AffectedSOPClassUID == Verification

        sock.sendall(raw_command(3, command(0x0030, 8)))  # C-ECHO-RQ
        echo = response_to(sock)
        assert (echo.CommandField, echo.MessageIDBeingRespondedTo, echo.Status) == (
            0x8030,
            8,
            0x0000,
        )
        sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == A_RELEASE_RP
    line = wait_for_log(caplog, "answered 0x0211")
    assert "DIMSE command 0x0FF1 from TESTSCU@127.0.0.1" in line
    assert "0 stored, 0 refused" in wait_for_log(
        caplog, "association from TESTSCU@127.0.0.1 released"
    )


# --------------------------------------------------------------------------- calling AE


def associate_as(port: int, calling_ae: str):
    """A pynetdicom association offering Verification, calling as ``calling_ae``."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="AINODE")


def test_a_peers_ae_title_is_allowed_and_any_other_is_rejected(make_settings, caplog):
    """The allow-list is allowed_calling_aes plus every peer's AE title: a PACS configured
    as a peer may send without being listed twice; an AE neither listed nor a peer gets
    A-ASSOCIATE-RJ permanent / service user / calling AE title not recognised."""
    from node.settings import Peer

    caplog.set_level(logging.WARNING, logger="node.dicom.scp")
    pacs = Peer(name="pacs", ae_title="PACSAE", port=free_port())
    with running_scp(make_settings, allowed_calling_aes=["LISTED"], peers=[pacs]) as (node, _):
        port = node.settings.dicom_port
        accepted = echoscu("127.0.0.1", port, calling_ae="PACSAE")  # DCMTK
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert echoscu("127.0.0.1", port, calling_ae="LISTED").returncode == 0

        refused = echoscu("127.0.0.1", port, calling_ae="STRANGER")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        association = associate_as(port, "STRANGER2")  # pynetdicom: the reason's codes
        assert association.is_rejected
        answer = association.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
    line = wait_for_log(caplog, "association from STRANGER2@127.0.0.1 rejected")
    assert line.endswith("calling AE 'STRANGER2' not recognised (allowed: LISTED, PACSAE)")
    assert not [r for r in caplog.records if "PACSAE@" in r.getMessage()]


def test_accept_any_calling_ae_accepts_an_unknown_ae_and_says_so(make_settings, caplog):
    caplog.set_level(logging.INFO, logger="node.dicom.scp")
    settings = {"allowed_calling_aes": ["LISTED"], "accept_any_calling_ae": True}
    with running_scp(make_settings, **settings) as (node, _server):
        port = node.settings.dicom_port
        unknown = echoscu("127.0.0.1", port, calling_ae="STRANGER")
        assert unknown.returncode == 0, unknown.stdout + unknown.stderr
        association = associate_as(port, "LISTED")
        assert association.is_established
        assert association.send_c_echo().Status == 0
        association.release()
        wait_for_log(caplog, "association from LISTED@127.0.0.1 released")
    line = wait_for_log(caplog, "association from STRANGER@127.0.0.1 accepted")
    assert line.endswith("calling AE not in the allow-list (accept_any_calling_ae)")
    said = [r.getMessage() for r in caplog.records if "not in the allow-list" in r.getMessage()]
    assert said == [line]  # a listed AE is not remarked on
    assert not [r for r in caplog.records if "rejected" in r.getMessage()]
