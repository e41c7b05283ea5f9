"""The node's DICOM Storage SCP on pynetdicom: what it accepts and the durable C-STORE.

A C-STORE is answered success only after the received file is fsynced, renamed
into the store and its rows are committed. Who may associate and for how long
is ``node.dicom.acceptor``'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from node.dicom import spool
from node.dicom.acceptor import (
    STATUS_UNRECOGNISED_OPERATION,
    Associations,
    NodeAE,
    StorageServer,
    install_fsm_guard,
    peer_of,
    serve,
)
from node.dicom.network import server_tls_context
from node.ingest.ingestor import DatabaseUnavailable, Ingestor, Outcome
from node.ingest.part10 import DatasetError, DatasetMismatch, DatasetTooLarge
from node.ingest.store import StoreError
from node.records import scp_stats
from node.settings import Settings

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
# /metrics labels of the refusals (ainode_instances_refused_total{reason}), by the status sent
REFUSAL_REASONS = {
    STATUS_OUT_OF_RESOURCES: "out_of_resources",  # store cannot write, too large, database
    STATUS_DATASET_MISMATCH: "dataset_mismatch",
    STATUS_CANNOT_UNDERSTAND: "cannot_understand",
    STATUS_SOP_CLASS_NOT_SUPPORTED: "sop_class_not_supported",
    STATUS_UNRECOGNISED_OPERATION: "unrecognised_operation",
}

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
# Video syntaxes are left out: a chest CT study carries none.
ACCEPTED_TRANSFER_SYNTAXES = LOSSLESS_COMPRESSED + UNCOMPRESSED + LOSSY


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def handle_store(event: evt.Event, ingestor: Ingestor, associations: Associations | None):
    """EVT_C_STORE: answer success only once the file and its rows are committed."""
    association = event.assoc
    request = event.request
    peer = peer_of(association)
    tally = associations.get(association) if associations is not None else None
    if tally is not None:
        tally.busy = True
    spooled = None
    if isinstance(request, C_STORE):
        spooled = association.ae.spool.file_for(association, event.dataset_path)
    try:
        status = _store(event, ingestor, peer, spooled)
    finally:
        if spooled is not None:
            association.ae.spool.done(association, spooled)
        if tally is not None:
            tally.busy = False
            # The peer waited for this answer: its silence meanwhile is not a timeout.
            association.dul._idle_timer.restart()
    if tally is not None:
        if isinstance(status, Dataset):
            tally.refused += 1
            if associations.stats is not None:
                reason = REFUSAL_REASONS.get(int(status.Status), f"0x{int(status.Status):04X}")
                associations.stats.count(scp_stats.INSTANCE_REFUSED, reason)
        else:
            tally.stored += 1
    log.debug("%s from %s: %s", request.msg_type, peer, status)
    return status


def _store(event: evt.Event, ingestor: Ingestor, peer: str, spooled) -> int | Dataset:
    request, context = event.request, event.context
    if not isinstance(request, C_STORE):
        # pynetdicom hands any request on a storage context to the storage handler
        log.warning("%s from %s refused: not a storage operation", request.msg_type, peer)
        return _status(STATUS_UNRECOGNISED_OPERATION, f"{request.msg_type} is not supported")
    command_class = str(request.AffectedSOPClassUID)
    if command_class != context.abstract_syntax:
        log.warning(
            "C-STORE from %s refused: SOP class %s sent on a context for %s",
            peer,
            command_class,
            context.abstract_syntax,
        )
        return _status(STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP class differs from its context")
    limit_mb = ingestor.max_inflated_bytes // 2**20
    if spooled is not None and spooled.error is not None:
        log.error("C-STORE from %s refused, store cannot write: %s", peer, spooled.error)
        return _status(STATUS_OUT_OF_RESOURCES, f"store: {spooled.error.strerror}")
    if spooled is not None and spooled.too_large:
        log.error("C-STORE from %s refused: dataset over %d MB", peer, limit_mb)
        return _status(STATUS_OUT_OF_RESOURCES, f"dataset larger than {limit_mb} MB: not kept")
    try:
        result = ingestor.ingest_file(
            Path(event.dataset_path), peer.split("@")[0], expected_sop_class=command_class
        )
    except DatasetMismatch as exc:
        log.warning("C-STORE from %s refused: %s", peer, exc)
        return _status(STATUS_DATASET_MISMATCH, "dataset SOP class differs from the command's")
    except DatasetTooLarge as exc:
        log.error("C-STORE from %s refused: %s", peer, exc)
        return _status(STATUS_OUT_OF_RESOURCES, str(exc))
    except DatasetError as exc:
        log.warning("C-STORE from %s refused, dataset not understood: %s", peer, exc)
        return _status(STATUS_CANNOT_UNDERSTAND, str(exc))
    except StoreError as exc:
        log.error("C-STORE from %s refused, store cannot write: %s", peer, exc)
        return _status(STATUS_OUT_OF_RESOURCES, f"store: {exc.strerror}")
    except DatabaseUnavailable as exc:
        log.error("C-STORE from %s refused, database: %s", peer, exc)
        return _status(STATUS_OUT_OF_RESOURCES, "database unavailable")
    header = result.header
    if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
        log.warning(
            "C-STORE from %s: command UID %s differs from dataset UID %s",
            peer,
            request.AffectedSOPInstanceUID,
            header.sop_instance_uid,
        )
    if result.outcome is Outcome.DUPLICATE:
        log.debug("C-STORE from %s: %s already stored", peer, header.sop_instance_uid)
    return STATUS_SUCCESS


def supported_contexts(ae: AE) -> None:
    """Verification, and every storage SOP class in every transfer syntax we accept."""
    ae.add_supported_context(Verification, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)


def start_scp(settings: Settings, ingestor: Ingestor) -> StorageServer:
    """Start listening on ``settings.dicom_host:dicom_port``; ``server.shutdown()`` stops it."""
    ingestor.store.prepare()  # the fan-out folders, so no write pays for making its folder
    spool.install()
    install_fsm_guard()
    receive = spool.Spool(ingestor.spool_folder(), ingestor.max_inflated_bytes)
    ae = NodeAE(settings, ingestor.store, receive, ingestor.session_factory)
    supported_contexts(ae)
    associations = Associations(stats=scp_stats.ScpStats(ingestor.session_factory))
    context = server_tls_context(settings)
    server = serve(
        ae, associations, context, [(evt.EVT_C_STORE, handle_store, [ingestor, associations])]
    )
    log.info(
        "storage SCP %s listening on %s:%d%s",
        settings.ae_title,
        settings.dicom_host,
        settings.dicom_port,
        " (DICOM TLS)" if context else "",
    )
    return server
