"""The queue dashboard: counts and ages per status, failed analyses and reports with their
reasons, workers seen, and the moves a person makes (retry, re-send, suspend, resume, force,
discard), each audited, on SQLite and PostgreSQL."""

from __future__ import annotations

import html
import logging
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from node import phantom
from node.records import lifecycle, workers
from node.records.db import (
    Analysis,
    AnalysisStatus,
    AuditEvent,
    Instance,
    Label,
    Report,
    ReportStatus,
    Study,
    utcnow,
)
from node.workflow.sweeper import due_work
from tests.webui import csrf_token
from webui import dashboard as dashboard_view

NOW = utcnow().replace(microsecond=0)
PATIENT = "QZWXVO^DASHBOARD"


@pytest.fixture
def make_settings(make_settings, database_url):
    """The shared settings factory, on this test's database (SQLite or PostgreSQL)."""

    def build(**overrides):
        overrides.setdefault("database_url", database_url)
        return make_settings(**overrides)

    return build


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """The dashboard's clock stands at :data:`NOW`."""
    monkeypatch.setattr(dashboard_view, "now", lambda: NOW)


def add_study(web_node, status: str, since, **fields) -> int:
    """A hand-made study row in ``status`` since ``since``."""
    with web_node.session_factory() as db:
        study = Study(
            study_instance_uid=generate_uid(),
            patient_name=PATIENT,
            modalities="CT",
            status=status,
            status_changed_at=since,
            first_received_at=since,
            last_received_at=since,
            **fields,
        )
        db.add(study)
        db.commit()
        return study.id


def add_report(web_node, study_id: int, status: str, **fields) -> int:
    """A done analysis of ``study_id`` and its report in ``status``."""
    with web_node.session_factory() as db:
        analysis = Analysis(
            study_id=study_id,
            model_name="effnet-chest",
            model_version="2.1.0",
            status=AnalysisStatus.DONE,
            predicted_class="Covid_19",
            timings={},
            instances_skipped={},
        )
        db.add(analysis)
        db.flush()
        report = Report(
            analysis_id=analysis.id,
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            destination="pacs",
            method="dimse",
            status=status,
            **fields,
        )
        db.add(report)
        db.commit()
        return report.id


def study(web_node, study_id: int) -> Study | None:
    with web_node.session_factory() as db:
        return db.get(Study, study_id)


