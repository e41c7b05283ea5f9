"""pynetdicom's acceptor with the node's admission policy and wall-clock limits.

pynetdicom negotiates and runs each association. The node adds: who may associate
(calling AE allow-list, called AE, free disk, the association limit), a cap on
connections not yet associated, the TLS handshake in the connection's own thread,
a watchdog that holds every association to acse_timeout / network_timeout by the
wall clock (pynetdicom's timeouts apply per read, so a peer trickling bytes would
otherwise hold its thread for ever), and one closing log line per association.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from pydicom import Dataset
from pynetdicom import AE, evt, fsm
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _MESSAGE_TYPES, DIMSEMessage
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_items import PresentationContextItemRQ
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from node.dicom import spool
from node.dicom.network import configure_ae, handle_conn_open
from node.ingest.store import InstanceStore
from node.records import outbox, scp_stats
from node.records.db import describe
from node.settings import Settings

log = logging.getLogger("node.dicom.scp")  # one logger for everything the SCP says

REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called AE not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider, local limit exceeded

_NOBODY = "\\"  # not a valid AE title: an allow-list holding only this admits no one
STATS_REFRESH_SECONDS = 15.0  # the SCP says it is listening (after probing itself) this often


def peer_of(association) -> str:
    """``AE@host`` of the other end of an association (``?`` before it names itself)."""
    other = association.requestor if association.is_acceptor else association.acceptor
    return f"{(other.ae_title or '?').strip()}@{other.address}"


class NodeAE(AE):
    """The node's acceptor AE: pynetdicom's negotiation with the node's admission policy.

    pynetdicom rejects an association as "local limit exceeded" (transient) when its
    acceptors outnumber ``maximum_associations``, which it reads once per association
    it negotiates. The node answers the same when the store's disk is nearly full, so
    a PACS keeps the study and retries later rather than sending it to fail instance
    by instance.
    """

    def __init__(
        self,
        settings: Settings,
        store: InstanceStore,
        receive: spool.Spool,
        session_factory: sessionmaker | None = None,  # for the disk guard's notification
    ) -> None:
        super().__init__(ae_title=settings.ae_title)
        self.settings, self.store, self.spool = settings, store, receive
        self.session_factory = session_factory
        self._disk_low_lock = threading.Lock()
        configure_ae(self, settings)
        self.require_called_aet = settings.require_called_aet

    def notify_disk_low(self, peer: str) -> None:
        """Put the disk guard's refusal of ``peer`` in the notification outbox (one event per
        ``notify_disk_low_every_minutes``, however many associations are refused meanwhile)."""
        if self.session_factory is None or not outbox.wanted(self.settings, outbox.DISK_LOW):
            return
        free_mb = self.store.free_bytes() // 2**20
        with self._disk_low_lock:  # the check and the insert, one association at a time
            try:
                with self.session_factory() as session, session.begin():
                    outbox.on_disk_low(session, self.settings, free_mb, peer)
            except DBAPIError as exc:
                log.error("disk guard notification not recorded: %s", describe(exc))

    def disk_is_low(self) -> bool:
        """Whether the store has less free space than ``min_free_disk_mb``."""
        return self.store.free_bytes() < self.settings.min_free_disk_mb * 2**20

    @property
    def maximum_associations(self) -> int:
        """``max_associations``, or 0 (admit no more) while the disk is low."""
        return 0 if self.disk_is_low() else self.settings.max_associations

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        raise AttributeError("the node's association limit is the max_associations setting")

    @property
    def require_calling_aet(self) -> list[str]:
        """The calling AE allow-list (empty: any AE; no one when the list is set but empty)."""
        allowed = self.settings.calling_ae_allow_list
        if allowed is None:
            return []
        return sorted(allowed) or [_NOBODY]

    @require_calling_aet.setter
    def require_calling_aet(self, value: list[str]) -> None:
        raise AttributeError("the calling AE allow-list is the allowed_calling_aes setting")


STATUS_UNRECOGNISED_OPERATION = 0x0211
_NO_DATASET = 0x0101


class NodeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, answering a request it cannot decode instead of aborting.

    pynetdicom knows the DIMSE-C and DIMSE-N command fields; for any other it raises while
    decoding and the association is lost with everything queued on it. PS3.7 lets the
    receiver answer such a request with 0x0211 "unrecognised operation": the node does,
    reads and drops the data set that follows it, and the association carries on.
    """

    _skipping = False  # dropping the data set of an unrecognised request
    _pending_answer: tuple | None = None  # (command, context id) answered once it is read

    def receive_primitive(self, primitive) -> None:
        if self._skipping:
            self._skip(primitive.presentation_data_value_list)
            return
        try:
            super().receive_primitive(primitive)
        except KeyError:
            message, self.message = self.message, None
            command = getattr(message, "command_set", None)
            field_ = command.get("CommandField") if command is not None else None
            if field_ is None or field_ in _MESSAGE_TYPES:
                raise  # not an unknown command: pynetdicom's own failure stands
            self._unrecognised(command, message.context_id, primitive)

    def _unrecognised(self, command: Dataset, context_id: int, primitive) -> None:
        peer = peer_of(self.assoc)
        field_ = int(command.CommandField)
        if field_ & 0x8000:
            log.warning("DIMSE response 0x%04X from %s dropped: no such operation", field_, peer)
        elif "MessageID" not in command:
            log.warning("DIMSE command 0x%04X from %s without a message ID dropped", field_, peer)
        else:
            log.warning("DIMSE command 0x%04X from %s answered 0x0211 (unrecognised)", field_, peer)
            self._pending_answer = (command, context_id)
        if command.get("CommandDataSetType", _NO_DATASET) != _NO_DATASET:
            # the data set follows: in this PDU, behind the command's last fragment, or later
            pdvs = primitive.presentation_data_value_list
            last_command = max(i for i, (_, data) in enumerate(pdvs) if data[0] & 1)
            self._skipping = True
            self._skip(pdvs[last_command + 1 :])
        else:
            self._answer()

    def _skip(self, pdvs) -> None:
        if any(not data[0] & 1 and data[0] & 2 for _, data in pdvs):
            self._skipping = False  # the data set's last fragment
            self._answer()

    def _answer(self) -> None:
        pending, self._pending_answer = self._pending_answer, None
        if pending is None:
            return
        command, context_id = pending
        response = DIMSEMessage()
        response.command_set = answer = Dataset()
        answer.CommandGroupLength = 0
        if "AffectedSOPClassUID" in command:
            answer.AffectedSOPClassUID = command.AffectedSOPClassUID
        answer.CommandField = int(command.CommandField) | 0x8000
        answer.MessageIDBeingRespondedTo = command.MessageID
        answer.CommandDataSetType = _NO_DATASET
        answer.Status = STATUS_UNRECOGNISED_OPERATION
        response._set_command_group_length()
        for pdata in response.encode_msg(context_id, self.maximum_pdu_size):
            self.dul.send_pdu(pdata)


