"""The node's own DICOM upper layer for its hot path: receiving instances.

pynetdicom runs every PDU through a state machine, an event queue and a thread
hand-off; on a 512×512 CT slice that costs more than the node's whole durable
store (file fsync and SQL commit), and a sender that waits for each C-STORE
response feels every millisecond. This module implements just what receiving
needs, straight on a blocking socket (PS3.8 upper layer, PS3.7 messages):

- as **acceptor** (the Storage SCP): association negotiation, C-ECHO, C-STORE,
  release and abort;
- as **requestor** (C-GET from a PACS): association with SCP roles for the
  storage classes, one C-GET, the C-STORE sub-operations it brings, release.

Everything else the node says in DICOM (C-FIND, C-MOVE, C-ECHO as SCU, storing
Structured Reports) still goes through pynetdicom. Policy (who may associate,
what to do with an instance) belongs to the callers: ``node.scp`` and ``node.pull``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from node.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101

# Command elements (group 0000), as integer tags
CMD_GROUP_LENGTH = 0x00000000
CMD_AFFECTED_SOP_CLASS = 0x00000002
CMD_FIELD = 0x00000100
CMD_MESSAGE_ID = 0x00000110
CMD_RESPONDED_TO = 0x00000120
CMD_PRIORITY = 0x00000700
CMD_DATASET_TYPE = 0x00000800
CMD_STATUS = 0x00000900
CMD_ERROR_COMMENT = 0x00000902
CMD_AFFECTED_SOP_INSTANCE = 0x00001000
CMD_REMAINING = 0x00001020
CMD_COMPLETED = 0x00001021
CMD_FAILED = 0x00001022
CMD_WARNING = 0x00001023

# A-ABORT source/reason (PS3.8 9.3.8)
ABORT_SERVICE_USER = (0x00, 0x00)
ABORT_UNRECOGNISED_PDU = (0x02, 0x01)
ABORT_UNEXPECTED_PDU = (0x02, 0x02)
ABORT_INVALID_PARAMETER = (0x02, 0x06)

# A-ASSOCIATE-RJ reasons, in the words DCMTK and pynetdicom use, for error messages.
REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}

_HEADER = struct.Struct(">BxI")
_ITEM = struct.Struct(">BxH")
_PDV = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")

# Our largest PDU when the peer sets no limit: big enough that a CT slice goes in a few.
DEFAULT_SEND_PDU = 1 << 20
MIN_SEND_PDU = 4096
# Bounds on what one announced PDU length can make the node allocate: a P-DATA-TF
# (unless we announced a larger limit), and any other PDU.
MAX_PDU_CEILING = 1 << 26
MAX_CONTROL_PDU = 1 << 20


class DimseError(Exception):
    """The peer broke the protocol, aborted, closed the connection or went silent."""


class UnrecognisedPDU(DimseError):
    """Bytes that are not a DICOM PDU (another protocol on the DICOM port)."""


class AssociationRejected(DimseError):
    """The peer answered A-ASSOCIATE-RJ."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        self.result, self.source, self.reason = result, source, reason
        words = REJECT_REASONS.get((source, reason), f"reason {reason}")
        kind = "permanently" if result == 1 else "transiently"
        super().__init__(f"association rejected {kind}: {words}")


# ---------------------------------------------------------------------------
# Commands: implicit VR little endian group 0000 elements


