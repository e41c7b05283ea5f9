"""The node's DICOM Storage SCP: association policy and the durable C-STORE (on ``node.dimse``)."""

from __future__ import annotations

import logging
import socket

from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from node import dimse
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


def handle_conn_open(event: evt.Event) -> None:
    """Disable Nagle on a pynetdicom connection (DIMSE is request/response: Nagle stalls it)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def check_association(
    request: dimse.AssociateRequest, peer: str, settings: Settings, store: InstanceStore
) -> tuple[int, int, int] | None:
    """Refuse an association from an unknown calling AE or when the disk is nearly full."""
    allowed = settings.calling_ae_allow_list
    if allowed is not None and request.calling_ae not in allowed:
        log.warning(
            "association from %s rejected: calling AE %r not recognised (allowed: %s)",
            peer,
            request.calling_ae,
            ", ".join(sorted(allowed)) or "none",
        )
        return REJECT_CALLING_AE
    free = store.free_bytes()
    if free < settings.min_free_disk_mb * 2**20:
        log.error(
            "association from %s rejected: %d MB free in the store, below the %d MB threshold",
            peer,
            free // 2**20,
            settings.min_free_disk_mb,
        )
        return REJECT_LOCAL_LIMIT
    return None


def store_instance(
    ingestor: Ingestor,
    message: dimse.Message,
    transfer_syntax: str,
    source_ae: str,
    peer: str,
) -> tuple[int, str | None]:
    """C-STORE: answer success only once the file and its rows are committed.

    Returns the status and, for a failure, an Error Comment the sender can log.
    """
    try:
        result = ingestor.ingest_dataset(message.dataset, transfer_syntax, source_ae)
    except DatasetError as exc:
        log.warning("C-STORE from %s refused, dataset not understood: %s", peer, exc)
        return STATUS_CANNOT_UNDERSTAND, str(exc)
    except StoreError as exc:
        log.error("C-STORE from %s refused, store cannot write: %s", peer, exc)
        return STATUS_OUT_OF_RESOURCES, f"store: {exc.strerror}"
    except DatabaseUnavailable as exc:
        log.error("C-STORE from %s refused, database: %s", peer, exc)
        return STATUS_OUT_OF_RESOURCES, "database unavailable"
    command_uid = dimse.ui(message.command, dimse.CMD_AFFECTED_SOP_INSTANCE)
    if result.header.sop_instance_uid != command_uid:
        # Stored under the dataset's own UID; the sender's command disagrees, so say so.
        log.warning(
            "C-STORE from %s: command UID %s differs from dataset UID %s",
            peer,
            command_uid,
            result.header.sop_instance_uid,
        )
    if result.outcome is Outcome.DUPLICATE:
        log.debug("C-STORE from %s: %s already stored", peer, result.header.sop_instance_uid)
    return STATUS_SUCCESS, None


def supported_syntaxes() -> dict[str, list[str]]:
    """Verification, and every storage SOP class in every transfer syntax we accept."""
    syntaxes = {Verification: ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]}
    for context in AllStoragePresentationContexts:
        syntaxes[context.abstract_syntax] = ACCEPTED_TRANSFER_SYNTAXES
    return syntaxes


def start_scp(
    settings: Settings, ingestor: Ingestor, *, block: bool = False
) -> dimse.StorageServer:
    """Start listening on ``settings.dicom_host:dicom_port``; returns the server once it stops
    if blocking, else at once (``server.shutdown()`` stops it)."""
    ingestor.store.prepare()  # the fan-out folders, so no write pays for making its folder

    def store(association: dimse.Association, context, message) -> tuple[int, str | None]:
        return store_instance(
            ingestor, message, context.transfer_syntax, association.calling_ae, association.peer
        )

    policy = dimse.AcceptorPolicy(
        syntaxes=supported_syntaxes(),
        check=lambda request, peer: check_association(request, peer, settings, ingestor.store),
        store=store,
        max_pdu=settings.max_pdu_size,
        acse_timeout=30,
        network_timeout=settings.network_timeout,
        max_associations=settings.max_associations,
    )
    log.info(
        "storage SCP %s listening on %s:%d",
        settings.ae_title,
        settings.dicom_host,
        settings.dicom_port,
    )
    return dimse.start_server(policy, settings.dicom_host, settings.dicom_port, block)
