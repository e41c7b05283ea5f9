"""The DICOM SR: what highdicom reads back, where it files, and its delivery to a real Orthanc."""

from __future__ import annotations

import copy
import dataclasses
from io import BytesIO

import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset

from node import phantom
from node.analysis.result import CLASSES, ModelIdentity, SliceResult, StudyResult
from node.reporting.sr import (
    DEMO_WARNING,
    FINDING_CODES,
    DeviceObserver,
    ReportError,
    SendError,
    build_sr,
    read_sr_summary,
    send_sr_dimse,
    send_sr_stow,
)
from node.settings import Peer
from tests.conftest import orthanc_peer
from tests.peers import free_port, start_orthanc

DEMO_MODEL = ModelIdentity("ainode-demo-phantom", "0.1.0", demo=True)
OBSERVER = DeviceObserver(
    uid="2.25.147690549933150919621629165827312306498",
    name="AINODE",
    manufacturer="ainode",
    model_name="ainode",
    serial_number="0.1.0",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small COVID phantom study on disk and its headers as the node reads them."""
    spec = phantom.PhantomSpec(finding="covid", slices=6, seed=11, rows=64, columns=64)
    files = phantom.write_series(spec, tmp_path_factory.mktemp("report-study"))
    return files, [dcmread(path, stop_before_pixels=True) for path in files]


def study_result(headers, predicted="Covid_19", model=DEMO_MODEL) -> StudyResult:
    """A study result on ``headers`` whose predicted class has probability 0.82."""
    probabilities = {name: 0.09 for name in CLASSES} | {predicted: 0.82}
    return StudyResult(
        classes=CLASSES,
        probabilities=tuple(probabilities[name] for name in CLASSES),
        predicted_class=predicted,
        rule="top-mean",
        slices=tuple(
            SliceResult(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, None, (1, 0, 0))
            for ds in headers
        ),
        model=model,
    )


def expected_summary(headers) -> dict:
    return {
        "finding": "COVID-19",
        "finding_code": ("SCT", "840539006"),
        "probability": pytest.approx(0.82),
        "algorithm_name": "ainode-demo-phantom",
        "algorithm_version": "0.1.0",
        "study_instance_uid": headers[0].StudyInstanceUID,
        "observer_uid": OBSERVER.uid,
        "demo": True,
    }


def test_highdicom_reads_back_the_finding_its_probability_and_the_model(study):
    _files, headers = study
    sr = build_sr(headers, study_result(headers), OBSERVER)
    summary = read_sr_summary(sr)
    assert summary == expected_summary(headers) | {"sop_instance_uid": sr.SOPInstanceUID}


@pytest.mark.parametrize(
    ("predicted", "code", "meaning"),
    [
        ("Covid_19", "840539006", "COVID-19"),
        ("Normal", "281900007", "No abnormality detected"),
        ("Pneumonia", "233604007", "Pneumonia"),
    ],
)
def test_every_class_is_reported_as_its_snomed_code(study, predicted, code, meaning):
    _files, headers = study
    summary = read_sr_summary(build_sr(headers, study_result(headers, predicted), OBSERVER))
    assert summary["finding_code"] == ("SCT", code)
    assert summary["finding"] == meaning
    assert set(FINDING_CODES) == set(CLASSES)


def test_the_sr_files_into_the_source_study_and_references_every_image(study):
    _files, headers = study
    sr = build_sr(headers, study_result(headers), OBSERVER)
    for keyword in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
    ):
        assert sr[keyword].value == headers[0][keyword].value, keyword
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in headers}


def test_contributing_equipment_names_the_algorithm_as_processing_equipment(study):
    _files, headers = study
    sr = build_sr(headers, study_result(headers), OBSERVER)
    algorithm = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.get("ManufacturerModelName") == "ainode-demo-phantom"
    ]
    assert len(algorithm) == 1
    assert algorithm[0].SoftwareVersions == "0.1.0"
    assert algorithm[0].Manufacturer == "ainode"
    purpose = algorithm[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == ("DCM", "109102")


def test_each_build_gets_new_uids_unless_told(study):
    _files, headers = study
    result = study_result(headers)
    first, second = build_sr(headers, result, OBSERVER), build_sr(headers, result, OBSERVER)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    given = build_sr(
        headers, result, OBSERVER, sop_instance_uid="2.25.1", series_instance_uid="2.25.2"
    )
    assert (given.SOPInstanceUID, given.SeriesInstanceUID) == ("2.25.1", "2.25.2")


def test_a_demo_model_is_marked_where_a_radiologist_looks(study):
    _files, headers = study
    sr = build_sr(headers, study_result(headers), OBSERVER)
    assert sr.SeriesDescription == DEMO_WARNING
    assert DEMO_WARNING.encode() in _encoded(sr)  # in the content tree as well
    clinical = dataclasses.replace(DEMO_MODEL, name="ainode-effnet", demo=False)
    plain = build_sr(headers, study_result(headers, model=clinical), OBSERVER)
    assert DEMO_WARNING.encode() not in _encoded(plain)
    assert read_sr_summary(plain)["demo"] is False


def _encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _other_study(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID = "2.25.99"
    return ds


def _without_sop_uid(ds: Dataset) -> Dataset:
    ds = copy.deepcopy(ds)
    del ds.SOPInstanceUID
    return ds


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda h: [], "evaluated is empty"),
        (lambda h: [*h, _other_study(h[0])], "more than one study: evaluated[6] is from 2.25.99"),
        (lambda h: [_without_sop_uid(h[0]), *h[1:]], "evaluated[0] has no SOPInstanceUID"),
        (lambda h: h[1:], "are not among the evaluated images"),
    ],
)
def test_bad_evaluated_images_are_refused(study, mangle, message):
    _files, headers = study
    with pytest.raises(ReportError) as info:
        build_sr(mangle(headers), study_result(headers), OBSERVER)
    assert message in str(info.value)


def test_a_class_without_a_code_is_refused(study):
    _files, headers = study
    result = dataclasses.replace(
        study_result(headers), classes=("Covid_19", "Other"), probabilities=(0.2, 0.8)
    )
    result = dataclasses.replace(result, predicted_class="Other")
    with pytest.raises(ReportError, match="'Other' has no code in FINDING_CODES"):
        build_sr(headers, result, OBSERVER)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"uid": "not-a-uid"}, "observer uid is not a valid DICOM UID"),
        ({"name": ""}, "observer name must be 1-64 characters"),
        ({"manufacturer": "x" * 65}, "observer manufacturer must be 1-64 characters"),
    ],
)
def test_a_bad_observer_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(OBSERVER, **changes)


def find_sr_in_study(orthanc, study_instance_uid: str) -> Dataset:
    """QIDO the study's SR series, fetch the file Orthanc holds and read it."""
    session = requests.Session()
    session.trust_env = False
    url = f"{orthanc.dicomweb_url}/studies/{study_instance_uid}/series"
    modalities = {s["00080060"]["Value"][0] for s in session.get(url, timeout=30).json()}
    assert modalities == {"CT", "SR"}  # the SR filed into the source study
    series = session.get(url, params={"Modality": "SR"}, timeout=30).json()
    assert len(series) == 1
    series_uid = series[0]["0020000E"]["Value"][0]
    instances = session.get(f"{url}/{series_uid}/instances", timeout=30).json()
    assert len(instances) == 1
    sop_uid = instances[0]["00080018"]["Value"][0]
    found = [h for h in orthanc.post("/tools/lookup", sop_uid) if h["Type"] == "Instance"]
    return dcmread(BytesIO(orthanc.get(f"/instances/{found[0]['ID']}/file")))


@pytest.mark.parametrize("method", ["dimse", "stow"])
def test_the_sr_reaches_orthanc_in_the_source_study(study, orthanc, make_settings, method):
    files, headers = study
    for path in files:
        orthanc.upload(path)
    sr = build_sr(headers, study_result(headers), OBSERVER)
    peer = orthanc_peer(orthanc)
    if method == "dimse":
        send_sr_dimse(sr, make_settings(peers=[peer]), peer)
    else:
        send_sr_stow(sr, peer)
    stored = find_sr_in_study(orthanc, headers[0].StudyInstanceUID)
    assert stored.SOPInstanceUID == sr.SOPInstanceUID
    summary = read_sr_summary(stored)
    assert summary == expected_summary(headers) | {"sop_instance_uid": sr.SOPInstanceUID}


@pytest.mark.parametrize("method", ["dimse", "stow"])
def test_a_pacs_that_is_down_is_a_transient_failure(study, make_settings, method):
    _files, headers = study
    port = free_port()
    peer = Peer(
        name="down", ae_title="NOBODY", port=port, dicomweb_url=f"http://127.0.0.1:{port}/dw"
    )
    sr = build_sr(headers, study_result(headers), OBSERVER)
    with pytest.raises(SendError) as info:
        if method == "dimse":
            send_sr_dimse(sr, make_settings(peers=[peer]), peer)
        else:
            send_sr_stow(sr, peer)
    assert info.value.transient is True
    assert f"127.0.0.1:{port}" in str(info.value)  # names the PACS it could not reach


def test_a_stow_root_that_does_not_exist_is_a_permanent_failure(study, orthanc):
    _files, headers = study
    peer = orthanc_peer(orthanc).model_copy(
        update={"dicomweb_url": orthanc.http_url + "/no-such-root"}
    )
    with pytest.raises(SendError, match="HTTP 404") as info:
        send_sr_stow(build_sr(headers, study_result(headers), OBSERVER), peer)
    assert info.value.transient is False


def test_an_association_the_pacs_rejects_permanently_is_a_permanent_failure(
    study, make_settings, tmp_path
):
    _files, headers = study
    strict = start_orthanc(tmp_path / "strict", extra_config={"DicomCheckCalledAet": True})
    try:
        peer = orthanc_peer(strict).model_copy(update={"ae_title": "NOT_ORTHANC"})
        sr = build_sr(headers, study_result(headers), OBSERVER)
        with pytest.raises(SendError, match="permanently rejected") as info:
            send_sr_dimse(sr, make_settings(peers=[peer]), peer)
        assert info.value.transient is False
    finally:
        strict.stop(kill=True)