def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of an encoded command set, tag -> raw value."""
    elements: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if pos + length > end:
            raise DimseError("the command set is truncated")
        elements[(group << 16) | element] = bytes(data[pos : pos + length])
        pos += length
    if pos != end:
        raise DimseError("the command set is truncated")
    return elements


def us(command: dict[int, bytes], tag: int, default: int | None = None) -> int | None:
    """An US value of a command element."""
    raw = command.get(tag)
    return _US.unpack(raw[:2])[0] if raw and len(raw) >= 2 else default


def ui(command: dict[int, bytes], tag: int) -> str:
    """A UI (or other text) value of a command element, padding removed."""
    return command.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """Encode command elements (tag, value) in tag order, with the group length first."""
    body = b"".join(
        _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value
        for tag, value in sorted(elements)
    )
    return _ELEMENT.pack(0, 0, 4) + _UL.pack(len(body)) + body


def store_response(
    message_id: int, sop_class: str, sop_instance: str, status: int, comment: str | None
) -> bytes:
    """A C-STORE-RSP command set."""
    elements = [
        (CMD_AFFECTED_SOP_CLASS, _text(sop_class, b"\x00")),
        (CMD_FIELD, _US.pack(C_STORE_RSP)),
        (CMD_RESPONDED_TO, _US.pack(message_id)),
        (CMD_DATASET_TYPE, _US.pack(NO_DATASET)),
        (CMD_STATUS, _US.pack(status)),
        (CMD_AFFECTED_SOP_INSTANCE, _text(sop_instance, b"\x00")),
    ]
    if comment:
        elements.append((CMD_ERROR_COMMENT, _text(comment[:64], b" ")))
    return encode_command(elements)


def echo_response(message_id: int, sop_class: str) -> bytes:
    """A C-ECHO-RSP command set (success)."""
    return encode_command(
        [
            (CMD_AFFECTED_SOP_CLASS, _text(sop_class, b"\x00")),
            (CMD_FIELD, _US.pack(C_ECHO_RSP)),
            (CMD_RESPONDED_TO, _US.pack(message_id)),
            (CMD_DATASET_TYPE, _US.pack(NO_DATASET)),
            (CMD_STATUS, _US.pack(0)),
        ]
    )


def get_request(message_id: int, sop_class: str) -> bytes:
    """A C-GET-RQ command set (an identifier follows)."""
    return encode_command(
        [
            (CMD_AFFECTED_SOP_CLASS, _text(sop_class, b"\x00")),
            (CMD_FIELD, _US.pack(C_GET_RQ)),
            (CMD_MESSAGE_ID, _US.pack(message_id)),
            (CMD_PRIORITY, _US.pack(0)),
            (CMD_DATASET_TYPE, _US.pack(0x0001)),
        ]
    )


# ---------------------------------------------------------------------------
# Association PDUs


@dataclass
class ProposedContext:
    """A presentation context as proposed in an A-ASSOCIATE-RQ."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ the node uses."""

    called_ae: str
    calling_ae: str
    contexts: list[ProposedContext]
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)


