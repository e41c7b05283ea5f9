"""The node's DICOM Storage SCP: association policy, C-ECHO and durable C-STORE handlers."""

from __future__ import annotations

import logging
import socket

from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from node.ingest import DatabaseUnavailable, Ingestor, Outcome
from node.part10 import DatasetError
from node.settings import Settings
from node.store import InstanceStore, StoreError

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110

# ACSE reject (result, source, reason) triples, PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider, local limit exceeded

# When one context offers several syntaxes we choose: lossless compressed first, so
# a sender holding compressed files never has to decompress them, then uncompressed,
# then lossy (never asking a sender to compress lossily if it can avoid it).
LOSSLESS_COMPRESSED = [
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    JPEGLSLossless,
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
UNCOMPRESSED = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
]
LOSSY = [
    JPEGLSNearLossless,
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
]
# Video syntaxes are left out: a chest CT study carries none, and every syntax listed
# here is copied for each storage class on every association.
ACCEPTED_TRANSFER_SYNTAXES = LOSSLESS_COMPRESSED + UNCOMPRESSED + LOSSY


def failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment the sender can log."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    return rsp


def peer_of(event: evt.Event) -> str:
    """``AE@host:port`` of the association's requestor, for logs."""
    requestor = event.assoc.requestor
    return f"{calling_ae_of(event)}@{requestor.address}:{requestor.port}"


def calling_ae_of(event: evt.Event) -> str:
    """The requestor's AE title, also before negotiation has copied it from the A-ASSOCIATE-RQ."""
    requestor = event.assoc.requestor
    title = requestor.ae_title or (
        requestor.primitive.calling_ae_title if requestor.primitive else ""
    )
    return title.strip()


def handle_conn_open(event: evt.Event) -> None:
    """Disable Nagle on every connection: DIMSE is request/response, Nagle stalls each one."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_requested(event: evt.Event, settings: Settings, store: InstanceStore) -> None:
    """Refuse an association from an unknown calling AE or when the disk is nearly full."""
    calling = calling_ae_of(event)
    allowed = settings.calling_ae_allow_list
    if allowed is not None and calling not in allowed:
        log.warning(
            "association from %s rejected: calling AE %r not recognised (allowed: %s)",
            peer_of(event),
            calling,
            ", ".join(sorted(allowed)) or "none",
        )
        _reject(event, REJECT_CALLING_AE)
        return
    free = store.free_bytes()
    if free < settings.min_free_disk_mb * 2**20:
        log.error(
            "association from %s rejected: %d MB free in the store, below the %d MB threshold",
            peer_of(event),
            free // 2**20,
            settings.min_free_disk_mb,
        )
        _reject(event, REJECT_LOCAL_LIMIT)


def _reject(event: evt.Event, reason: tuple[int, int, int]) -> None:
    # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ is out
    # and the peer has closed, else the socket is shut first and the peer sees an abort.
    event.assoc.acse.send_reject(*reason)
    event.assoc.kill()


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: the node is up."""
    return STATUS_SUCCESS


def handle_store(
    event: evt.Event, ingestor: Ingestor, source_ae: str | None = None
) -> int | Dataset:
    """C-STORE: answer success only once the file and its rows are committed.

    ``source_ae`` names the sender when it is not the association's requestor
    (the PACS answering our C-GET).
    """
    request = event.request
    syntax = str(event.context.transfer_syntax)
    source = source_ae or event.assoc.requestor.ae_title.strip()
    try:
        result = ingestor.ingest_dataset(request.DataSet.getvalue(), syntax, source)
    except DatasetError as exc:
        log.warning("C-STORE from %s refused, dataset not understood: %s", peer_of(event), exc)
        return failure(STATUS_CANNOT_UNDERSTAND, str(exc))
    except StoreError as exc:
        log.error("C-STORE from %s refused, store cannot write: %s", peer_of(event), exc)
        return failure(STATUS_OUT_OF_RESOURCES, f"store: {exc.strerror}")
    except DatabaseUnavailable as exc:
        log.error("C-STORE from %s refused, database: %s", peer_of(event), exc)
        return failure(STATUS_OUT_OF_RESOURCES, "database unavailable")
    if result.header.sop_instance_uid != request.AffectedSOPInstanceUID:
        # Stored under the dataset's own UID; the sender's command disagrees, so say so.
        log.warning(
            "C-STORE from %s: command UID %s differs from dataset UID %s",
            peer_of(event),
            request.AffectedSOPInstanceUID,
            result.header.sop_instance_uid,
        )
    if result.outcome is Outcome.DUPLICATE:
        log.debug(
            "C-STORE from %s: %s already stored", peer_of(event), result.header.sop_instance_uid
        )
    return STATUS_SUCCESS


def make_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and every storage SOP class in every transfer syntax."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = settings.network_timeout
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.network_timeout
    ae.maximum_associations = 32
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def start_scp(
    settings: Settings, ingestor: Ingestor, *, block: bool = False
) -> ThreadedAssociationServer | None:
    """Start listening on ``settings.dicom_host:dicom_port``; returns the server unless blocking."""
    ingestor.store.prepare()  # the fan-out folders, so no write pays for making its folder
    ae = make_ae(settings)
    handlers = [
        (evt.EVT_CONN_OPEN, handle_conn_open),
        (evt.EVT_REQUESTED, handle_requested, [settings, ingestor.store]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingestor]),
    ]
    log.info(
        "storage SCP %s listening on %s:%d",
        settings.ae_title,
        settings.dicom_host,
        settings.dicom_port,
    )
    return ae.start_server(
        (settings.dicom_host, settings.dicom_port), block=block, evt_handlers=handlers
    )
