"""Revised SRs: a re-analysis or a radiologist's correction sends an SR whose Predecessor
Documents Sequence references the SR it replaces, received by a real storage SCP; the study
page shows the chain."""

from __future__ import annotations

import html
import re
import threading
from datetime import timedelta

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from node import phantom
from node.analysis.bundle import ModelBundle
from node.records.db import Analysis, Report, Study, utcnow
from node.reporting import delivery
from node.reporting.sr import FINDING_CODES, read_sr_revision, read_sr_summary
from node.runtime import build_node
from node.settings import DEMO_MODEL_DIR
from node.workflow import jobs, sweeper
from tests.peers import ArchiveSCP
from tests.test_pipeline import ingest_files, stable
from tests.test_report import OBSERVER
from tests.webui import add_accounts, csrf_token, sign_in


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.load(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    spec = phantom.PhantomSpec(slices=12, seed=41)
    return phantom.write_series(spec, tmp_path_factory.mktemp("revised"))


@pytest.fixture
def archive(request):
    scp = ArchiveSCP(**getattr(request, "param", {}))
    yield scp
    scp.stop()


@pytest.fixture
def make_node(make_settings, archive):
    """Build a node reporting to ``archive`` (web accounts added); closed at the end."""
    built = []

    def make(**overrides):
        settings = make_settings(
            peers=[archive.peer], report_peer="archive", web_secure_cookies=False, **overrides
        )
        node = build_node(settings, migrate=True)
        add_accounts(node)
        built.append(node)
        return node

    yield make
    for node in built:
        node.close()


def analysed(node, bundle, series) -> tuple[int, int]:
    """Ingest and analyse the study: (study id, its pending report's id)."""
    study_id = ingest_files(node, series)
    stable(node, study_id)
    return study_id, jobs.run_analysis(node, bundle, study_id)


def reanalyze(node, bundle, study_id: int, tmp_path, monkeypatch) -> int:
    """``ainode reanalyze`` the study, then a worker's run: the new report's id."""
    from ainode.cli import main
    from tests.config import write_config

    with node.session_factory() as session:
        study_uid = session.get(Study, study_id).study_instance_uid
    monkeypatch.delenv("AINODE_CONFIG", raising=False)
    config = write_config(node.settings, tmp_path / "ainode.toml")
    assert main(["--config", str(config), "reanalyze", study_uid]) == 0
    return jobs.run_analysis(node, bundle, study_id)


def report_row(node, report_id: int) -> Report:
    with node.session_factory() as session:
        return session.get(Report, report_id)


def predecessor_uids(ds: Dataset) -> list[tuple[str, str, str, str]]:
    """(study, series, SOP instance, SOP class) of each Predecessor Documents Sequence item,
    read from the dataset as received."""
    return [
        (
            study.StudyInstanceUID,
            series.SeriesInstanceUID,
            item.ReferencedSOPInstanceUID,
            item.ReferencedSOPClassUID,
        )
        for study in ds.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]


def uids_of(ds: Dataset) -> tuple[str, str, str, str]:
    return (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)


def post_verdict(node, study_id: int, verdict: str):
    """A signed-in radiologist corrects the result on the study page: the answer."""
    from webui import create_app

    client = sign_in(
        create_app(node.settings, {"TESTING": True}, node=node).test_client(), "radiologist"
    )
    page = f"/studies/{study_id}"
    token = csrf_token(client.get(page).text)
    answer = client.post(
        f"{page}/verdict", json={"verdict": verdict}, headers={"X-CSRFToken": token}
    )
    return client, answer


def corrected_class(node, report_id: int) -> str:
    """A class other than the one the report's analysis predicted."""
    with node.session_factory() as session:
        predicted = session.get(Analysis, report_row(node, report_id).analysis_id).predicted_class
    return next(name for name in FINDING_CODES if name != predicted)


def dispatched(node) -> list[int]:
    """The reports the dispatcher hands to the report queue at its next pass."""
    return sweeper.due_work(node, utcnow() + timedelta(seconds=1)).reports


# ----------------------------------------------------------------------- re-analysis


def test_reanalyze_sends_an_sr_whose_predecessor_is_the_first(
    make_node, bundle, series, archive, tmp_path, monkeypatch
):
    node = make_node()
    study_id, first = analysed(node, bundle, series)
    assert delivery.deliver_report(node, first, OBSERVER) == "sent"
    second = reanalyze(node, bundle, study_id, tmp_path, monkeypatch)
    row = report_row(node, second)
    assert (row.kind, row.replaces_report_id) == ("reanalysis", first)
    assert delivery.deliver_report(node, second, OBSERVER) == "sent"

    original, revised = archive.datasets
    assert "PredecessorDocumentsSequence" not in original
    assert predecessor_uids(revised) == [uids_of(original)]
    assert revised.SOPInstanceUID == row.sop_instance_uid != original.SOPInstanceUID
    assert read_sr_summary(revised)["algorithm_name"] == bundle.info.identity().name


@pytest.mark.parametrize("archive", [{"hold": True}], indirect=True)
def test_a_report_opened_while_the_last_was_on_its_way_names_it_once_it_is_sent(
    make_node, bundle, series, archive, tmp_path, monkeypatch
):
    node = make_node()
    study_id, first = analysed(node, bundle, series)
    outcome = {}
    sending = threading.Thread(
        target=lambda: outcome.update(first=delivery.deliver_report(node, first, OBSERVER))
    )
    sending.start()
    assert archive.arrived.wait(60), "the first C-STORE never arrived"
    second = reanalyze(node, bundle, study_id, tmp_path, monkeypatch)
    assert report_row(node, second).replaces_report_id is None  # nothing sent yet
    archive.release()
    sending.join(60)
    assert outcome["first"] == "sent"
    assert delivery.deliver_report(node, second, OBSERVER) == "sent"
    assert report_row(node, second).replaces_report_id == first
    original, revised = archive.datasets
    assert predecessor_uids(revised) == [uids_of(original)]


# ------------------------------------------------------------ a radiologist's correction


def test_a_correction_is_written_back_as_a_third_sr_replacing_the_second(
    make_node, bundle, series, archive, tmp_path, monkeypatch
):
    node = make_node(report_corrections=True)
    study_id, first = analysed(node, bundle, series)
    assert delivery.deliver_report(node, first, OBSERVER) == "sent"
    second = reanalyze(node, bundle, study_id, tmp_path, monkeypatch)
    assert delivery.deliver_report(node, second, OBSERVER) == "sent"
    predicted = read_sr_summary(archive.datasets[1])["finding"]
    corrected = corrected_class(node, second)

    client, answer = post_verdict(node, study_id, corrected)
    assert answer.status_code == 200
    assert answer.json["message"] == (
        f"Correction to {corrected} recorded. A corrected SR will be sent to archive shortly."
    )
    (third,) = dispatched(node)  # the dispatcher hands the correction to the report queue
    row = report_row(node, third)
    assert (row.kind, row.replaces_report_id) == ("correction", second)
    assert delivery.deliver_report(node, third, OBSERVER) == "sent"

    _original, revised, correction = archive.datasets
    summary = read_sr_summary(correction)
    code = FINDING_CODES[corrected]
    assert summary["finding_code"] == (code.scheme_designator, code.value) != predicted
    assert (summary["probability"], summary["algorithm_name"]) == (None, None)
    assert read_sr_revision(correction)["person_observer"] == ("Test radiologist^", "dr.rad")
    assert predecessor_uids(correction) == [uids_of(revised)]

    # the study page lists the chain: each SR, its kind, status and the one it replaces
    page = html.unescape(re.sub(r"<[^>]+>", " ", client.get(f"/studies/{study_id}").text))
    page = " ".join(page.split())
    rows = {r: report_row(node, r) for r in (first, second, third)}
    assert "Report chain" in page
    assert (
        f"#{third} {rows[third].sop_instance_uid} radiologist correction to {corrected} by dr.rad"
    ) in page
    assert f"#{second} {rows[second].sop_instance_uid} re-analysis" in page
    assert f"#{first} {rows[first].sop_instance_uid} model result" in page
    assert f"sent #{second} {rows[second].sop_instance_uid}" in page  # third replaces second
    assert f"sent #{first} {rows[first].sop_instance_uid}" in page  # second replaces first
    assert page.count(" sent ") >= 3


def test_with_report_corrections_off_a_correction_sends_no_sr(make_node, bundle, series, archive):
    node = make_node()  # report_corrections defaults to false
    study_id, first = analysed(node, bundle, series)
    assert delivery.deliver_report(node, first, OBSERVER) == "sent"
    corrected = corrected_class(node, first)
    client, answer = post_verdict(node, study_id, corrected)
    assert answer.json == {"ok": True, "message": f"Correction to {corrected} recorded."}
    assert dispatched(node) == []
    with node.session_factory() as session:
        assert session.scalars(select(Report.id)).all() == [first]
    assert len(archive.datasets) == 1
    page = " ".join(re.sub(r"<[^>]+>", " ", client.get(f"/studies/{study_id}").text).split())
    assert "Report chain" in page and f"#{first} " in page
    assert "model result" in page and "radiologist correction" not in page


def test_a_pending_model_report_superseded_by_a_correction_is_never_sent(
    make_node, bundle, series, archive
):
    node = make_node(report_corrections=True)
    study_id, first = analysed(node, bundle, series)  # not delivered yet (a PACS down)
    corrected = corrected_class(node, first)
    _client, answer = post_verdict(node, study_id, corrected)
    assert answer.status_code == 200
    (correction,) = [r for r in dispatched(node) if r != first]
    assert delivery.deliver_report(node, first, OBSERVER) == "failed"
    assert report_row(node, first).last_error == (
        "superseded: a radiologist's correction of the result replaces this report"
    )
    assert delivery.deliver_report(node, correction, OBSERVER) == "sent"
    (received,) = archive.datasets  # only the correction reached the PACS
    assert received.SOPInstanceUID == report_row(node, correction).sop_instance_uid
    assert "PredecessorDocumentsSequence" not in received  # the PACS never had the first
    code = FINDING_CODES[corrected]
    assert read_sr_summary(received)["finding_code"] == (code.scheme_designator, code.value)
