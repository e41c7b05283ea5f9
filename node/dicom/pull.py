"""Pull "Tórax Simple" studies from a PACS: C-FIND, then C-GET (or C-MOVE) what is missing.

Orthanc's C-FIND matching is case- and accent-sensitive, so the query asks only
for CT studies in a date range and the description is matched here, with case
and accents folded, against the configured patterns.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    LegacyConvertedEnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    XRayRadiationDoseSRStorage,
)

from node.dicom import spool
from node.dicom.network import associate, make_ae, peer_label
from node.dicom.scp import UNCOMPRESSED, handle_store, start_scp
from node.ingest.ingestor import Ingestor
from node.records.folding import description_matches, fold  # noqa: F401 (re-exported)
from node.settings import Peer, Settings

log = logging.getLogger(__name__)

IMAGE_CLASSES = [
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
]
DOCUMENT_CLASSES = [
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    KeyObjectSelectionDocumentStorage,
    XRayRadiationDoseSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    EncapsulatedPDFStorage,
]
IMAGE_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
]
DOCUMENT_SYNTAXES = UNCOMPRESSED[:3]


class PullError(RuntimeError):
    """The PACS refused or broke a query or retrieve; the message says which and why."""


@dataclass(frozen=True)
class StudyMatch:
    """A study the PACS has that the pull wants."""

    study_instance_uid: str
    study_description: str
    study_date: str
    patient_id: str
    instances: int | None


@dataclass
class PullReport:
    """What one pull did: studies seen and matched, instances fetched and skipped, failures."""

    studies_found: int = 0
    matched: list[StudyMatch] = field(default_factory=list)
    fetched: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures

    def summary(self) -> str:
        """One line for the operator."""
        line = (
            f"{self.studies_found} CT studies found, {len(self.matched)} matched, "
            f"{self.fetched} instances fetched, {self.skipped} already stored"
        )
        if self.failures:
            line += f", {len(self.failures)} failed: " + "; ".join(self.failures)
        return line


def study_query(date_range: str | None) -> Dataset:
    """The study-level C-FIND identifier: CT studies in a date range, descriptions returned."""
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 192"
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDate = date_range or ""
    query.StudyTime = ""
    query.StudyDescription = ""
    query.ModalitiesInStudy = "CT"
    query.PatientID = ""
    query.PatientName = ""
    query.AccessionNumber = ""
    query.NumberOfStudyRelatedInstances = ""
    return query


def _match(identifier: Dataset) -> StudyMatch:
    instances = identifier.get("NumberOfStudyRelatedInstances")
    return StudyMatch(
        study_instance_uid=str(identifier.StudyInstanceUID),
        study_description=str(identifier.get("StudyDescription", "")),
        study_date=str(identifier.get("StudyDate", "")),
        patient_id=str(identifier.get("PatientID", "")),
        instances=int(instances) if instances not in (None, "") else None,
    )


def _check_final(status: Dataset | None, what: str, peer: Peer) -> Dataset:
    if status is None or "Status" not in status:
        raise PullError(
            f"{peer.ae_title} aborted the {what} (is this node's AE registered in the "
            "PACS's modalities with its host and port?)"
        )
    return status


class DimsePuller:
    """C-FIND / C-GET / C-MOVE against one peer, storing through the node's ingest."""

    def __init__(self, settings: Settings, ingestor: Ingestor, peer: Peer) -> None:
        self.settings, self.ingestor, self.peer = settings, ingestor, peer
        self.where = peer_label(peer)

    def _associate(self, ae: AE, handlers=(), roles=()) -> Association:
        assoc = associate(ae, self.settings, self.peer, handlers, roles)
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "aborted or unreachable"
            raise PullError(f"association to {self.where} {reason}")
        return assoc

    def find(self, query: Dataset) -> list[Dataset]:
        """Run one Study Root C-FIND and return the matches."""
        ae = make_ae(self.settings)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        results: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                status = _check_final(status, "C-FIND", self.peer)
                if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    results.append(identifier)
                elif status.Status != 0x0000:
                    raise PullError(f"C-FIND failed with status 0x{status.Status:04X}")
        finally:
            assoc.release()
        return results

    def find_studies(self, date_range: str | None) -> list[StudyMatch]:
        """CT studies in the date range (descriptions not filtered)."""
        return [_match(found) for found in self.find(study_query(date_range))]

    def find_instances(self, study_instance_uid: str) -> list[str]:
        """SOP Instance UIDs of a study."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_instance_uid
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = ""
        return [str(found.SOPInstanceUID) for found in self.find(query)]

    def get_study(
        self,
        study_instance_uid: str,
        on_instance: Callable[[], None],
        on_pending: Callable[[int], None] | None = None,
    ) -> None:
        """C-GET a whole study; every instance is stored durably before it is acknowledged.

        ``on_instance`` is called for each instance kept, ``on_pending`` with the number
        of sub-operations the PACS says remain. Ctrl-C sends C-CANCEL, then aborts.
        """
        spool.install()
        ae = make_ae(self.settings)
        ae.spool = spool.Spool(self.ingestor.spool_folder(), self.ingestor.max_inflated_bytes)
        for abstract_syntax, syntaxes in cget_contexts():
            ae.add_requested_context(abstract_syntax, syntaxes)
        roles = [
            build_role(sop_class, scp_role=True) for sop_class in IMAGE_CLASSES + DOCUMENT_CLASSES
        ]
        last_heard = [time.monotonic()]

        def on_store(event: evt.Event) -> int | Dataset:
            last_heard[0] = time.monotonic()
            status = handle_store(event, self.ingestor, None)
            if status == 0:
                on_instance()
            return status

        assoc = self._associate(ae, [(evt.EVT_C_STORE, on_store)], roles)
        final = None
        try:
            responses = assoc.send_c_get(
                _retrieve_identifier(study_instance_uid),
                StudyRootQueryRetrieveInformationModelGet,
                msg_id=1,
            )
            for status, _identifier in responses:
                final = status
                if status and "Status" in status:
                    last_heard[0] = time.monotonic()
                if status and status.get("Status") == 0xFF00 and on_pending:
                    on_pending(int(status.get("NumberOfRemainingSuboperations", 0) or 0))
        except KeyboardInterrupt:
            self._cancel(assoc, 1)
            raise
        except ValueError as exc:  # pynetdicom: no accepted context for C-GET
            assoc.abort()
            raise PullError(f"{self.where} does not offer Study Root C-GET: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        patience = min(self.settings.dimse_timeout, self.settings.network_timeout)
        if (final is None or "Status" not in final) and (
            time.monotonic() - last_heard[0] >= patience
        ):
            raise PullError(
                f"C-GET from {self.where} broke off: {self.peer.ae_title} said nothing for "
                f"{patience:g} s"
            )
        _check_suboperations(_check_final(final, "C-GET", self.peer), "C-GET")

    def _cancel(self, assoc: Association, message_id: int) -> None:
        """Ask the PACS to stop sending (C-CANCEL), then abort the association."""
        log.warning("C-GET from %s interrupted: sending C-CANCEL", self.where)
        context = next(
            (
                cx
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
            ),
            None,
        )
        if context is not None and assoc.is_established:
            assoc.send_c_cancel(message_id, context.context_id)
        assoc.abort()

    def move_study(self, study_instance_uid: str) -> None:
        """C-MOVE a whole study to this node's own AE (its SCP must be listening)."""
        ae = make_ae(self.settings)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae)
        try:
            final = None
            for status, _identifier in assoc.send_c_move(
                _retrieve_identifier(study_instance_uid),
                self.settings.ae_title,
                StudyRootQueryRetrieveInformationModelMove,
            ):
                final = status
            _check_suboperations(_check_final(final, "C-MOVE", self.peer), "C-MOVE")
        finally:
            assoc.release()


