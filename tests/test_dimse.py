"""The node's own DICOM upper layer (node.dimse) at the edges a PACS administrator meets:
aborted, cut, silent and non-DICOM connections, the association limit, small PDUs,
unsupported contexts; and its association PDUs read back by pynetdicom's decoder."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from sqlalchemy import func, select

from node import dimse
from node.db import Instance
from node.part10 import split_part10
from node.scp import start_scp
from node.service import build_node
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


def ct_association(port: int, timeout: float = 10) -> dimse.Requestor:
    return dimse.Requestor(
        "127.0.0.1",
        port,
        "TESTSCU",
        "AINODE",
        [(CTImageStorage, [ExplicitVRLittleEndian])],
        scp_roles=[],
        timeout=timeout,
    )


def store_command(sop_instance_uid: str) -> bytes:
    return dimse.encode_command(
        [
            (dimse.CMD_AFFECTED_SOP_CLASS, CTImageStorage.encode() + b"\x00"),
            (dimse.CMD_FIELD, struct.pack("<H", dimse.C_STORE_RQ)),
            (dimse.CMD_MESSAGE_ID, struct.pack("<H", 1)),
            (dimse.CMD_PRIORITY, struct.pack("<H", 0)),
            (dimse.CMD_DATASET_TYPE, struct.pack("<H", 1)),
            (dimse.CMD_AFFECTED_SOP_INSTANCE, (sop_instance_uid + "\x00").encode()[:64]),
        ]
    )


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV, built by hand as any other implementation would."""
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


