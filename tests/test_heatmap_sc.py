"""The key slices' heatmaps as Secondary Captures sent with the SR (``report_heatmaps``),
against a real Orthanc: what the PACS holds, that a re-send stores nothing new, and that the
SR goes alone when the images cannot be made or the setting is off."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import update

from node import phantom
from node.analysis import gradcam
from node.analysis.bundle import ModelBundle
from node.records.db import Analysis, Report
from node.reporting import delivery
from node.reporting.heatmap_sc import DEMO_SERIES_DESCRIPTION, blend, derived_uid
from node.settings import DEMO_MODEL_DIR
from tests.conftest import orthanc_peer
from tests.test_report import OBSERVER
from tests.test_report_delivery import analysed, report_row

SR_UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.load(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    spec = phantom.PhantomSpec(finding="covid", slices=16, seed=2001, rows=256, columns=256)
    return phantom.write_series(spec, tmp_path_factory.mktemp("heatmap-sc"))


def study_series(orthanc, study_uid: str) -> dict[str, list]:
    """The study's instances in Orthanc by modality, read back over WADO-RS."""
    session = requests.Session()
    session.trust_env = False
    client = DICOMwebClient(orthanc.dicomweb_url, session=session)
    found: dict[str, list] = {}
    for entry in client.search_for_series(study_uid):
        modality = entry["00080060"]["Value"][0]
        series_uid = entry["0020000E"]["Value"][0]
        found.setdefault(modality, []).extend(client.retrieve_series(study_uid, series_uid))
    return found


def stored_key_slices(node, report_id: int) -> tuple:
    """The report's stored result: its key slices carry their maps."""
    result, _headers, _study, _ = delivery.study_result(
        node, report_row(node, report_id).analysis_id
    )
    return result, [k for k in result.key_slices if k.get("heatmap")]


def resend(node, report_id: int) -> None:
    with node.session_factory() as session, session.begin():
        delivery.resend(session, session.get(Report, report_id))


def test_derived_uids_are_stable_per_report_and_distinct_otherwise():
    first = derived_uid(SR_UID, "key slice", 4)
    assert first == derived_uid(SR_UID, "key slice", 4)
    assert first.startswith("2.25.") and len(first) <= 64
    others = {derived_uid(SR_UID, "key slice", 5), derived_uid(SR_UID + "2", "key slice", 4)}
    assert first not in others and len(others) == 2


def test_the_overlay_is_red_where_the_map_peaks_and_grey_where_there_is_no_evidence():
    windowed = np.full((64, 64), 100, np.uint8)
    heatmap = np.zeros((8, 8), np.uint8)
    heatmap[2, 5] = 255
    rgb = blend(windowed, heatmap)
    r, g, b = (int(v) for v in rgb[gradcam.peak(heatmap, (64, 64))])
    assert r > g + 30 and r > b + 80  # red to orange: red dominant, no blue
    assert (rgb[60, 2] == 100).all()  # no evidence: the slice as it is


def test_heatmap_images_go_with_the_sr_and_a_resend_stores_nothing_new(
    make_settings, bundle, series, orthanc
):
    node, report_id = analysed(
        make_settings, bundle, series, orthanc_peer(orthanc), report_heatmaps=True
    )
    result, keys = stored_key_slices(node, report_id)
    assert len(keys) == 3
    assert delivery.deliver_report(node, report_id, OBSERVER) == "sent"
    source = dcmread(series[0], stop_before_pixels=True)
    held = study_series(orthanc, str(source.StudyInstanceUID))
    sr_uid = report_row(node, report_id).sop_instance_uid
    assert [str(ds.SOPInstanceUID) for ds in held["SR"]] == [sr_uid]
    images = sorted(held["OT"], key=lambda ds: int(ds.InstanceNumber))
    assert [int(ds.InstanceNumber) for ds in images] == [1, 2, 3]
    for ds, key in zip(images, keys, strict=True):
        item = result.slices[key["position"]]
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.SOPInstanceUID == derived_uid(sr_uid, "key slice", key["position"])
        assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SeriesDescription == DEMO_SERIES_DESCRIPTION
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel) == ("RGB", 3)
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        assert ds.BurnedInAnnotation == "NO"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == item.sop_instance_uid
        heatmap = gradcam.decode(key["heatmap"])
        r, g, b = (int(v) for v in ds.pixel_array[gradcam.peak(heatmap, (ds.Rows, ds.Columns))])
        assert r > g + 30 and r > b + 80, (r, g, b)
    instances = len(orthanc.instances())

    resend(node, report_id)
    assert delivery.deliver_report(node, report_id, OBSERVER) == "sent"
    again = study_series(orthanc, str(source.StudyInstanceUID))
    assert len(orthanc.instances()) == instances
    assert sorted(str(ds.SOPInstanceUID) for ds in again["OT"]) == sorted(
        str(ds.SOPInstanceUID) for ds in images
    )
    node.close()


def test_stow_sends_the_heatmap_images_in_the_sr_request(make_settings, bundle, series, orthanc):
    node, report_id = analysed(
        make_settings,
        bundle,
        series,
        orthanc_peer(orthanc),
        report_heatmaps=True,
        report_method="stow",
    )
    assert delivery.deliver_report(node, report_id, OBSERVER) == "sent"
    held = study_series(orthanc, str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID))
    assert len(held["SR"]) == 1 and len(held["OT"]) == 3
    node.close()


def test_with_the_setting_off_only_the_sr_is_sent(make_settings, bundle, series, orthanc):
    node, report_id = analysed(make_settings, bundle, series, orthanc_peer(orthanc))
    assert delivery.deliver_report(node, report_id, OBSERVER) == "sent"
    held = study_series(orthanc, str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID))
    assert sorted(held) == ["SR"]  # Orthanc holds only what the node sent
    node.close()


def test_a_damaged_stored_map_sends_the_sr_alone(make_settings, bundle, series, orthanc, caplog):
    node, report_id = analysed(
        make_settings, bundle, series, orthanc_peer(orthanc), report_heatmaps=True
    )
    analysis_id = report_row(node, report_id).analysis_id
    with node.session_factory() as session, session.begin():
        assessment = dict(session.get(Analysis, analysis_id).assessment)
        keys = [dict(key) for key in assessment["key_slices"]]
        keys[1]["heatmap"] = {**keys[1]["heatmap"], "values": "not base64!"}
        session.execute(
            update(Analysis)
            .where(Analysis.id == analysis_id)
            .values(assessment={**assessment, "key_slices": keys})
        )
    with caplog.at_level(logging.WARNING, logger="node.reporting.delivery"):
        assert delivery.deliver_report(node, report_id, OBSERVER) == "sent"
    assert "the SR goes without heatmap images (key slice" in caplog.text
    held = study_series(orthanc, str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID))
    assert sorted(held) == ["SR"]  # Orthanc holds only what the node sent
    node.close()
