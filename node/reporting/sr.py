"""The study result as a DICOM Comprehensive 3D SR (TID 1500), and its delivery to the PACS.

The SR files into the source study, names the node as device observer and the model
(TID 4019) as algorithm, carries the finding as a SNOMED CT code with its probability,
and references every evaluated image. It is read back with highdicom before it is
returned, so a report that a PACS or viewer could not parse never leaves the node.

A revised SR (a re-analysis, or a radiologist's correction written back) lists the SR it
replaces in its Predecessor Documents Sequence (0040,A360). A correction states the
radiologist's finding with the radiologist as the person observer (TID 1003) and no
algorithm: the model's result is not repeated in it but kept, unchanged, in the SR it
replaces, so no finding is ever attributed to an observer that did not make it.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import highdicom as hd
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import Comprehensive3DSRStorage

from node import __version__
from node.analysis import calibration
from node.analysis.result import CLASSES, StudyResult
from node.dicom.network import associate, make_ae, peer_label
from node.ingest.store import check_uid
from node.settings import Peer, Settings

log = logging.getLogger(__name__)

# Our classes in SNOMED CT: the one table the whole node codes findings from.
FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    # 840539006 "Disease caused by severe acute respiratory syndrome coronavirus 2
    # (disorder)". Its FSN is 66 characters and Code Meaning (LO) allows 64, so the
    # meaning is its SNOMED synonym "COVID-19", the word radiologists use.
    "Covid_19": hd.sr.CodedConcept("840539006", "SCT", "COVID-19"),
    # 281900007 "No abnormality detected (finding)": a clinical finding, so it is a
    # valid value of "Finding". 17621005 "Normal" is a qualifier value (CID 222 uses it
    # to qualify a measurement's normality), not a finding, and DCM 111286 "No
    # abnormality" belongs to the mammography CAD context groups.
    "Normal": hd.sr.CodedConcept("281900007", "SCT", "No abnormality detected"),
    # 233604007 "Pneumonia (disorder)".
    "Pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
}
# DCM 122157 "Probability": the model's probability of the finding, 0..1, UCUM "1".
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
# 169069000 "Computed tomography of chest (procedure)" (CID 100 is extensible).
CT_CHEST = hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest")
LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung structure")
# DCM 109102 "Processing Equipment": equipment that processed instances to create new
# ones, which is what the model did. 109103 is "Modifying Equipment" (changes an
# instance without creating a new one), and highdicom only accepts CID 7005 purposes.
ALGORITHM_PURPOSE = codes.DCM.ProcessingEquipment
# How the class was decided from the probabilities (calibration, operating point): a TEXT item
# in the finding's group, named by a local code (DICOM lets a "99" scheme be private).
DECISION_METHOD = hd.sr.CodedConcept("DECISION", "99AINODE", "Decision method")
# DCM 121080 "Best illustration of finding": the key slices, the images that drive the answer.
KEY_SLICE = codes.DCM.BestIllustrationOfFinding
# Whether the study is like what the model was trained on (node.analysis.ood): a qualitative
# evaluation of the finding's group, local codes (DICOM has none for it), and one TEXT item
# per reason when it is outside.
EXPERIENCE = hd.sr.CodedConcept("OODASSESS", "99AINODE", "Input within the model's experience")
EXPERIENCE_VALUES = {
    "outside": hd.sr.CodedConcept("OUTSIDE", "99AINODE", "Outside the model's experience"),
    "within": hd.sr.CodedConcept("WITHIN", "99AINODE", "Within the model's experience"),
    "not assessed": hd.sr.CodedConcept(
        "NOTASSESSED", "99AINODE", "Not assessed (the model bundle cannot warn)"
    ),
}
EXPERIENCE_REASON = hd.sr.CodedConcept(
    "OODREASON", "99AINODE", "Reason outside the model's experience"
)
DEMO_WARNING = "DEMO model trained on synthetic phantoms - not for clinical use"
TRACKING_LABEL = "AI study classification"
CORRECTION_LABEL = "Radiologist correction of the AI study classification"
CORRECTION_DESCRIPTION = "ainode result corrected by a radiologist"
_COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
_REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_STORE_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)
_OUT_OF_RESOURCES = 0xA700


class ReportError(ValueError):
    """The SR cannot be built from these inputs, or highdicom cannot read it back."""


class SendError(RuntimeError):
    """Delivery to the PACS failed; ``transient`` says whether a later retry may succeed."""

    def __init__(self, transient: bool, message: str) -> None:
        """Keep whether the failure is transient next to the message."""
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class DeviceObserver:
    """The node as the SR's device observer (TID 1004) and as the SR's equipment."""

    uid: str
    name: str = "ainode"
    manufacturer: str = "ainode"
    model_name: str = "ainode"
    serial_number: str | None = None

    def __post_init__(self) -> None:
        check_uid(self.uid, "observer uid")
        for field in ("name", "manufacturer", "model_name", "serial_number"):
            value = getattr(self, field)
            if value is None and field == "serial_number":
                continue
            if not value or len(value) > 64 or "\\" in value:
                raise ValueError(f"observer {field} must be 1-64 characters without '\\'")


@dataclass(frozen=True)
class Predecessor:
    """An SR the new one replaces: what its Predecessor Documents Sequence references."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = Comprehensive3DSRStorage

    def __post_init__(self) -> None:
        for field in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            check_uid(getattr(self, field), f"predecessor {field}")
        check_uid(self.sop_class_uid, "predecessor sop_class_uid")

    def header(self) -> Dataset:
        """The replaced SR's identifying attributes, as highdicom's ``previous_versions``."""
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        return ds


