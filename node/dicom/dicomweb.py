"""Pull over DICOMweb: QIDO-RS to find CT studies, WADO-RS to fetch instances byte for byte."""

from __future__ import annotations

import logging
from collections.abc import Callable

import requests
from dicomweb_client.api import DICOMwebClient

from node.dicom.pull import PullReport, StudyMatch, description_matches
from node.ingest.ingestor import Ingestor
from node.ingest.part10 import DatasetError
from node.ingest.store import StoreError
from node.settings import Peer, Settings

log = logging.getLogger(__name__)

ACCEPT_PART10 = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _value(result: dict, tag: str) -> str:
    values = result.get(tag, {}).get("Value") or [""]
    first = values[0]
    if isinstance(first, dict):  # PersonName
        return first.get("Alphabetic", "")
    return str(first)


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a ``multipart/related`` body (RFC 2046)."""
    boundary = None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise DatasetError(f"multipart response without a boundary: {content_type!r}")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _headers, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise DatasetError("multipart part without headers")
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


class DicomwebPuller:
    """QIDO-RS search and WADO-RS retrieve against one peer's DICOMweb root."""

    def __init__(self, settings: Settings, ingestor: Ingestor, peer: Peer) -> None:
        if not peer.dicomweb_url:
            raise ValueError(f"peer {peer.name} has no dicomweb_url")
        self.settings, self.ingestor, self.peer = settings, ingestor, peer
        self.root = peer.dicomweb_url.rstrip("/")
        self.session = requests.Session()
        self.client = DICOMwebClient(self.root, session=self.session)

    def find_studies(self, date_range: str | None) -> list[StudyMatch]:
        """CT studies in the date range; descriptions are matched by the caller."""
        filters = {"ModalitiesInStudy": "CT"}
        if date_range:
            filters["StudyDate"] = date_range
        found = self.client.search_for_studies(
            search_filters=filters,
            fields=["StudyDescription", "NumberOfStudyRelatedInstances"],
        )
        return [
            StudyMatch(
                study_instance_uid=_value(r, "0020000D"),
                study_description=_value(r, "00081030"),
                study_date=_value(r, "00080020"),
                patient_id=_value(r, "00100020"),
                instances=int(_value(r, "00201208") or 0) or None,
            )
            for r in found
        ]

    def find_instances(self, study_instance_uid: str) -> list[tuple[str, str]]:
        """(SeriesInstanceUID, SOPInstanceUID) of every instance of a study."""
        found = self.client.search_for_instances(study_instance_uid=study_instance_uid)
        return [(_value(r, "0020000E"), _value(r, "00080018")) for r in found]

    def fetch_instance(self, study: str, series: str, sop: str) -> bytes:
        """WADO-RS one instance as the Part 10 file the server holds."""
        url = f"{self.root}/studies/{study}/series/{series}/instances/{sop}"
        response = self.session.get(url, headers={"Accept": ACCEPT_PART10}, timeout=120)
        response.raise_for_status()
        parts = split_multipart(response.content, response.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise DatasetError(f"WADO-RS returned {len(parts)} parts for one instance")
        return parts[0]


def pull_dicomweb(
    settings: Settings,
    ingestor: Ingestor,
    peer: Peer,
    date_range: str | None,
    progress: Callable[[StudyMatch, int], Callable[[], None]] | None = None,
) -> PullReport:
    """QIDO-RS the CT studies, keep matching descriptions, WADO-RS what is missing."""
    ingestor.store.prepare()
    puller = DicomwebPuller(settings, ingestor, peer)
    report = PullReport()
    try:
        studies = puller.find_studies(date_range)
    except requests.RequestException as exc:
        report.failures.append(f"QIDO-RS search at {puller.root} failed: {exc}")
        return report
    report.studies_found = len(studies)
    patterns = settings.study_description_patterns
    report.matched = [s for s in studies if description_matches(s.study_description, patterns)]
    for study in report.matched:
        _pull_study(puller, study, report, progress)
    return report


def _pull_study(puller: DicomwebPuller, study: StudyMatch, report: PullReport, progress) -> None:
    uid = study.study_instance_uid
    try:
        instances = puller.find_instances(uid)
    except requests.RequestException as exc:
        report.failures.append(f"study {uid}: QIDO-RS instance search failed: {exc}")
        return
    missing = [(se, sop) for se, sop in instances if not puller.ingestor.is_stored(sop)]
    report.skipped += len(instances) - len(missing)
    tick = progress(study, len(missing)) if progress and missing else (lambda: None)
    for series, sop in missing:
        try:
            data = puller.fetch_instance(uid, series, sop)
            puller.ingestor.ingest_part10(data, source_ae=puller.peer.ae_title)
        except (requests.RequestException, DatasetError, StoreError) as exc:
            report.failures.append(f"instance {sop}: {exc}")
            continue
        report.fetched += 1
        tick()