def send_half_an_instance(association: dimse.Requestor, path) -> None:
    meta, body = split_part10(path.read_bytes())
    assert str(meta.TransferSyntaxUID) == ExplicitVRLittleEndian
    cid = association.context_for(CTImageStorage).context_id
    association.link.send(pdata(cid, 0x03, store_command(str(meta.MediaStorageSOPInstanceUID))))
    association.link.send(pdata(cid, 0x00, body[: len(body) // 2]))  # not the last fragment


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
    caplog.set_level(logging.INFO, logger="node.dimse")
    files = chest_series[1]
    association = ct_association(scp.settings.dicom_port)
    send_half_an_instance(association, files[0])
    association.abort()

    line = wait_for_log(caplog, "aborted by the peer")
    assert "TESTSCU@127.0.0.1" in line and "was not stored" in line
    assert rows(scp) == 0 and stored_files(scp) == []
    result = storescu("127.0.0.1", scp.settings.dicom_port, files[:2])
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(scp) == 2


def test_connection_cut_mid_instance_stores_nothing(scp, chest_series, caplog):
    caplog.set_level(logging.WARNING, logger="node.dimse")
    association = ct_association(scp.settings.dicom_port)
    send_half_an_instance(association, chest_series[1][0])
    association.link.sock.close()  # the sender's process dies: no A-ABORT, no release

    line = wait_for_log(caplog, "aborted: the peer closed the connection")
    assert "TESTSCU@127.0.0.1" in line
    assert rows(scp) == 0 and stored_files(scp) == []


def test_silent_association_is_aborted_after_the_network_timeout(make_settings, caplog):
    caplog.set_level(logging.WARNING, logger="node.dimse")
    with running_scp(make_settings, network_timeout=0.5) as (node, _server):
        association = ct_association(node.settings.dicom_port)
        kind, _body = association.link.read_pdu()  # the sender says nothing; the node gives up
    assert kind == dimse.ABORT
    assert "silent for 0.5 s" in wait_for_log(caplog, "aborted: silent")


@pytest.mark.parametrize(
    ("sent", "reason", "logged"),
    [
        (b"GET / HTTP/1.1\r\nHost: node\r\n\r\n", 0x01, "not a DICOM PDU (type 0x47)"),
        (b"\x01\x00\xff\xff\xff\xff", 0x02, "announces 4294967295 bytes"),
    ],
    ids=["http", "huge-length"],
)
def test_not_dicom_on_the_dicom_port_is_aborted_at_once(scp, caplog, sent, reason, logged):
    """Another protocol, or a 4 GB announcement, is refused from its first 6 bytes."""
    caplog.set_level(logging.WARNING, logger="node.dimse")
    with socket.create_connection(("127.0.0.1", scp.settings.dicom_port), timeout=10) as sock:
        sock.sendall(sent)
        reply = sock.recv(64)
    assert reply == bytes([dimse.ABORT, 0, 0, 0, 0, 4, 0, 0, 0x02, reason])
    assert logged in wait_for_log(caplog, "failed before it began")
    assert echoscu("127.0.0.1", scp.settings.dicom_port, calling_ae="ECHOSCU").returncode == 0


def test_association_beyond_the_limit_is_rejected_until_one_ends(make_settings, caplog):
    caplog.set_level(logging.WARNING, logger="node.dimse")
    with running_scp(make_settings, max_associations=2) as (node, server):
        port = node.settings.dicom_port
        open_ones = [ct_association(port) for _ in range(2)]
        with pytest.raises(dimse.AssociationRejected, match="local limit exceeded"):
            ct_association(port)
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


def test_small_pdus_reassemble_byte_identical(make_settings, chest_series, caplog):
    """A node limited to 4 kB PDUs gets each slice in ~130 fragments; the file is whole."""
    caplog.set_level(logging.INFO, logger="node.dimse")
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


def test_association_request_is_read_back_by_pynetdicom():
    contexts = [
        (StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]
    encoded = dimse.encode_associate_rq("AINODE", "ORTHANC", contexts, [CTImageStorage], 65536)
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(encoded)
    assert pdu.calling_ae_title == "AINODE" and pdu.called_ae_title == "ORTHANC"
    proposed = [
        (cx.context_id, cx.abstract_syntax, cx.transfer_syntax) for cx in pdu.presentation_context
    ]
    assert proposed == [
        (1, StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian]),
        (3, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]
    info = pdu.user_information
    assert info.maximum_length == 65536
    assert info.implementation_class_uid == dimse.IMPLEMENTATION_CLASS_UID
    roles = {uid: (item.scu_role, item.scp_role) for uid, item in info.role_selection.items()}
    assert roles == {CTImageStorage: (False, True)}

    # ... and what our acceptor reads from it is what was sent
    rq = dimse.parse_associate_rq(encoded[6:])
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian]),
        (3, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]
    assert rq.roles == {CTImageStorage: (False, True)} and rq.max_pdu == 65536


def test_association_accept_is_read_back_by_pynetdicom():
    rq = dimse.parse_associate_rq(
        dimse.encode_associate_rq("STORESCU", "AINODE", [(CTImageStorage, ["1.2.3"])], [], 0)[6:]
    )
    encoded = dimse.encode_associate_ac(
        rq, [(1, 0x00, ExplicitVRLittleEndian), (3, 0x03, ImplicitVRLittleEndian)], 0
    )
    pdu = A_ASSOCIATE_AC()
    pdu.decode(encoded)
    assert pdu.calling_ae_title == "STORESCU" and pdu.called_ae_title == "AINODE"
    results = [(cx.context_id, cx.result, cx.transfer_syntax) for cx in pdu.presentation_context]
    assert results == [(1, 0x00, ExplicitVRLittleEndian), (3, 0x03, ImplicitVRLittleEndian)]
    assert pdu.user_information.maximum_length == 0
    assert pdu.user_information.implementation_version_name.startswith("AINODE")


def test_two_messages_in_one_pdu_are_both_answered(scp):
    """PS3.8 lets one P-DATA-TF carry several PDVs; two C-ECHO-RQs in one get two answers."""
    association = dimse.Requestor(
        "127.0.0.1",
        scp.settings.dicom_port,
        "TESTSCU",
        "AINODE",
        [(Verification, [ImplicitVRLittleEndian])],
        scp_roles=[],
        timeout=10,
    )
    cid = association.context_for(Verification).context_id

    def echo(message_id: int) -> bytes:
        command = dimse.encode_command(
            [
                (dimse.CMD_AFFECTED_SOP_CLASS, Verification.encode() + b"\x00"),
                (dimse.CMD_FIELD, struct.pack("<H", dimse.C_ECHO_RQ)),
                (dimse.CMD_MESSAGE_ID, struct.pack("<H", message_id)),
                (dimse.CMD_DATASET_TYPE, struct.pack("<H", dimse.NO_DATASET)),
            ]
        )
        return struct.pack(">IBB", len(command) + 2, cid, 0x03) + command

    pdvs = echo(7) + echo(8)
    association.link.send(struct.pack(">BxI", 0x04, len(pdvs)) + pdvs)
    answered = []
    while len(answered) < 2:
        kind, body = association.link.read_pdu()
        assert kind == dimse.P_DATA
        for message in association.link.take_pdata(body):
            assert message.command_field == dimse.C_ECHO_RSP
            assert dimse.us(message.command, dimse.CMD_STATUS) == 0
            answered.append(dimse.us(message.command, dimse.CMD_RESPONDED_TO))
    association.release()
    assert answered == [7, 8]


def test_concurrent_senders_are_all_stored(scp, tmp_path):
    """Three PACS pushing at once, one association each: every instance lands once."""
    from concurrent.futures import ThreadPoolExecutor

    from node import phantom
    from node.db import Study

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


@pytest.mark.parametrize("peer_max_pdu", [0, 1, 4096, 16384])
def test_messages_are_cut_to_the_peers_pdu_limit_and_reassembled(peer_max_pdu):
    """What one Link sends within the peer's limit (at least 4 kB), the other reassembles."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _address = listener.accept()
    sender, receiver = dimse.Link(ours, 10), dimse.Link(theirs, 10)
    sender.peer_max_pdu = peer_max_pdu
    command = store_command("1.2.3.4")
    dataset = bytes(range(256)) * 200  # 51,200 bytes
    sender.send_message(5, command, dataset)
    sizes, messages = [], []
    while not messages:
        kind, body = receiver.read_pdu()
        assert kind == dimse.P_DATA
        sizes.append(len(body))
        messages = receiver.take_pdata(body)
    sender.close()
    receiver.close()
    [message] = messages
    assert message.context_id == 5 and message.dataset == dataset
    assert dimse.ui(message.command, dimse.CMD_AFFECTED_SOP_INSTANCE) == "1.2.3.4"
    limit = max(peer_max_pdu, 4096) if peer_max_pdu else dimse.DEFAULT_SEND_PDU
    assert max(sizes) <= limit
    assert len(sizes) == 1 + -(-len(dataset) // (limit - 6))


def test_stopping_node_aborts_open_associations_and_says_why(make_settings, caplog):
    caplog.set_level(logging.INFO, logger="node.dimse")
    with running_scp(make_settings) as (node, server):
        association = ct_association(node.settings.dicom_port)
        deadline = time.monotonic() + 10
        while not server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        server.shutdown()
        kind, _body = association.link.read_pdu()
    assert kind == dimse.ABORT
    assert "TESTSCU@127.0.0.1" in wait_for_log(caplog, "aborted: the node is stopping")
    assert not [r for r in caplog.records if "closed the connection" in r.getMessage()]