@dataclass(frozen=True)
class Correction:
    """A radiologist's corrected finding, stated in the SR as theirs (person observer)."""

    corrected_class: str
    observer_name: str  # the person's name (PN), e.g. their full name
    login_name: str

    def __post_init__(self) -> None:
        if self.corrected_class not in FINDING_CODES:
            raise ValueError(
                f"corrected_class {self.corrected_class!r} has no code in FINDING_CODES "
                f"(known: {', '.join(FINDING_CODES)})"
            )
        for field in ("observer_name", "login_name"):
            value = getattr(self, field)
            if not value or len(value) > 64 or "\\" in value:
                raise ValueError(f"correction {field} must be 1-64 characters without '\\'")


def build_sr(
    evaluated: Sequence[Dataset],
    result: StudyResult,
    observer: DeviceObserver,
    *,
    series_number: int = 9901,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    predecessor: Predecessor | None = None,
    correction: Correction | None = None,
) -> Dataset:
    """Build the SR for ``result`` on the ``evaluated`` images and prove highdicom reads it.

    Parameters
    ----------
    evaluated
        Headers of the analysed images (pixel data not needed), all of one study: the SR
        references them and copies the patient and study attributes from the first.
    result
        The study-level answer and the model that gave it.
    observer
        The node, recorded as device observer and as the SR's equipment.
    sop_instance_uid, series_instance_uid
        New UIDs are made when None: a re-issued report needs a new SOP Instance UID,
        since a PACS may silently keep the first instance it got under one UID.
    predecessor
        The SR this one replaces (same study): referenced in the Predecessor Documents
        Sequence.
    correction
        A radiologist's correction: the SR states their finding instead of the model's.

    Raises
    ------
    ReportError
        When the inputs cannot make a valid SR or the SR does not read back.
    """
    evidence = _checked_evidence(evaluated, result)
    try:
        sop_instance_uid = check_uid(sop_instance_uid or hd.UID(), "sop_instance_uid")
        series_instance_uid = check_uid(series_instance_uid or hd.UID(), "series_instance_uid")
    except ValueError as exc:
        raise ReportError(str(exc)) from exc
    stated = correction.corrected_class if correction else result.predicted_class
    finding = FINDING_CODES.get(stated)
    if finding is None:
        raise ReportError(
            f"predicted_class {result.predicted_class!r} has no code in FINDING_CODES "
            f"(known: {', '.join(CLASSES)})"
        )
    if predecessor is not None and predecessor.study_instance_uid != evidence[0].StudyInstanceUID:
        raise ReportError(
            f"the replaced SR is in study {predecessor.study_instance_uid}, not in "
            f"{evidence[0].StudyInstanceUID}: an SR replaces one of its own study"
        )
    if correction is not None:
        content = _corrected_report(evidence, finding, correction)
        description, equipment = CORRECTION_DESCRIPTION, None
    else:
        content = _measurement_report(evidence, result, finding, observer)
        description = DEMO_WARNING if result.model.demo else "ainode AI result"
        equipment = [_algorithm_equipment(result, observer)]
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=observer.manufacturer,
            manufacturer_model_name=observer.model_name,
            software_versions=__version__,
            device_serial_number=observer.serial_number,
            series_description=description,
            is_complete=True,
            performed_procedure_codes=[CT_CHEST],
            previous_versions=[predecessor.header()] if predecessor else None,
            contributing_equipment=equipment,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"highdicom refused the SR: {exc}") from exc
    _check_round_trip(sr, finding, result, predecessor, correction)
    return sr