@dataclass(frozen=True)
class AcceptedContext:
    """A presentation context the association carries: its abstract and transfer syntax."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


def _items(data: bytes, pos: int, end: int) -> Iterator[tuple[int, bytes]]:
    while pos < end:
        if pos + 4 > end:
            raise DimseError("an association item is truncated")
        kind, length = _ITEM.unpack_from(data, pos)
        pos += 4
        if pos + length > end:
            raise DimseError("an association item is truncated")
        yield kind, data[pos : pos + length]
        pos += length


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def _user_information(rq: AssociateRequest, data: bytes) -> None:
    for kind, value in _items(data, 0, len(data)):
        if kind == 0x51 and len(value) >= 4:
            rq.max_pdu = struct.unpack(">I", value[:4])[0]
        elif kind == 0x52:
            rq.implementation_class_uid = _uid(value)
        elif kind == 0x55:
            rq.implementation_version = value.decode("ascii", "replace").strip()
        elif kind == 0x54 and len(value) >= 2:
            n = struct.unpack(">H", value[:2])[0]
            if len(value) >= 4 + n:
                rq.roles[_uid(value[2 : 2 + n])] = (bool(value[2 + n]), bool(value[3 + n]))


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Decode the variable part of an A-ASSOCIATE-RQ PDU."""
    if len(body) < 68:
        raise DimseError("the A-ASSOCIATE-RQ is too short")
    rq = AssociateRequest(
        called_ae=body[4:20].decode("ascii", "replace").strip(" \x00"),
        calling_ae=body[20:36].decode("ascii", "replace").strip(" \x00"),
        contexts=[],
    )
    for kind, value in _items(body, 68, len(body)):
        if kind == 0x20:
            abstract, syntaxes = "", []
            for sub, sub_value in _items(value, 4, len(value)):
                if sub == 0x30:
                    abstract = _uid(sub_value)
                elif sub == 0x40:
                    syntaxes.append(_uid(sub_value))
            rq.contexts.append(ProposedContext(value[0], abstract, syntaxes))
        elif kind == 0x50:
            _user_information(rq, value)
    return rq


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return _HEADER.pack(kind, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def _our_user_information(max_pdu: int, extra: bytes = b"") -> bytes:
    return _item(
        0x50,
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + extra
        + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    )


def encode_associate_ac(
    rq: AssociateRequest, results: list[tuple[int, int, str]], max_pdu: int
) -> bytes:
    """An A-ASSOCIATE-AC answering ``rq``: results are (context id, result, transfer syntax)."""
    contexts = b"".join(
        _item(0x21, bytes([cid, 0, result, 0]) + _item(0x40, syntax.encode("ascii")))
        for cid, result, syntax in results
    )
    body = (
        struct.pack(">H2x", 1)
        + _ae(rq.called_ae)
        + _ae(rq.calling_ae)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
        + contexts
        + _our_user_information(max_pdu)
    )
    return _pdu(ASSOCIATE_AC, body)


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    return _pdu(ASSOCIATE_RJ, bytes([0, result, source, reason]))


def encode_abort(source: int, reason: int) -> bytes:
    """An A-ABORT PDU."""
    return _pdu(ABORT, bytes([0, 0, source, reason]))


RELEASE_RQ_PDU = _pdu(RELEASE_RQ, bytes(4))
RELEASE_RP_PDU = _pdu(RELEASE_RP, bytes(4))


def encode_associate_rq(
    calling_ae: str,
    called_ae: str,
    contexts: list[tuple[str, list[str]]],
    scp_roles: list[str],
    max_pdu: int,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` (ids 1, 3, 5, …) and SCP roles for classes."""
    if len(contexts) > 128:
        raise ValueError(f"{len(contexts)} presentation contexts: at most 128 fit")
    items = b"".join(
        _item(
            0x20,
            bytes([2 * index + 1, 0, 0, 0])
            + _item(0x30, abstract.encode("ascii"))
            + b"".join(_item(0x40, syntax.encode("ascii")) for syntax in syntaxes),
        )
        for index, (abstract, syntaxes) in enumerate(contexts)
    )
    roles = b"".join(
        _item(0x54, struct.pack(">H", len(uid)) + uid.encode("ascii") + b"\x00\x01")
        for uid in scp_roles
    )
    body = (
        struct.pack(">H2x", 1)
        + _ae(called_ae)
        + _ae(calling_ae)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
        + items
        + _our_user_information(max_pdu, roles)
    )
    return _pdu(ASSOCIATE_RQ, body)


def parse_associate_ac(
    body: bytes, proposed: list[tuple[str, list[str]]]
) -> tuple[dict[int, AcceptedContext], int]:
    """The accepted contexts of an A-ASSOCIATE-AC (by id) and the peer's maximum PDU."""
    if len(body) < 68:
        raise DimseError("the A-ASSOCIATE-AC is too short")
    accepted: dict[int, AcceptedContext] = {}
    max_pdu = 0
    for kind, value in _items(body, 68, len(body)):
        if kind == 0x21 and len(value) >= 4:
            cid, result = value[0], value[2]
            index = (cid - 1) // 2
            if result != 0 or cid % 2 == 0 or not 0 <= index < len(proposed):
                continue
            syntax = next((_uid(v) for k, v in _items(value, 4, len(value)) if k == 0x40), "")
            accepted[cid] = AcceptedContext(cid, proposed[index][0], syntax)
        elif kind == 0x50:
            info = AssociateRequest("", "", [])
            _user_information(info, value)
            max_pdu = info.max_pdu
    return accepted, max_pdu


# ---------------------------------------------------------------------------
# The connection: PDUs in and out, DIMSE messages assembled


@dataclass
class Message:
    """One DIMSE message: its context, command elements and (if any) the encoded dataset."""

    context_id: int
    command: dict[int, bytes]
    dataset: bytes | None = None

    @property
    def command_field(self) -> int | None:
        return us(self.command, CMD_FIELD)


class Link:
    """A DICOM upper-layer connection over a blocking socket."""

    def __init__(self, sock: socket.socket, timeout: float | None, max_receive: int = 0) -> None:
        self.sock = sock
        self.max_receive = max_receive  # what we announced (0: no limit)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.peer_max_pdu = 0
        self._command = bytearray()
        # Views into the PDU bodies (each read gets its own buffer): one copy, at the join.
        self._dataset: list[memoryview] = []
        self._pending: dict[int, bytes] | None = None
        self._pending_context = 0

    @property
    def send_pdu_limit(self) -> int:
        """Largest P-DATA-TF variable field we may send."""
        if not self.peer_max_pdu:
            return DEFAULT_SEND_PDU
        # A peer announcing less than DCMTK's minimum gets fragments of that minimum
        # (it would otherwise get none at all, or endless empty ones).
        return max(self.peer_max_pdu, MIN_SEND_PDU)

    def _read_exact(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if n == 0:
                raise DimseError("the peer closed the connection")
            got += n
        return buffer

    def read_pdu(self) -> tuple[int, bytearray]:
        """The next PDU's type and variable field.

        The type and length are checked before the body is read, so that a stray
        client (an HTTP request, a port scanner) is aborted at once instead of
        making the node wait for, or allocate, gigabytes it announced.
        """
        kind, length = _HEADER.unpack(self._read_exact(6))
        if not ASSOCIATE_RQ <= kind <= ABORT:
            raise UnrecognisedPDU(f"not a DICOM PDU (type 0x{kind:02X})")
        # Lenient with a sender that overshoots the limit we announced: the bound is only
        # there so that one header cannot make the node allocate gigabytes.
        limit = max(self.max_receive, MAX_PDU_CEILING)
        if kind == P_DATA and length > limit:
            raise DimseError(f"a P-DATA-TF PDU announces {length} bytes (at most {limit} taken)")
        if kind != P_DATA and length > MAX_CONTROL_PDU:
            raise DimseError(f"a PDU of type 0x{kind:02X} announces {length} bytes")
        return kind, self._read_exact(length)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        """Send one DIMSE message as P-DATA-TF PDUs within the peer's size limit."""
        chunk = self.send_pdu_limit - 6
        self._send_fragments(context_id, command, 0x01, chunk)
        if dataset is not None:
            self._send_fragments(context_id, dataset, 0x00, chunk)

    def _send_fragments(self, cid: int, data: bytes, kind: int, chunk: int) -> None:
        """One PDV a PDU; the last fragment of the command (or dataset) says so."""
        view = memoryview(data)
        pos = 0
        while True:
            piece = view[pos : pos + chunk]
            pos += len(piece)
            final = pos >= len(view)
            control = kind | (0x02 if final else 0x00)
            header = _HEADER.pack(P_DATA, len(piece) + 6) + _PDV.pack(len(piece) + 2, cid, control)
            if len(piece) < 65536:  # one send, one segment
                self.sock.sendall(header + piece)
            else:  # no copy of a large piece
                self.sock.sendall(header)
                self.sock.sendall(piece)
            if final:
                return

    def take_pdata(self, body: bytearray) -> list[Message]:
        """Feed one P-DATA-TF variable field; returns the messages it completes."""
        view = memoryview(body)
        pos, end = 0, len(body)
        messages = []
        while pos < end:
            if pos + 6 > end:
                raise DimseError("a P-DATA-TF item is truncated")
            length, cid, control = _PDV.unpack_from(body, pos)
            if length < 2 or pos + 4 + length > end:
                raise DimseError("a P-DATA-TF item is truncated")
            fragment = view[pos + 6 : pos + 4 + length]
            pos += 4 + length
            message = self._take_fragment(cid, control, fragment)
            if message is not None:
                messages.append(message)
        return messages

    def _take_fragment(self, cid: int, control: int, fragment: memoryview) -> Message | None:
        if control & 0x01:  # command
            if self._pending is not None:
                raise DimseError("a command fragment arrived while a dataset was expected")
            self._command += fragment
            if not control & 0x02:
                return None
            command = parse_command(self._command)
            self._command = bytearray()
            if us(command, CMD_DATASET_TYPE, NO_DATASET) == NO_DATASET:
                return Message(cid, command)
            self._pending, self._pending_context = command, cid
            return None
        if self._pending is None or cid != self._pending_context:
            raise DimseError("a dataset fragment arrived with no command before it")
        self._dataset.append(fragment)
        if not control & 0x02:
            return None
        data = b"".join(self._dataset)
        message = Message(cid, self._pending, data)
        self._pending, self._dataset = None, []
        return message

    def answer_store(self, request: Message, status: int, comment: str | None) -> None:
        """Send the C-STORE-RSP for ``request``."""
        command = request.command
        response = store_response(
            us(command, CMD_MESSAGE_ID, 0),
            ui(command, CMD_AFFECTED_SOP_CLASS),
            ui(command, CMD_AFFECTED_SOP_INSTANCE),
            status,
            comment,
        )
        self.send_message(request.context_id, response)

    def abort(self, source_reason: tuple[int, int] = ABORT_SERVICE_USER) -> None:
        """Send A-ABORT (if the socket still takes it) and close."""
        with contextlib.suppress(OSError):
            self.sock.sendall(encode_abort(*source_reason))
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# ---------------------------------------------------------------------------
# Acceptor: the server


@dataclass(eq=False)
class Association:
    """One accepted association as the node sees it."""

    link: Link
    calling_ae: str
    called_ae: str
    address: str
    port: int
    contexts: dict[int, AcceptedContext] = field(default_factory=dict)
    stored: int = 0
    failed: int = 0
    stopping: bool = False  # the node aborts it because the server is shutting down

    @property
    def peer(self) -> str:
        """``AE@host:port`` for logs."""
        return f"{self.calling_ae}@{self.address}:{self.port}"

    @property
    def socket(self) -> socket.socket:
        return self.link.sock


@dataclass(frozen=True)
class AcceptorPolicy:
    """What the acceptor supports and the callbacks that make the decisions.

    ``check(request, peer)`` returns an A-ASSOCIATE-RJ (result, source, reason)
    triple to refuse, or None. ``store(association, context, message)`` returns
    the C-STORE status and an optional error comment.
    """

    syntaxes: dict[str, list[str]]  # abstract syntax -> transfer syntaxes, preferred first
    check: Callable[[AssociateRequest, str], tuple[int, int, int] | None]
    store: Callable[[Association, AcceptedContext, Message], tuple[int, str | None]]
    max_pdu: int = 0
    acse_timeout: float = 30.0
    network_timeout: float | None = 60.0
    max_associations: int = 32


def negotiate(rq: AssociateRequest, syntaxes: dict[str, list[str]]) -> list[tuple[int, int, str]]:
    """(context id, result, transfer syntax) for each proposed context.

    The acceptor's order of preference decides among offered transfer syntaxes;
    0x03: abstract syntax not supported, 0x04: no transfer syntax supported.
    """
    results = []
    for proposed in rq.contexts:
        ours = syntaxes.get(proposed.abstract_syntax)
        first_offered = proposed.transfer_syntaxes[0] if proposed.transfer_syntaxes else ""
        if ours is None:
            results.append((proposed.context_id, 0x03, first_offered))
            continue
        chosen = next((s for s in ours if s in proposed.transfer_syntaxes), None)
        if chosen is None:
            results.append((proposed.context_id, 0x04, first_offered))
        else:
            results.append((proposed.context_id, 0x00, chosen))
    return results


class StorageServer(socketserver.ThreadingTCPServer):
    """Listens for associations, one thread each; :meth:`shutdown` stops and aborts them."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._active: set[Association] = set()
        super().__init__(address, _Handler)

    @property
    def active_associations(self) -> list[Association]:
        with self._lock:
            return list(self._active)

    def shutdown(self) -> None:
        """Stop listening, abort the associations still open, close the socket."""
        super().shutdown()
        self.server_close()
        for association in self.active_associations:
            association.stopping = True
            association.link.abort()

    def handle_error(self, request, client_address) -> None:
        """A coding error while serving one association: log it; the server carries on."""
        log.exception("association from %s:%s failed", *client_address[:2])

    def _admit(self, association: Association) -> bool:
        with self._lock:
            if len(self._active) >= self.policy.max_associations:
                return False
            self._active.add(association)
            return True

    def _leave(self, association: Association) -> None:
        with self._lock:
            self._active.discard(association)


class _Handler(socketserver.BaseRequestHandler):
    server: StorageServer

    def handle(self) -> None:
        policy = self.server.policy
        address, port = self.client_address[:2]
        link = Link(self.request, policy.acse_timeout, policy.max_pdu)
        self.association: Association | None = None
        try:
            try:
                accepted = self._associate(link, address, port)
            except (OSError, DimseError) as exc:
                log.warning("association from %s:%s failed before it began: %s", address, port, exc)
                unrecognised = isinstance(exc, UnrecognisedPDU)
                link.abort(ABORT_UNRECOGNISED_PDU if unrecognised else ABORT_UNEXPECTED_PDU)
                return
            if accepted:
                _serve(self.association, policy)
        finally:
            if self.association is not None:
                self.server._leave(self.association)

    def _associate(self, link: Link, address: str, port: int) -> bool:
        kind, body = link.read_pdu()
        if kind != ASSOCIATE_RQ:
            raise DimseError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
        rq = parse_associate_rq(body)
        peer = f"{rq.calling_ae}@{address}:{port}"
        association = Association(link, rq.calling_ae, rq.called_ae, address, port)
        self.association = association
        refusal = self.server.policy.check(rq, peer)
        if refusal is None and not self.server._admit(association):
            log.warning(
                "association from %s rejected: already %d associations open",
                peer,
                self.server.policy.max_associations,
            )
            refusal = (0x02, 0x03, 0x02)  # transient, service-provider, local limit exceeded
        if refusal is not None:
            link.send(encode_associate_rj(*refusal))
            _wait_for_close(link)
            return False
        link.peer_max_pdu = rq.max_pdu
        results = negotiate(rq, self.server.policy.syntaxes)
        proposed = {c.context_id: c.abstract_syntax for c in rq.contexts}
        association.contexts = {
            cid: AcceptedContext(cid, proposed[cid], syntax)
            for cid, result, syntax in results
            if result == 0x00
        }
        link.send(encode_associate_ac(rq, results, self.server.policy.max_pdu))
        link.sock.settimeout(self.server.policy.network_timeout)
        log.debug(
            "association from %s accepted with %d of %d contexts (implementation %s %s)",
            peer,
            len(association.contexts),
            len(rq.contexts),
            rq.implementation_class_uid,
            rq.implementation_version,
        )
        return True


def _wait_for_close(link: Link) -> None:
    """After A-ASSOCIATE-RJ or A-RELEASE-RP the requestor closes: wait (5 s at most) so
    that it reads the reply before the socket goes, else it would see an abort."""
    try:
        link.sock.settimeout(5)
        while link.sock.recv(4096):
            pass
    except OSError:
        pass
    link.close()


def _serve(association: Association, policy: AcceptorPolicy) -> None:
    """Answer messages until release or abort."""
    link = association.link
    try:
        while True:
            kind, body = link.read_pdu()
            if kind == P_DATA:
                for message in link.take_pdata(body):
                    _answer(association, policy, message)
            elif kind == RELEASE_RQ:
                link.send(RELEASE_RP_PDU)
                log.info(
                    "association from %s released: %d stored, %d refused",
                    association.peer,
                    association.stored,
                    association.failed,
                )
                _wait_for_close(link)
                return
            elif kind == ABORT:
                log.warning(
                    "association from %s aborted by the peer (%d stored; any instance in "
                    "transit was not stored)",
                    association.peer,
                    association.stored,
                )
                link.close()
                return
            else:
                raise DimseError(f"unexpected PDU type 0x{kind:02X}")
    except (OSError, DimseError) as exc:
        _ended(association, policy, exc)
    except Exception:  # a coding error: say so, and tell the peer rather than hang up
        log.exception("association from %s aborted: internal error", association.peer)
        link.abort()


def _ended(association: Association, policy: AcceptorPolicy, exc: Exception) -> None:
    """Log why an association ended other than by release, and close it."""
    link = association.link
    if association.stopping:
        log.info(
            "association from %s aborted: the node is stopping (%d stored)",
            association.peer,
            association.stored,
        )
    elif isinstance(exc, TimeoutError):
        log.warning(
            "association from %s aborted: silent for %s s (%d stored)",
            association.peer,
            policy.network_timeout,
            association.stored,
        )
        link.abort()
    elif isinstance(exc, DimseError):
        log.warning("association from %s aborted: %s", association.peer, exc)
        link.abort(ABORT_UNEXPECTED_PDU)
    else:
        log.warning("association from %s lost: %s", association.peer, exc)
        link.close()


def _answer(association: Association, policy: AcceptorPolicy, message: Message) -> None:
    context = association.contexts.get(message.context_id)
    if context is None:
        raise DimseError(f"a message on presentation context {message.context_id}, not accepted")
    command_field = message.command_field
    if command_field == C_STORE_RQ and message.dataset is not None:
        status, comment = policy.store(association, context, message)
        if status == 0:
            association.stored += 1
        else:
            association.failed += 1
        association.link.answer_store(message, status, comment)
    elif command_field == C_ECHO_RQ:
        response = echo_response(
            us(message.command, CMD_MESSAGE_ID, 0), ui(message.command, CMD_AFFECTED_SOP_CLASS)
        )
        association.link.send_message(message.context_id, response)
    else:
        raise DimseError(f"unsupported DIMSE command 0x{command_field or 0:04X}")


def start_server(policy: AcceptorPolicy, host: str, port: int, block: bool) -> StorageServer:
    """Listen on ``host:port``; serve in a daemon thread unless ``block``."""
    server = StorageServer((host, port), policy)
    if block:
        server.serve_forever()
        return server
    thread = threading.Thread(target=server.serve_forever, name=f"scp-{port}", daemon=True)
    thread.start()
    return server


# ---------------------------------------------------------------------------
# Requestor: one C-GET with its C-STORE sub-operations


@dataclass
class GetStatus:
    """The final C-GET-RSP: status, sub-operation counts and any error comment."""

    status: int
    completed: int
    failed: int
    warning: int
    comment: str = ""


class Requestor:
    """An association the node opens to a peer (used for C-GET)."""

    def __init__(
        self,
        host: str,
        port: int,
        calling_ae: str,
        called_ae: str,
        contexts: list[tuple[str, list[str]]],
        scp_roles: list[str],
        timeout: float | None,
        max_pdu: int = 0,
    ) -> None:
        self.called_ae = called_ae
        self.timeout = timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise DimseError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
        self.link = Link(sock, timeout, max_pdu)
        try:
            self.link.send(encode_associate_rq(calling_ae, called_ae, contexts, scp_roles, max_pdu))
            kind, body = self.link.read_pdu()
        except (OSError, DimseError) as exc:
            self.link.close()
            raise DimseError(f"association to {called_ae}@{host}:{port} failed: {exc}") from exc
        if kind == ASSOCIATE_RJ and len(body) >= 4:
            self.link.close()
            raise AssociationRejected(body[1], body[2], body[3])
        try:
            if kind != ASSOCIATE_AC:
                raise DimseError(f"association to {called_ae} aborted (PDU type 0x{kind:02X})")
            self.accepted, self.link.peer_max_pdu = parse_associate_ac(body, contexts)
        except DimseError:
            self.link.close()
            raise
        self._message_id = 0

    def context_for(self, abstract_syntax: str) -> AcceptedContext | None:
        return next(
            (c for c in self.accepted.values() if c.abstract_syntax == abstract_syntax), None
        )

    def get(
        self,
        sop_class: str,
        identifier: bytes,
        on_store: Callable[[AcceptedContext, Message], tuple[int, str | None]],
    ) -> GetStatus | None:
        """Send one C-GET-RQ, answer its C-STORE sub-operations; None if the peer aborted."""
        context = self.context_for(sop_class)
        if context is None:
            raise DimseError(f"{self.called_ae} accepted no presentation context for C-GET")
        self._message_id += 1
        try:
            self.link.send_message(
                context.context_id, get_request(self._message_id, sop_class), identifier
            )
            return self._get_responses(on_store)
        except TimeoutError as exc:
            raise DimseError(f"{self.called_ae} said nothing for {self.timeout} s") from exc
        except OSError as exc:
            raise DimseError(f"connection to {self.called_ae} lost: {exc}") from exc

    def _get_responses(self, on_store) -> GetStatus | None:
        while True:
            try:
                kind, body = self.link.read_pdu()
            except DimseError:  # the peer closed the connection
                return None
            if kind == ABORT:
                self.link.close()
                return None
            if kind != P_DATA:
                raise DimseError(f"unexpected PDU type 0x{kind:02X} during C-GET")
            for message in self.link.take_pdata(body):
                final = self._get_message(message, on_store)
                if final is not None:
                    return final

    def _get_message(self, message: Message, on_store) -> GetStatus | None:
        """Answer a C-STORE sub-operation; the final C-GET-RSP as a GetStatus, else None."""
        command_field = message.command_field
        if command_field == C_STORE_RQ and message.dataset is not None:
            sub_context = self.accepted.get(message.context_id)
            if sub_context is None:
                raise DimseError(f"C-STORE on context {message.context_id}, not accepted")
            self.link.answer_store(message, *on_store(sub_context, message))
        elif command_field == C_GET_RSP:
            status = us(message.command, CMD_STATUS, 0)
            if status in (0xFF00, 0xFF01):
                return None
            return GetStatus(
                status=status,
                completed=us(message.command, CMD_COMPLETED, 0),
                failed=us(message.command, CMD_FAILED, 0),
                warning=us(message.command, CMD_WARNING, 0),
                comment=ui(message.command, CMD_ERROR_COMMENT),
            )
        else:
            raise DimseError(f"unexpected DIMSE command 0x{command_field or 0:04X} in C-GET")
        return None

    def release(self) -> None:
        """A-RELEASE, then close (abort if the peer does not answer)."""
        try:
            self.link.send(RELEASE_RQ_PDU)
            while True:
                kind, _body = self.link.read_pdu()
                if kind in (RELEASE_RP, ABORT):
                    break
        except (OSError, DimseError):
            pass
        self.link.close()

    def abort(self) -> None:
        self.link.abort()