def audit_events(web_node, action: str) -> list[AuditEvent]:
    with web_node.session_factory() as db:
        return list(db.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def page_text(answer) -> str:
    """What a user reads: the page without tags, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", answer.text)).split())


def post(client, url: str, **data):
    """A form post with the dashboard's CSRF token, the redirect followed."""
    token = csrf_token(client.get("/dashboard").text)
    return client.post(url, data={"csrf_token": token, **data}, follow_redirects=True)


def flash_text(answer) -> str:
    found = re.findall(r'<p class="flash (\w+)" role="alert">(.*?)</p>', answer.text)
    return " | ".join(f"{category}: {html.unescape(text)}" for category, text in found)


# --------------------------------------------------------------------------- what it shows


def test_counts_and_the_age_of_the_oldest_per_status(client, web_node):
    add_study(web_node, "receiving", NOW - timedelta(seconds=40))
    add_study(web_node, "queued", NOW - timedelta(minutes=5))
    add_study(web_node, "queued", NOW - timedelta(minutes=50))
    add_study(web_node, "failed", NOW - timedelta(hours=3, minutes=5), status_reason="x")
    add_study(web_node, "suspended", NOW - timedelta(days=2, hours=4), suspended_from="stable")
    answer = client.get("/dashboard.json")
    assert answer.status_code == 200
    rows = {row["status"]: row for row in answer.json["statuses"]}
    assert list(rows) == [
        "receiving",
        "stable",
        "queued",
        "analyzing",
        "analyzed",
        "reported",
        "failed",
        "ignored",
        "suspended",
    ]
    shown = {s: (r["count"], r["oldest_age_seconds"], r["oldest_age"]) for s, r in rows.items()}
    assert shown["receiving"] == (1, 40.0, "40 s")
    assert shown["queued"] == (2, 3000.0, "50 min")
    assert shown["failed"] == (1, 11100.0, "3 h 5 min")
    assert shown["suspended"] == (1, 187200.0, "2 d 4 h")
    assert shown["stable"] == shown["analyzed"] == (0, None, "—")
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert re.search(r'id="count-queued">2<', page.text)
    assert re.search(r'id="age-queued">50 min<', page.text)
    assert 'src="/static/dashboard.js"' in page.text and "<script>" not in page.text
    assert PATIENT not in page.text  # the dashboard names studies, not patients


def test_failed_analyses_and_failing_reports_show_their_reasons(client, web_node):
    with_reason = add_study(
        web_node, "failed", NOW - timedelta(minutes=3), status_reason="no axial CT image"
    )
    from_run = add_study(web_node, "failed", NOW - timedelta(minutes=2), accession_number="A77")
    with web_node.session_factory() as db:
        db.add(
            Analysis(
                study_id=from_run,
                model_name="m",
                model_version="1",
                status=AnalysisStatus.ABANDONED,
                error="worker lost (no heartbeat for 1800 s)",
                timings={},
                instances_skipped={},
            )
        )
        db.commit()
    analysed = add_study(web_node, "analyzed", NOW - timedelta(hours=1), accession_number="R1")
    add_report(
        web_node,
        analysed,
        ReportStatus.RETRYING,
        retries=2,
        last_error="association rejected by PACS",
        next_retry_at=NOW + timedelta(minutes=4),
    )
    add_report(web_node, analysed, ReportStatus.SENT)
    text = page_text(client.get("/dashboard"))
    failed = text.split("Failed analyses", 1)[1].split("Reports failing", 1)[0]
    assert "no axial CT image" in failed and f"study {with_reason}" in failed
    assert "A77" in failed and "worker lost (no heartbeat for 1800 s)" in failed
    reports = text.split("Reports failing", 1)[1].split("Suspended", 1)[0]
    assert "R1 pacs retrying 2 association rejected by PACS" in reports
    assert (NOW + timedelta(minutes=4)).strftime("%Y-%m-%d %H:%M:%S UTC") in reports
    assert reports.count("Re-send") == 1  # the sent report is not listed


def test_workers_seen_with_model_and_heartbeat_and_stale_after_two_minutes(client, web_node):
    with web_node.session_factory() as db:
        workers.beat(db, "gpu1:11", "gpu1", 11, "analysis", ("effnet-chest", "2.1.0"), NOW)
        workers.beat(
            db, "gpu2:22", "gpu2", 22, "analysis,reports", None, NOW - timedelta(minutes=3)
        )
        db.commit()
    seen = {w["name"]: w for w in client.get("/dashboard.json").json["workers"]}
    assert seen["gpu1:11"]["model"] == "effnet-chest 2.1.0"
    assert (seen["gpu1:11"]["silent_for"], seen["gpu1:11"]["stale"]) == ("0 s", False)
    assert (seen["gpu2:22"]["silent_for"], seen["gpu2:22"]["stale"]) == ("3 min", True)
    text = page_text(client.get("/dashboard"))
    assert "gpu1:11 gpu1 analysis effnet-chest 2.1.0 0 s ago" in text
    assert "gpu2:22 gpu2 analysis,reports — 3 min ago stale" in text


def test_anonymous_is_sent_to_sign_in(anonymous):
    for url in ("/dashboard", "/dashboard.json"):
        answer = anonymous.get(url)
        assert answer.status_code == 302 and "/login" in answer.headers["Location"]


# --------------------------------------------------------------------------- actions


def test_retry_queues_a_failed_study_for_the_next_dispatch_and_is_audited(client, web_node):
    study_id = add_study(
        web_node,
        "failed",
        NOW - timedelta(hours=1),
        status_reason="gave up after 3 attempts: worker lost",
        retries=1,
        analysis_attempts=3,
    )
    answer = post(client, f"/dashboard/studies/{study_id}/retry")
    assert flash_text(answer) == f"info: Study {study_id} is queued for analysis again."
    row = study(web_node, study_id)
    assert (row.status, row.analysis_attempts, row.status_reason) == (
        "queued",
        0,
        "retry asked by dr.rad",
    )
    assert due_work(web_node, now=NOW).analyses == [study_id]  # the next pass hands it out
    (event,) = audit_events(web_node, "study_retry")
    assert (event.username, event.study_id, event.client_address) == (
        "dr.rad",
        study_id,
        "127.0.0.1",
    )
    assert event.detail["previous_status"] == "failed"


@pytest.mark.parametrize(
    ("action", "status"),
    [("retry", "analyzed"), ("force", "failed"), ("resume", "queued"), ("suspend", "analyzing")],
)
def test_an_action_on_a_study_in_the_wrong_status_is_refused_and_says_why(
    client, web_node, action, status
):
    study_id = add_study(web_node, status, NOW - timedelta(minutes=1))
    answer = post(client, f"/dashboard/studies/{study_id}/{action}")
    assert flash_text(answer) == f"error: Study {study_id} is {status} now: nothing to {action}."
    assert study(web_node, study_id).status == status
    assert audit_events(web_node, f"study_{action}") == []


def test_suspend_keeps_the_sweeper_off_until_resumed(client, web_node):
    queued = add_study(web_node, "queued", NOW - timedelta(hours=1))
    stable = add_study(web_node, "stable", NOW - timedelta(hours=1))
    for study_id in (queued, stable):
        answer = post(client, f"/dashboard/studies/{study_id}/suspend")
        assert "is suspended (it was" in flash_text(answer)
    assert (study(web_node, queued).status, study(web_node, queued).suspended_from) == (
        "suspended",
        "queued",
    )
    later = NOW + timedelta(hours=1)
    assert due_work(web_node, now=later).analyses == []  # neither queued nor handed out
    assert study(web_node, stable).status == "suspended"
    text = page_text(client.get("/dashboard"))
    assert re.search(r"Suspended .* dr\.rad queued", text)
    answer = post(client, f"/dashboard/studies/{queued}/resume")
    assert flash_text(answer) == f"info: Study {queued} is resumed: queued."
    assert study(web_node, queued).status == "queued"
    assert study(web_node, queued).suspended_from is None
    assert due_work(web_node, now=NOW).analyses == [queued]  # its message is handed out anew
    events = audit_events(web_node, "study_suspend") + audit_events(web_node, "study_resume")
    assert [(e.action, e.study_id, e.detail["previous_status"]) for e in events] == [
        ("study_suspend", queued, "queued"),
        ("study_suspend", stable, "stable"),
        ("study_resume", queued, "suspended"),
    ]


def test_force_queues_an_ignored_study_and_is_audited(client, web_node):
    study_id = add_study(web_node, "ignored", NOW - timedelta(days=1), status_reason="no rule")
    text = page_text(client.get("/dashboard"))
    assert "Ignored (no routing rule matched)" in text and "Force analysis" in text
    answer = post(client, f"/dashboard/studies/{study_id}/force")
    assert flash_text(answer) == f"info: Study {study_id} is queued for analysis (forced)."
    assert study(web_node, study_id).status == "queued"
    assert due_work(web_node, now=NOW).analyses == [study_id]
    (event,) = audit_events(web_node, "study_force")
    assert (event.study_id, event.detail["previous_status"]) == (study_id, "ignored")


def test_resend_of_a_failed_report_makes_it_due_and_is_audited(client, web_node):
    study_id = add_study(web_node, "analyzed", NOW - timedelta(hours=1))
    report_id = add_report(
        web_node, study_id, ReportStatus.FAILED, retries=5, last_error="connection refused"
    )
    answer = post(client, f"/dashboard/reports/{report_id}/resend")
    assert flash_text(answer) == "info: The report will be sent to pacs again shortly."
    with web_node.session_factory() as db:
        report = db.get(Report, report_id)
        assert (report.status, report.retries, report.last_error) == ("pending", 0, None)
    assert due_work(web_node).reports == [report_id]
    (event,) = audit_events(web_node, "resend_report")
    assert (event.study_id, event.detail["previous_status"]) == (study_id, "failed")
    sent = add_report(web_node, study_id, ReportStatus.SENT)
    answer = post(client, f"/dashboard/reports/{sent}/resend")
    assert flash_text(answer) == f"error: Report {sent} is sent: nothing to re-send."


@pytest.mark.parametrize(
    "path", ["studies/1/retry", "studies/1/suspend", "studies/1/discard", "reports/1/resend"]
)
def test_posts_without_csrf_token_are_refused(admin_client, web_node, path):
    add_study(web_node, "failed", NOW)
    answer = admin_client.post(f"/dashboard/{path}")
    assert answer.status_code == 400 and "CSRF token is missing" in page_text(answer)
    assert study(web_node, 1).status == "failed"


# --------------------------------------------------------------------------- arrivals


@pytest.fixture(scope="module")
def two_slices(tmp_path_factory):
    spec = phantom.PhantomSpec(slices=2, rows=64, columns=64, seed=9, patient_name=PATIENT)
    return phantom.write_series(spec, tmp_path_factory.mktemp("dashboard-phantom"))


def test_a_suspended_study_stays_suspended_when_images_arrive(client, web_node, two_slices):
    web_node.ingestor.ingest_part10(two_slices[0].read_bytes(), "TESTSCU")
    with web_node.session_factory() as db:
        lifecycle.mark_stable(db, 1, now=utcnow() + timedelta(minutes=1))
        study_id = db.scalars(select(Study.id)).one()
    post(client, f"/dashboard/studies/{study_id}/suspend")
    assert (study(web_node, study_id).status, study(web_node, study_id).suspended_from) == (
        "suspended",
        "stable",
    )
    web_node.ingestor.ingest_part10(two_slices[1].read_bytes(), "TESTSCU")
    row = study(web_node, study_id)
    assert (row.status, row.suspended_from, row.instance_count) == ("suspended", "receiving", 2)
    answer = post(client, f"/dashboard/studies/{study_id}/resume")
    assert flash_text(answer) == f"info: Study {study_id} is resumed: receiving."


def test_a_reopened_study_is_receiving_since_the_image_arrived(web_node, two_slices):
    web_node.ingestor.ingest_part10(two_slices[0].read_bytes(), "TESTSCU")
    with web_node.session_factory() as db:
        found = db.scalars(select(Study)).one()
        found.status, found.status_changed_at = "reported", NOW - timedelta(days=3)
        db.commit()
    before = utcnow()
    web_node.ingestor.ingest_part10(two_slices[1].read_bytes(), "TESTSCU")
    row = study(web_node, found.id)
    assert row.status == "receiving" and row.status_changed_at >= before  # age: seconds


# --------------------------------------------------------------------------- discard


@pytest.fixture
def stored_study(web_node, two_slices) -> SimpleNamespace:
    """A study with its files in the store, a result, a report and a label."""
    for path in two_slices:
        web_node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    with web_node.session_factory() as db:
        found = db.scalars(select(Study)).one()
        keys = list(db.scalars(select(Instance.store_key)))
        db.add(Label(study_id=found.id, keyword="COVID", created_by="dr.rad"))
        db.commit()
    add_report(web_node, found.id, ReportStatus.SENT)
    uid = str(dcmread(two_slices[0], stop_before_pixels=True).StudyInstanceUID)
    return SimpleNamespace(id=found.id, uid=uid, paths=[web_node.store.path(k) for k in keys])


def test_admin_discards_a_study_its_files_and_rows_and_it_is_audited(
    admin_client, web_node, stored_study, caplog
):
    assert all(path.exists() for path in stored_study.paths)
    with caplog.at_level(logging.INFO):
        answer = post(admin_client, f"/dashboard/studies/{stored_study.id}/discard")
    assert (
        flash_text(answer) == f"info: Study {stored_study.id} is discarded (2 instances removed)."
    )
    assert not any(path.exists() for path in stored_study.paths)
    with web_node.session_factory() as db:
        for table in (Study, Instance, Analysis, Report, Label):
            assert db.scalars(select(table)).all() == []
    (event,) = audit_events(web_node, "study_discard")
    assert (event.username, event.study_id, event.client_address) == ("ad.min", None, "127.0.0.1")
    assert event.detail == {
        "discarded_study_id": stored_study.id,
        "study_instance_uid": stored_study.uid,
        "instances": 2,
    }
    assert f"study {stored_study.uid} discarded (2 instances)" in caplog.text
    assert "QZWXVO" not in caplog.text  # no patient data in the logs


def test_a_radiologist_cannot_discard(client, web_node, stored_study):
    token = csrf_token(client.get("/dashboard").text)
    answer = client.post(
        f"/dashboard/studies/{stored_study.id}/discard", data={"csrf_token": token}
    )
    assert answer.status_code == 403 and "This page is for administrators." in page_text(answer)
    assert study(web_node, stored_study.id) is not None
    assert all(path.exists() for path in stored_study.paths)
    assert audit_events(web_node, "study_discard") == []
    assert "Discard" not in page_text(client.get("/dashboard"))  # not offered either


def test_a_study_being_analysed_is_not_discarded(admin_client, web_node, stored_study):
    with web_node.session_factory() as db:
        assert lifecycle.move_where(db, stored_study.id, {"receiving"}, "stable")
        db.commit()
    with web_node.session_factory() as db:
        assert lifecycle.move_where(db, stored_study.id, {"stable"}, "queued")
        assert lifecycle.move_where(db, stored_study.id, {"queued"}, "analyzing")
        db.commit()
    answer = post(admin_client, f"/dashboard/studies/{stored_study.id}/discard")
    assert flash_text(answer) == (
        f"error: Study {stored_study.id} is not discarded: it is being analysed; "
        "discard it once the analysis ends."
    )
    assert study(web_node, stored_study.id).status == "analyzing"
    assert all(path.exists() for path in stored_study.paths)
    assert audit_events(web_node, "study_discard") == []