def _checked_evidence(evaluated: Sequence[Dataset], result: StudyResult) -> list[Dataset]:
    """The evaluated headers, checked to be one study, with the first made complete."""
    if not evaluated:
        raise ReportError("evaluated is empty: an SR must reference the images it reports on")
    for index, ds in enumerate(evaluated):
        missing = [k for k in _REFERENCE_KEYWORDS if not ds.get(k)]
        if missing:
            raise ReportError(f"evaluated[{index}] has no {', '.join(missing)}")
    study_uid = str(evaluated[0].StudyInstanceUID)
    others = [i for i, ds in enumerate(evaluated) if ds.StudyInstanceUID != study_uid]
    if others:
        raise ReportError(
            f"evaluated images come from more than one study: evaluated[{others[0]}] is from "
            f"{evaluated[others[0]].StudyInstanceUID}, evaluated[0] from {study_uid} "
            f"({len(others)} of {len(evaluated)} differ); an SR reports on one study"
        )
    known = {str(ds.SOPInstanceUID) for ds in evaluated}
    unknown = [s.sop_instance_uid for s in result.slices if s.sop_instance_uid not in known]
    if unknown:
        raise ReportError(f"result slices {unknown[:3]} are not among the evaluated images")
    first = Dataset()
    for element in evaluated[0]:
        if element.tag < 0x7FE00010:  # everything but the pixel data
            first.add(element)
    for keyword in _COPIED_TYPE2:  # Type 2 in the source: present, maybe empty
        if keyword not in first:
            setattr(first, keyword, "")
    return [first, *evaluated[1:]]