def cget_contexts() -> list[tuple[str, list[str]]]:
    """C-GET plus storage contexts (SCP role) for what a chest CT study carries.

    One context per (image class, syntax) so the PACS can send each file in the
    syntax it holds it in; 128 contexts at most, as the protocol allows.
    """
    contexts = [(StudyRootQueryRetrieveInformationModelGet, UNCOMPRESSED[:2])]
    for sop_class in IMAGE_CLASSES:
        contexts += [(sop_class, [syntax]) for syntax in IMAGE_SYNTAXES]
    contexts += [(sop_class, DOCUMENT_SYNTAXES) for sop_class in DOCUMENT_CLASSES]
    return contexts


def _retrieve_identifier(study_instance_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_instance_uid
    return identifier


def _check_suboperations(status: Dataset, what: str) -> None:
    failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    if status.Status not in (0x0000, 0xB000) or failed:
        comment = status.get("ErrorComment", "")
        raise PullError(
            f"{what} ended with status 0x{status.Status:04X}, {failed} sub-operations failed"
            + (f": {comment}" if comment else "")
        )


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` yet."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def pull_dimse(
    settings: Settings,
    ingestor: Ingestor,
    peer: Peer,
    date_range: str | None,
    method: str = "get",
    progress: Callable[[StudyMatch, int], Callable[[], None]] | None = None,
) -> PullReport:
    """Find CT studies, keep those whose description matches, retrieve what is missing."""
    if method not in ("get", "move"):
        raise ValueError(f"method must be 'get' or 'move', got {method!r}")
    ingestor.store.prepare()
    puller = DimsePuller(settings, ingestor, peer)
    report = PullReport()
    studies = puller.find_studies(date_range)
    report.studies_found = len(studies)
    report.matched = [
        s
        for s in studies
        if description_matches(s.study_description, settings.study_description_patterns)
    ]
    server = None
    if method == "move" and port_is_free(settings.dicom_host, settings.dicom_port):
        # No `ainode serve` running here: listen ourselves for the duration of the pull.
        server = start_scp(settings, ingestor)
    try:
        for study in report.matched:
            _pull_study(puller, study, method, report, progress)
    finally:
        if server is not None:
            server.shutdown()
    return report


def _pull_study(puller: DimsePuller, study: StudyMatch, method: str, report: PullReport, progress):
    uid = study.study_instance_uid
    try:
        wanted = puller.find_instances(uid)
        missing = [sop for sop in wanted if not puller.ingestor.is_stored(sop)]
        report.skipped += len(wanted) - len(missing)
        if not missing:
            log.info("study %s: all %d instances already stored", uid, len(wanted))
            return
        tick = progress(study, len(missing)) if progress else (lambda: None)
        if method == "get":
            # a progress callable may take the PACS's count of sub-operations remaining
            puller.get_study(uid, tick, getattr(tick, "remaining", None))
        else:
            puller.move_study(uid)
        arrived = [sop for sop in missing if puller.ingestor.is_stored(sop)]
        report.fetched += len(arrived)
        if len(arrived) != len(missing):
            report.failures.append(f"study {uid}: {len(missing) - len(arrived)} instances missing")
    except PullError as exc:
        report.failures.append(f"study {uid}: {exc}")
        log.error("pull of study %s failed: %s", uid, exc)