@dataclass
class _Tally:
    """What one association did, for its closing log line."""

    association: object
    opened: float
    stored: int = 0
    refused: int = 0
    busy: bool = False
    peer_aborted: bool = False
    woken: bool = False
    ended: str | None = None  # why the node ended it, once known


@dataclass
class Associations:
    """The server's view of its connections, keyed by association object id."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tallies: dict[int, _Tally] = field(default_factory=dict)
    stats: scp_stats.ScpStats | None = None  # refusals and gauges for /metrics and /healthz

    def get(self, association) -> _Tally:
        with self.lock:
            tally = self.tallies.get(id(association))
            if tally is None:
                tally = self.tallies[id(association)] = _Tally(association, time.monotonic())
            return tally

    def finished(self) -> list[_Tally]:
        """Tallies of associations whose threads have ended (removed from the view)."""
        with self.lock:
            done = [
                t
                for t in self.tallies.values()
                if t.association.ident is not None  # started (a new one is not yet)
                and not t.association.is_alive()
                and not t.association.dul.is_alive()
            ]
            for tally in done:
                del self.tallies[id(tally.association)]
        return done


class StorageServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's connection limits and watchdog."""

    ae: NodeAE
    associations: Associations
    stopping: threading.Event
    watchdog: threading.Thread

    def start(self, associations: Associations) -> None:
        """Serve, with the watchdog over ``associations`` (the handlers' shared view)."""
        self.associations = associations
        self.handshakes = 0
        self._handshake_lock = threading.Lock()
        self.probes: set[tuple[str, int]] = set()  # local ends of the SCP's own probes
        self._refreshed = 0.0
        self.stopping = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="scp-watchdog", daemon=True)
        self.watchdog.start()
        self.ae._servers.append(self)  # pynetdicom's own bookkeeping, as AE.start_server does
        threading.Thread(target=self.serve_forever, name="storage-scp", daemon=True).start()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; TLS is wrapped without its handshake, which the association's
        own thread performs (a client that never completes it cannot hold up the server)."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request, client_address) -> bool:
        """Refuse a connection while ``max_pending_connections`` have not yet associated
        (TLS handshakes in progress count too); the SCP's own probe is closed unlogged."""
        if tuple(client_address[:2]) in self.probes:
            self.probes.discard(tuple(client_address[:2]))
            return False
        pending = len([a for a in self.active_associations if not a.is_established])
        pending += self.handshakes
        if pending >= self.ae.settings.max_pending_connections:
            log.warning(
                "connection from %s:%s closed: %d connections have not yet associated "
                "(max_pending_connections)",
                *client_address[:2],
                pending,
            )
            return False
        return True

    def process_request_thread(self, request, client_address) -> None:
        """Complete the TLS handshake in the connection's own thread, within acse_timeout,
        before pynetdicom sees the connection: a failed one is closed and said why."""
        if isinstance(request, ssl.SSLSocket):
            with self._handshake_lock:
                self.handshakes += 1
            try:
                request.settimeout(self.ae.settings.acse_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
                log.warning(
                    "connection from %s:%s closed: TLS handshake failed (%s)",
                    *client_address[:2],
                    reason or exc,
                )
                self.shutdown_request(request)
                return
            finally:
                with self._handshake_lock:
                    self.handshakes -= 1
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop listening and abort open associations (saying why)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for association in self.active_associations:
            if association.is_released or association.is_aborted:
                continue  # ending already
            tally = self.associations.get(association)
            tally.ended = tally.ended or "the node is stopping"
            association.abort()
        super().shutdown()
        self.watchdog.join()
        if self.associations.stats is not None:
            self.associations.stats.gauge(scp_stats.LISTENING, 0)
            self.associations.stats.gauge(scp_stats.ASSOCIATIONS_OPEN, 0)
            self.associations.stats.flush(refresh=True)
        deadline = time.monotonic() + 5
        while self.associations.tallies and time.monotonic() < deadline:
            for tally in self.associations.finished():
                _log_end(tally, self.ae.spool.discard_association(tally.association))
            time.sleep(0.05)

    def _watch(self) -> None:
        """Wall-clock limits: pynetdicom's timeouts apply per ``recv``, so a peer sending
        a byte now and then would hold its thread for ever without this."""
        while not self.stopping.wait(0.25):
            try:
                self._watch_once()
                self._record_stats()
            except Exception:  # the watchdog must outlive anything one association does
                log.exception("SCP watchdog pass failed")

    def _record_stats(self) -> None:
        """Write the counts and gauges; every STATS_REFRESH_SECONDS probe the listening
        socket and say (with a fresh time) that the SCP listens."""
        stats = self.associations.stats
        if stats is None:
            return
        open_now = len([a for a in self.active_associations if a.is_established])
        stats.gauge(scp_stats.ASSOCIATIONS_OPEN, open_now)
        refresh = time.monotonic() - self._refreshed >= STATS_REFRESH_SECONDS
        if refresh:
            self._refreshed = time.monotonic()
            stats.gauge(scp_stats.LISTENING, int(self._probe()))
        stats.flush(refresh=refresh)

    def _probe(self) -> bool:
        """Whether a connection to the SCP's own address is accepted (closed unlogged)."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::", ""):
            host = "::1" if host == "::" else "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.settimeout(2.0)
                probe.bind((host, 0))
                local = tuple(probe.getsockname()[:2])
                self.probes.add(local)
                try:
                    probe.connect((host, port))
                except OSError:
                    self.probes.discard(local)
                    raise
        except OSError as exc:
            log.error("storage SCP does not accept connections on %s:%d: %s", host, port, exc)
            return False
        return True

    def _watch_once(self) -> None:
        settings = self.ae.settings
        for tally in self.associations.finished():
            _log_end(tally, self.ae.spool.discard_association(tally.association))
        now = time.monotonic()
        for association in self.active_associations:
            tally = self.associations.get(association)
            if tally.busy:
                continue
            if not association.is_established and not association.is_aborted:
                if (
                    association.requestor.primitive is None
                    and association.dul.ident is not None  # its reader started, and ended
                    and not association.dul.is_alive()
                ):
                    # Closed before its A-ASSOCIATE-RQ: pynetdicom's acceptor would wait out
                    # acse_timeout for it; an empty message ends its wait now.
                    if not tally.woken:
                        tally.woken = True
                        association.dul.to_user_queue.put(None)
                elif now - tally.opened > settings.acse_timeout:
                    limit = f"no association within {settings.acse_timeout:g} s"
                    tally.ended = tally.ended or limit
                    _cut(association)
            elif not association.accepted_contexts and not association.rejected_contexts:
                # PS3.8 9.3.2: a request offers one or more presentation contexts; pynetdicom
                # accepts one that offers none, and nothing can be done on it
                tally.ended = tally.ended or "it offered no presentation context"
                _cut(association)
            elif association.dul.idle_timer_expired():
                # also when pynetdicom aborted already: its reader may still be
                # blocked on a peer that trickles bytes
                tally.ended = tally.ended or f"silent for {settings.network_timeout:g} s"
                _cut(association)


def _cut(association) -> None:
    """Send A-ABORT and close the connection, whatever its thread is blocked on."""
    sock = association.dul.socket.socket if association.dul.socket else None
    if sock is None:
        return
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = 0x02, 0x00  # service provider, no reason given
    with contextlib.suppress(OSError, ValueError):
        sock.sendall(abort.encode())
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)


def handle_aborted(event: evt.Event, associations: Associations) -> None:
    """Note why pynetdicom aborted an association (the node's own aborts say so themselves)."""
    association = event.assoc
    tally = associations.get(association)
    if tally.ended is None and not tally.peer_aborted and association.dul.idle_timer_expired():
        # pynetdicom's reactor aborted it: the peer sent nothing for network_timeout
        tally.ended = f"silent for {association.ae.network_timeout:g} s"


def handle_pdu_recv(event: evt.Event, associations: Associations) -> None:
    """Note an A-ABORT from the peer."""
    if isinstance(event.pdu, A_ABORT_RQ):
        associations.get(event.assoc).peer_aborted = True


def _log_end(tally: _Tally, left: int) -> None:
    """Say how an association ended, once its threads are done."""
    association = tally.association
    peer = peer_of(association)
    counts = f"{tally.stored} stored, {tally.refused} refused"
    transit = "; an instance in transit was not stored" if left else ""
    if association.is_released:
        log.info("association from %s released: %s", peer, counts)
    elif tally.ended == "the node is stopping":
        log.info("association from %s aborted: the node is stopping (%s%s)", peer, counts, transit)
    elif tally.ended:
        log.warning("association from %s aborted: %s (%s%s)", peer, tally.ended, counts, transit)
    elif tally.peer_aborted:
        log.warning("association from %s aborted by the peer (%s%s)", peer, counts, transit)
    elif association.is_rejected:
        pass  # handle_rejected said why
    elif association.acceptor.primitive is None and not (tally.stored or tally.refused):
        log.warning("connection from %s closed before it associated", peer)
    else:
        log.warning("association from %s lost: the connection closed (%s%s)", peer, counts, transit)


def handle_rejected(event: evt.Event, associations: Associations | None = None) -> None:
    """Say why an association was rejected, in the words a PACS administrator needs (and
    count it by reason)."""
    reason = _log_rejection(event.assoc)
    if associations is not None and associations.stats is not None:
        associations.stats.count(scp_stats.ASSOCIATION_REJECTED, reason)


def _log_rejection(association) -> str:
    """Log why ``association`` was rejected; returns the reason's metric label."""
    ae: NodeAE = association.ae
    primitive = association.acceptor.primitive
    result = (primitive.result, primitive.result_source, primitive.diagnostic)
    peer = peer_of(association)
    if result == REJECT_CALLING_AE:
        allowed = ae.settings.calling_ae_allow_list or set()
        log.warning(
            "association from %s rejected: calling AE %r not recognised (allowed: %s)",
            peer,
            association.requestor.ae_title,
            ", ".join(sorted(allowed)) or "none",
        )
        return "calling_ae"
    elif result == REJECT_CALLED_AE:
        log.warning(
            "association from %s rejected: called AE %r is not this node's %r",
            peer,
            association.requestor.primitive.called_ae_title,
            ae.ae_title,
        )
        return "called_ae"
    elif ae.disk_is_low():
        log.error(
            "association from %s rejected: %d MB free in the store, below the %d MB threshold",
            peer,
            ae.store.free_bytes() // 2**20,
            ae.settings.min_free_disk_mb,
        )
        ae.notify_disk_low(peer)
        return "disk_low"
    elif result == REJECT_LOCAL_LIMIT:
        log.warning(
            "association from %s rejected: already %d associations open (max_associations)",
            peer,
            ae.settings.max_associations,
        )
        return "association_limit"
    log.warning("association from %s rejected: %s", peer, result)
    return "other"


def handle_accepted(event: evt.Event) -> None:
    """Log the peer's implementation (what a PACS administrator asks first), and say so when
    none of what it offered can be used: it can then only release."""
    association = event.assoc
    requestor = association.requestor
    log.debug(
        "association from %s accepted (implementation %s %s)",
        peer_of(association),
        requestor.implementation_class_uid,
        requestor.implementation_version_name or "",
    )
    settings = association.ae.settings
    known = set(settings.allowed_calling_aes) | {p.ae_title for p in settings.peers}
    if settings.accept_any_calling_ae and requestor.ae_title.strip() not in known:
        log.info(
            "association from %s accepted: calling AE not in the allow-list "
            "(accept_any_calling_ae)",
            peer_of(association),
        )
    if association.rejected_contexts and not association.accepted_contexts:
        offered = sorted({str(cx.abstract_syntax.name) for cx in association.rejected_contexts})
        log.warning(
            "association from %s has no presentation context the node accepts (offered: %s)",
            peer_of(association),
            ", ".join(offered),
        )


def serve(ae: NodeAE, associations: Associations, tls, handlers: list) -> StorageServer:
    """Start ``ae``'s server on its settings' address with the node's policy handlers and
    ``handlers`` (the services), watched by the watchdog; returns it running."""

    def opened(event: evt.Event) -> None:
        handle_conn_open(event)
        event.assoc.dimse = NodeDIMSE(event.assoc)
        associations.get(event.assoc)

    policy = [
        (evt.EVT_CONN_OPEN, opened),
        (evt.EVT_ABORTED, handle_aborted, [associations]),
        (evt.EVT_PDU_RECV, handle_pdu_recv, [associations]),
        (evt.EVT_REJECTED, handle_rejected, [associations]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_REQUESTED, handle_requested),
    ]
    server = ae.make_server(
        (ae.settings.dicom_host, ae.settings.dicom_port),
        ssl_context=tls,
        evt_handlers=policy + handlers,
        server_class=StorageServer,
    )
    server.start(associations)
    return server


def _drop_local_primitive(dul) -> str:
    """Discard what the node asked to send while the connection is already closing."""
    with contextlib.suppress(queue.Empty):
        dul.to_provider_queue.get(False)
    return "Sta13"


def _request_or_abort(dul) -> str:
    """AE-6, except that a request pynetdicom cannot turn into a primitive is an invalid
    PDU (PS3.8 9.3.2.2: presentation context IDs are odd, 1-255; pynetdicom raises on an
    even one after it has read the request): A-ABORT it (AA-8: the association's thread
    gets an A-P-ABORT where it waits for the request; :func:`handle_requested` ends it)
    instead of losing the connection's threads with a traceback. So is a request with a
    presentation context that has no abstract syntax (one is required; pynetdicom raises on
    it later, in the association's thread, and the connection stayed open)."""
    request = dul._recv_pdu.queue[0] if dul._recv_pdu.queue else None
    if request is not None and _context_without_abstract_syntax(request):
        dul._recv_pdu.get(False)
        log.warning("association request refused (aborted): a presentation context has no "
                    "abstract syntax")  # fmt: skip
        return fsm.AA_8(dul)
    try:
        return _AE_6(dul)
    except ValueError as exc:
        log.warning("association request refused (aborted): %s", exc)
        return fsm.AA_8(dul)


def _context_without_abstract_syntax(request) -> bool:
    contexts = [i for i in request.variable_items if isinstance(i, PresentationContextItemRQ)]
    return any(context.abstract_syntax is None for context in contexts)


def handle_requested(event: evt.Event) -> None:
    """End an association whose request :func:`_request_or_abort` aborted: close the
    connection (the A-ABORT is sent) and stop its threads, before pynetdicom negotiates."""
    association = event.assoc
    primitive = association.requestor.primitive
    if isinstance(primitive, A_P_ABORT):
        association.is_aborted = True
        sock = association.dul.socket.socket if association.dul.socket else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        association.kill()


_AE_6 = fsm.AE_6


def install_fsm_guard() -> None:
    """Let pynetdicom's state machine drop a local request that meets a closing connection.

    PS3.8's state table has no entry for a local A-ASSOCIATE response, P-DATA, release
    or abort in Sta13 (awaiting transport close), and pynetdicom raises there: a peer that
    sends another PDU right behind its A-ASSOCIATE-RQ has the DUL abort (Sta13) while the
    node's reactor is still answering, and the reader thread then dies with a traceback.
    Dropping the late primitive is what the closing connection needs. Also: a request
    with an invalid presentation context ID is aborted (:func:`_request_or_abort`).
    Idempotent.
    """
    fsm.ACTIONS.setdefault(
        "AINODE-1",
        ("Drop a local primitive: the connection is closing", _drop_local_primitive, "Sta13"),
    )
    for event in ("Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"):
        fsm.TRANSITION_TABLE.setdefault((event, "Sta13"), "AINODE-1")
    description, _action, states = fsm.ACTIONS["AE-6"]
    fsm.ACTIONS["AE-6"] = (description, _request_or_abort, states)