def _measurement_report(
    evidence: Sequence[Dataset],
    result: StudyResult,
    finding: hd.sr.CodedConcept,
    observer: DeviceObserver,
) -> hd.sr.MeasurementReport:
    """TID 1500 with the node as observer and one TID 1501 group for the study."""
    label = f"{TRACKING_LABEL} - {DEMO_WARNING}" if result.model.demo else TRACKING_LABEL
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=hd.sr.AlgorithmIdentification(result.model.name, result.model.version),
        measurements=[hd.sr.Measurement(PROBABILITY, result.probability, NO_UNITS)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(EXPERIENCE, _experience(result))],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
            for ds in evidence
        ],
    )
    group[0].ContentSequence.extend(
        hd.sr.TextContentItem(
            name=EXPERIENCE_REASON,
            value=str(reason)[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for reason in (result.ood or {}).get("reasons", [])
        if result.outside_experience
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=DECISION_METHOD,
            value=calibration.describe(result.decision)[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    group[0].ContentSequence.extend(_key_slice_items(result))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=observer.uid,
        name=observer.name,
        manufacturer_name=observer.manufacturer,
        model_name=observer.model_name,
        serial_number=observer.serial_number,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
    )
    return hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=CT_CHEST, imaging_measurements=[group]
    )


def _experience(result: StudyResult) -> hd.sr.CodedConcept:
    """The qualitative evaluation's value: outside, within, or not assessed."""
    if result.ood is None:
        return EXPERIENCE_VALUES["not assessed"]
    return EXPERIENCE_VALUES["outside" if result.outside_experience else "within"]


def read_sr_experience(ds: Dataset) -> tuple[str, list[str]] | None:
    """What an ainode SR says of the study against the model's experience: (the evaluation's
    code meaning, the reasons), or None when it says nothing (an older SR, a correction);
    parsed with highdicom."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = [g for g in sr.content.get_image_measurement_groups() if g.finding_type is not None]
    for group in groups:
        evaluations = group.get_qualitative_evaluations(name=EXPERIENCE)
        if evaluations:
            reasons = [str(item.TextValue) for item in _text_items(group, EXPERIENCE_REASON)]
            return evaluations[0].value.meaning, reasons
    return None


def _key_slice_items(result: StudyResult) -> list[hd.sr.ImageContentItem]:
    """The key slices (highest class evidence first) as IMAGE items "Best illustration of
    finding" (DCM 121080) in the finding's group: the images a reader should look at."""
    items = []
    for key in result.key_slices:
        item = result.slices[int(key["position"])]
        items.append(
            hd.sr.ImageContentItem(
                name=KEY_SLICE,
                referenced_sop_class_uid=item.sop_class_uid,
                referenced_sop_instance_uid=item.sop_instance_uid,
                referenced_frame_numbers=item.frame + 1 if item.frame is not None else None,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return items


def read_sr_key_slices(ds: Dataset) -> list[tuple[str, int | None]]:
    """The key slices an ainode SR names, in order: (SOP Instance UID, frame number (1-based)
    or None), parsed with highdicom."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = [g for g in sr.content.get_image_measurement_groups() if g.finding_type is not None]
    found = []
    for group in groups:
        for item in hd.sr.utils.find_content_items(group[0], name=KEY_SLICE, value_type="IMAGE"):
            reference = item.ReferencedSOPSequence[0]
            frames = reference.get("ReferencedFrameNumber")
            found.append((str(reference.ReferencedSOPInstanceUID), int(frames) if frames else None))
    return found


def _corrected_report(
    evidence: Sequence[Dataset], finding: hd.sr.CodedConcept, correction: Correction
) -> hd.sr.MeasurementReport:
    """TID 1500 stating the radiologist's finding, with the radiologist as the one observer.

    No Algorithm Identification and no probability: both would attribute the finding to
    the model. The model's result stays in the SR this one replaces.
    """
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=CORRECTION_LABEL),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
            for ds in evidence
        ],
    )
    person = hd.sr.PersonObserverIdentifyingAttributes(
        name=correction.observer_name, login_name=correction.login_name
    )
    context = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(codes.DCM.Person, person)
    )
    return hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=CT_CHEST, imaging_measurements=[group]
    )


def _algorithm_equipment(result: StudyResult, observer: DeviceObserver) -> hd.ContributingEquipment:
    """The model as Contributing Equipment, as IHE AI Results asks."""
    description = f"AI classification by {result.model.label}"
    return hd.ContributingEquipment(
        manufacturer=observer.manufacturer,
        purpose_of_reference=ALGORITHM_PURPOSE,
        manufacturer_model_name=result.model.name,
        software_versions=result.model.version,
        contribution_datetime=datetime.datetime.now(),
        contribution_description=description[:1024],
    )


def _check_round_trip(
    sr: Dataset,
    finding: hd.sr.CodedConcept,
    result: StudyResult,
    predecessor: Predecessor | None,
    correction: Correction | None,
) -> None:
    """Encode, decode and parse the SR with highdicom; it must say what we meant."""
    buffer = BytesIO()
    try:
        dcmwrite(buffer, sr, enforce_file_format=True)
        decoded = dcmread(BytesIO(buffer.getvalue()))
        summary, revision = read_sr_summary(decoded), read_sr_revision(decoded)
    except (ValueError, TypeError, AttributeError, KeyError, OSError) as exc:
        raise ReportError(f"the built SR does not read back: {exc}") from exc
    if summary["finding_code"] != (finding.scheme_designator, finding.value):
        raise ReportError(f"the SR reads back as {summary['finding_code']}, not {finding.value}")
    if summary["demo"] != (result.model.demo and correction is None):
        raise ReportError("the SR's demo marking does not read back")
    if revision["predecessors"] != ([predecessor] if predecessor else []):
        raise ReportError("the SR's Predecessor Documents Sequence does not read back")
    expected = (correction.observer_name, correction.login_name) if correction else None
    if revision["person_observer"] != expected:
        raise ReportError("the SR's person observer does not read back")


def read_sr_summary(ds: Dataset) -> dict:
    """The finding, its probability and the algorithm of an ainode SR, parsed with highdicom.

    Returns a dict with ``finding`` (code meaning), ``finding_code`` ((scheme, value)),
    ``probability``, ``algorithm_name``, ``algorithm_version``, ``study_instance_uid``,
    ``sop_instance_uid``, ``observer_uid`` and ``demo``. Raises :class:`ReportError` when
    the dataset is not such an SR.
    """
    if "ContentSequence" not in ds:
        raise ReportError("the dataset is not an SR document (no ContentSequence)")
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)  # parses the content tree as TID 1500
    if not isinstance(sr.content, hd.sr.MeasurementReport):
        raise ReportError("the SR is not a TID 1500 Measurement Report")
    groups = [g for g in sr.content.get_image_measurement_groups() if g.finding_type is not None]
    if len(groups) != 1:
        raise ReportError(f"expected one measurement group with a finding, found {len(groups)}")
    group = groups[0]
    probabilities = group.get_measurements(name=PROBABILITY)
    corrected = not _text_items(group, codes.DCM.AlgorithmName)  # a radiologist's finding
    if len(probabilities) != (0 if corrected else 1):
        raise ReportError(f"expected one Probability measurement, found {len(probabilities)}")
    observers = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    return {
        "finding": group.finding_type.meaning,
        "finding_code": (group.finding_type.scheme_designator, group.finding_type.value),
        "probability": None if corrected else float(probabilities[0].value),
        "algorithm_name": None if corrected else _text_value(group, codes.DCM.AlgorithmName),
        "algorithm_version": None if corrected else _text_value(group, codes.DCM.AlgorithmVersion),
        "study_instance_uid": str(sr.StudyInstanceUID),
        "sop_instance_uid": str(sr.SOPInstanceUID),
        "observer_uid": str(observers[0].observer_identifying_attributes.uid)
        if observers
        else None,
        "demo": DEMO_WARNING in (group.tracking_identifier or ""),
    }


def read_sr_decision(ds: Dataset) -> str | None:
    """How an ainode SR says its class was decided (None: a radiologist's correction, or an
    SR written before the node said so), parsed with highdicom."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = [g for g in sr.content.get_image_measurement_groups() if g.finding_type is not None]
    items = [item for group in groups for item in _text_items(group, DECISION_METHOD)]
    return str(items[0].TextValue) if items else None


def read_sr_revision(ds: Dataset) -> dict:
    """What makes an SR a revision: ``predecessors`` (the :class:`Predecessor` items of its
    Predecessor Documents Sequence, in order) and ``person_observer`` ((name, login name)
    of the person observer of a radiologist's correction, else None)."""
    predecessors = [
        Predecessor(
            study_instance_uid=str(study.StudyInstanceUID),
            series_instance_uid=str(series.SeriesInstanceUID),
            sop_instance_uid=str(item.ReferencedSOPInstanceUID),
            sop_class_uid=str(item.ReferencedSOPClassUID),
        )
        for study in ds.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    person = None
    if "ContentSequence" in ds:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
        people = sr.content.get_observer_contexts(observer_type=codes.DCM.Person)
        if people:
            attributes = people[0].observer_identifying_attributes
            person = (str(attributes.name), attributes.login_name)
    return {"predecessors": predecessors, "person_observer": person}


def _text_items(group: hd.sr.MeasurementsAndQualitativeEvaluations, name) -> list:
    return hd.sr.utils.find_content_items(group[0], name=name, value_type="TEXT")


def _text_value(group: hd.sr.MeasurementsAndQualitativeEvaluations, name) -> str:
    """The value of the one TEXT item called ``name`` directly in a measurement group."""
    items = _text_items(group, name)
    if len(items) != 1:
        raise ReportError(f"expected one {name.meaning!r} item, found {len(items)}")
    return str(items[0].TextValue)


def send_sr_dimse(
    ds: Dataset, settings: Settings, peer: Peer, images: Sequence[Dataset] = ()
) -> list[str]:
    """C-STORE the SR to ``peer`` as ``settings.ae_title`` (then ``images``, e.g. its heatmap
    Secondary Captures, in the same association); raise :class:`SendError` when the SR is
    not stored. Returns why each image that was not stored was refused."""
    where = peer_label(peer)
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae = make_ae(settings)
    for sop_class in dict.fromkeys([str(ds.SOPClassUID), *(str(i.SOPClassUID) for i in images)]):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = associate(ae, settings, peer)
    if not assoc.is_established:
        raise _association_failure(assoc, where)
    refused = []
    try:
        try:
            status = assoc.send_c_store(ds)
        except ValueError as exc:  # no accepted presentation context for the SR's SOP class
            raise SendError(False, f"C-STORE to {where}: {exc}") from exc
        _check_store_status(status, where)
        for image in images:
            try:
                _check_store_status(assoc.send_c_store(image), where)
            except (ValueError, SendError) as exc:  # e.g. the PACS takes no Secondary Capture
                refused.append(f"{image.SOPInstanceUID}: {exc}")
    finally:
        assoc.release()
    return refused


def _association_failure(assoc, where: str) -> SendError:
    """A rejection the PACS calls permanent is permanent; any other failure is transient."""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        permanent = primitive is not None and primitive.result == 0x01
        reason = f" (result {primitive.result}, reason {primitive.diagnostic})" if primitive else ""
        kind = "permanently" if permanent else "transiently"
        return SendError(not permanent, f"association to {where} {kind} rejected{reason}")
    return SendError(True, f"association to {where} failed: aborted or unreachable")


def _check_store_status(status: Dataset, where: str) -> None:
    """Raise unless the C-STORE status is success (or a warning: the SR was stored)."""
    if "Status" not in status:
        raise SendError(True, f"C-STORE to {where}: no response (aborted or timed out)")
    code = int(status.Status)
    if code == 0x0000:
        return
    comment = f": {status.ErrorComment}" if status.get("ErrorComment") else ""
    if code in _STORE_WARNINGS:
        log.warning("C-STORE to %s stored with warning 0x%04X%s", where, code, comment)
        return
    transient = code & 0xFF00 == _OUT_OF_RESOURCES
    raise SendError(transient, f"C-STORE to {where} failed with status 0x{code:04X}{comment}")


def send_sr_stow(
    ds: Dataset, peer: Peer, *, timeout: float = 60.0, images: Sequence[Dataset] = ()
) -> list[str]:
    """STOW-RS the SR (and ``images``, in the same request) to ``peer.dicomweb_url``; raise
    :class:`SendError` when the SR is not stored. Returns why each image was refused.

    HTTP 5xx, 408, 429 and connection errors are transient, other 4xx permanent.
    dicomweb-client's own retries are off: retries belong to the task layer.
    """
    if not peer.dicomweb_url:
        raise SendError(False, f"peer {peer.name} has no dicomweb_url")
    root = peer.dicomweb_url.rstrip("/")
    with requests.Session() as session:
        try:
            client = DICOMwebClient(root, session=session, timeout=timeout)
            client.set_http_retry_params(retry=False)
            answer = client.store_instances([ds, *images])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            text = exc.response.text[:200] if exc.response is not None else ""
            transient = code is None or code >= 500 or code in (408, 429)
            raise SendError(transient, f"STOW-RS to {root} -> HTTP {code}: {text}") from exc
        except requests.RequestException as exc:
            raise SendError(True, f"STOW-RS to {root} failed: {exc}") from exc
        except ValueError as exc:  # a malformed URL or an unreadable answer
            raise SendError(False, f"STOW-RS to {root} failed: {exc}") from exc
    _check_stow_answer(answer, str(ds.SOPInstanceUID), root)
    return [
        f"{item.get('ReferencedSOPInstanceUID')}: reason 0x{int(item.get('FailureReason', 0)):04X}"
        for item in answer.get("FailedSOPSequence", [])
    ]


def _check_stow_answer(answer: Dataset, sop_instance_uid: str, root: str) -> None:
    """Raise when the STOW-RS answer lists the SR as failed."""
    for item in answer.get("FailedSOPSequence", []):
        if item.get("ReferencedSOPInstanceUID") == sop_instance_uid:
            code = int(item.get("FailureReason", 0x0110))
            transient = code & 0xFF00 == _OUT_OF_RESOURCES
            raise SendError(transient, f"STOW-RS to {root}: SR refused, reason 0x{code:04X}")
