"""Exports page: preview counts from labels, a real background export, its zip, refusals."""

from __future__ import annotations

import csv
import io
import json
import re
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node import phantom
from node.records.db import AuditEvent, ExportJob, ExportStatus, utcnow
from node.records.export import export_bundle
from node.records.labels import add_label
from node.runtime import build_node
from node.workflow.exports import exports_root
from node.workflow.sweeper import due_work
from tests.peers import free_port
from tests.webui import add_accounts, csrf_token, running_worker, sign_in

JOB_TIMEOUT_S = 120
# name: (finding, patient id, keyword)
STUDIES = {
    "covid": ("covid", "PIDWEB1", "COVID"),
    "normal": ("normal", "PIDWEB2", "Normal"),
    "pneumonia": ("pneumonia", "PIDWEB1", "Pneumonia"),
    "excluded": ("normal", "PIDWEB3", "Exclude"),
}
SLICES = 10
NONE = {"Covid_19": 0, "Normal": 0, "Pneumonia": 0}


@pytest.fixture(scope="module")
def phantom_studies(tmp_path_factory) -> dict[str, list[Path]]:
    """Four small phantom studies (three patients), written once for the module."""
    root = tmp_path_factory.mktemp("web-export-phantoms")
    return {
        name: phantom.write_series(
            phantom.PhantomSpec(
                finding=finding,
                slices=SLICES,
                rows=96,
                columns=96,
                seed=index,
                patient_id=patient,
                accession_number=f"ACCWEB{index}",
            ),
            root / name,
        )
        for index, (name, (finding, patient, _)) in enumerate(STUDIES.items())
    }


def ingest_and_label(node, files: dict[str, list[Path]], keywords: dict[str, str]) -> None:
    """Store each study on the node and put its keyword on it."""
    for paths in files.values():
        for path in paths:
            node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    with node.session_factory() as db, db.begin():
        for name, keyword in keywords.items():
            study_uid = str(dcmread(files[name][0], stop_before_pixels=True).StudyInstanceUID)
            add_label(db, study_uid, keyword, "dr.house")


@pytest.fixture
def labelled(web_node, phantom_studies):
    ingest_and_label(web_node, phantom_studies, {n: k for n, (*_, k) in STUDIES.items()})
    return web_node


@pytest.fixture
def worker(web_node, tmp_path):
    """A real worker process on the web node's database and (embedded) broker."""
    with running_worker(web_node.settings, tmp_path / "worker"):
        yield


def post_json(client, url: str, body, token: str | None = None):
    token = token if token is not None else csrf_token(client.get("/exports").text)
    return client.post(url, json=body, headers={"X-CSRFToken": token})


def wait_for_job(client, job_id: int) -> dict:
    """Poll the job's JSON until it is done or failed (bounded)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/exports/{job_id}").get_json()
        if job["status"] in (ExportStatus.DONE, ExportStatus.FAILED):
            return job
        time.sleep(0.2)
    pytest.fail(f"export job {job_id} did not finish in {JOB_TIMEOUT_S} s")


def test_page_lists_keywords_in_use_and_classes(client, labelled):
    page = client.get("/exports")
    assert page.status_code == 200
    for keyword in ("COVID", "Normal", "Pneumonia", "Exclude", "Covid_19"):
        assert keyword in page.text
    assert "No export yet." in page.text


def test_preview_counts_studies_patients_and_instances_per_class(client, labelled):
    answer = post_json(client, "/exports/preview", {})
    assert answer.status_code == 200, answer.text
    counts = answer.get_json()["counts"]
    assert counts["studies"] == {"Covid_19": 1, "Normal": 1, "Pneumonia": 1}
    assert counts["patients"] == {"Covid_19": 1, "Normal": 1, "Pneumonia": 1}
    assert counts["patients_total"] == 2  # covid and pneumonia are one patient
    assert counts["instances"] == dict.fromkeys(("Covid_19", "Normal", "Pneumonia"), SLICES)
    assert (counts["selected"], counts["exported"]) == (4, 3)
    assert counts["not_exported"] == {"excluded from training": 1}
    # nothing was written: no job, no folder; the look at the data is audited
    assert not (labelled.settings.data_dir / "exports").exists()
    with labelled.session_factory() as db:
        assert db.scalars(select(ExportJob)).all() == []
        events = db.scalars(select(AuditEvent)).all()
    assert [(e.username, e.action, e.client_address, e.detail) for e in events][-1] == (
        "dr.rad",
        "export_preview",
        "127.0.0.1",
        {"keywords": [], "classes": [], "since": None, "until": None, "selected": 4},
    )


@pytest.mark.parametrize(
    ("body", "studies"),
    [
        ({"classes": ["Covid_19"]}, {"Covid_19": 1, "Normal": 0, "Pneumonia": 0}),
        ({"keywords": ["normal", "pneumonia"]}, {"Covid_19": 0, "Normal": 1, "Pneumonia": 1}),
        ({"keywords": ["normal"], "classes": ["Covid_19"]}, {**NONE, "Covid_19": 1, "Normal": 1}),
        ({"since": "2999-01-01"}, {"Covid_19": 0, "Normal": 0, "Pneumonia": 0}),
        ({"until": "2000-01-01"}, {"Covid_19": 0, "Normal": 0, "Pneumonia": 0}),
        ({"since": "2000-01-01", "until": "2999-12-31"}, dict.fromkeys(NONE, 1)),
    ],
)  # fmt: skip
def test_preview_follows_keywords_classes_and_dates(client, labelled, body, studies):
    answer = post_json(client, "/exports/preview", body)
    assert answer.status_code == 200, answer.text
    assert answer.get_json()["counts"]["studies"] == studies


def test_export_takes_labels_until_the_end_of_the_day(labelled, tmp_path):
    today = utcnow().date()
    none = export_bundle(labelled, tmp_path / "none", until=today - timedelta(days=1))
    assert sum(none.studies.values()) == 0 and none.skipped == []
    every = export_bundle(labelled, tmp_path / "all", since=today, until=today)
    assert every.studies == {"Covid_19": 1, "Normal": 1, "Pneumonia": 1}
    info = json.loads((tmp_path / "all" / "export.json").read_text(encoding="utf-8"))
    assert (info["since"], info["until"]) == (today.isoformat(), today.isoformat())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"since": "2024-13-01"}, "'since' must be a date as YYYY-MM-DD"),
        ({"since": "2024-05-02", "until": "2024-05-01"}, "'until' (2024-05-01) is before 'since'"),
        ({"classes": ["Flu"]}, "classes must be a list of Covid_19, Normal, Pneumonia"),
        ({"keywords": ["  "]}, "keyword must be 1-64 characters"),
        ({"keywords": "a" * 65}, "keyword must be 1-64 characters"),
        ([1, 2], "The request body must be a JSON object."),
    ],
)
def test_bad_selection_is_refused_with_the_reason(client, labelled, body, message):
    for url in ("/exports/preview", "/exports"):
        answer = post_json(client, url, body)
        assert answer.status_code == 400
        assert message in answer.get_json()["error"]


def test_export_runs_in_the_background_and_downloads_as_a_zip(client, labelled, worker):
    answer = post_json(client, "/exports", {"keywords": ["COVID", "Normal", "pneumonia"]})
    assert answer.status_code == 202, answer.text
    job = wait_for_job(client, answer.get_json()["id"])
    assert job["status"] == "done", job["error"]
    assert (job["done"], job["total"]) == (3, 3)
    assert job["counts"]["studies"] == {"Covid_19": 1, "Normal": 1, "Pneumonia": 1}
    assert job["counts"]["patients"] == 2 and job["requested_by"] == "dr.rad"
    assert job["parameters"]["selection"] == ["COVID", "Normal", "pneumonia"]
    folders = list((labelled.settings.data_dir / "exports").iterdir())
    assert [f.name.split("-")[0] for f in folders] == [str(job["id"])]

    download = client.get(job["download"])
    assert download.status_code == 200
    assert download.mimetype == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(download.data))
    names = archive.namelist()
    root = folders[0].name
    assert {f"{root}/manifest.csv", f"{root}/export.json"} <= set(names)
    pngs = [n for n in names if n.endswith(".png")]
    assert len(pngs) == sum(job["counts"]["images"].values()) > 0
    assert {n.split("/")[2] for n in pngs} == {"Covid_19", "Normal", "Pneumonia"}
    rows = list(csv.DictReader(io.StringIO(archive.read(f"{root}/manifest.csv").decode())))
    assert sorted(f"{root}/{row['path']}" for row in rows) == sorted(pngs)
    info = json.loads(archive.read(f"{root}/export.json"))
    assert info["counts"]["studies"] == job["counts"]["studies"]
    with labelled.session_factory() as db:
        actions = [(e.username, e.action, e.detail.get("download")) for e in db.scalars(
            select(AuditEvent).where(AuditEvent.action == "export").order_by(AuditEvent.id)
        )]  # fmt: skip
    assert actions == [("dr.rad", "export", None), ("dr.rad", "export", True)]
    listed = client.get("/exports")
    assert f"/exports/{job['id']}/download" in listed.text


def test_a_failed_export_says_why(client, labelled, worker):
    (labelled.settings.data_dir / "exports").write_text("not a folder")
    answer = post_json(client, "/exports", {})
    job = wait_for_job(client, answer.get_json()["id"])
    assert job["status"] == "failed" and job["download"] is None
    assert job["error"] == "the export could not be written: File exists (exports)"
    assert client.get(f"/exports/{job['id']}/download").status_code == 404


def test_nothing_selected_is_not_exported(client, labelled):
    answer = post_json(client, "/exports", {"keywords": ["no such keyword"]})
    assert answer.status_code == 400
    assert "no labelled study matches" in answer.get_json()["error"]


def test_download_of_unknown_or_unfinished_export_is_404(client, labelled):
    assert client.get("/exports/999/download").status_code == 404
    assert client.get("/exports/999").status_code == 404
    with labelled.session_factory() as db, db.begin():
        db.add(ExportJob(requested_by="dr.rad", status=ExportStatus.QUEUED, parameters={}))
    job_id = client.get("/exports/jobs").get_json()["jobs"][0]["id"]
    assert client.get(f"/exports/{job_id}/download").status_code == 404


def test_an_export_whose_worker_stopped_is_failed_as_interrupted(client, labelled):
    """A running export reports progress (its heartbeat); one silent for
    analysis_timeout_seconds lost its worker: the sweeper fails it and the page says so,
    while one that beats on keeps running."""
    now = utcnow()
    silent_since = now - timedelta(seconds=labelled.settings.analysis_timeout_seconds + 1)
    with labelled.session_factory() as db, db.begin():
        for updated in (silent_since, now):
            db.add(
                ExportJob(
                    requested_by="dr.rad",
                    status=ExportStatus.RUNNING,
                    parameters={},
                    updated_at=updated,
                )
            )
    assert due_work(labelled, now).exports == []
    listed = client.get("/exports/jobs").get_json()["jobs"]
    assert [(j["status"], (j["error"] or "")[:11]) for j in listed] == [
        ("running", ""),
        ("failed", "interrupted"),
    ]
    assert "the worker stopped while this export ran" in listed[1]["error"]


def test_a_queued_export_whose_message_was_lost_is_handed_out_again(labelled):
    now = utcnow()
    lost_at = now - timedelta(seconds=labelled.settings.requeue_after_seconds + 1)
    with labelled.session_factory() as db, db.begin():
        job = ExportJob(
            requested_by="dr.rad", status=ExportStatus.QUEUED, parameters={}, updated_at=lost_at
        )
        db.add(job)
        db.flush()
        job_id = job.id
    assert due_work(labelled, now).exports == [job_id]
    assert due_work(labelled, now).exports == []  # handed out: not again at once


def test_export_started_while_the_queue_is_down_waits_queued_and_says_so(
    make_settings, phantom_studies
):
    """The broker is unreachable: the job is still recorded (nothing lost), the page is told
    it starts when the queue is back, and the sweeper hands it out then."""
    from webui import create_app

    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(web_secure_cookies=False, broker_url=down)
    node = build_node(settings, migrate=True)
    try:
        add_accounts(node)
        ingest_and_label(node, {"covid": phantom_studies["covid"]}, {"covid": "COVID"})
        app = create_app(settings, {"TESTING": True}, node=node)
        client = sign_in(app.test_client(), "radiologist")
        answer = post_json(client, "/exports", {"keywords": ["COVID"]})
        assert answer.status_code == 202, answer.text
        body = answer.get_json()
        assert body["status"] == "queued"
        assert body["notice"] == "The job queue is unreachable: the export starts when it is back."
        later = utcnow() + timedelta(seconds=settings.requeue_after_seconds + 1)
        assert due_work(node, later).exports == [body["id"]]
    finally:
        node.close()


def test_post_without_csrf_token_is_refused(client, labelled):
    for url in ("/exports/preview", "/exports"):
        answer = client.post(url, json={})
        assert answer.status_code == 400
        assert "CSRF" in answer.get_json()["error"]
    with labelled.session_factory() as db:
        assert db.scalars(select(ExportJob)).all() == []


@pytest.mark.parametrize("url", ["/exports", "/exports/jobs", "/exports/1/download"])
def test_anonymous_is_sent_to_sign_in(anonymous, url):
    answer = anonymous.get(url)
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/login")


def finished_job(node, requested_by: str, finished_days_ago: float) -> tuple[int, Path]:
    """A done export of ``requested_by`` with a bundle on disk, finished that long ago."""
    finished = utcnow() - timedelta(days=finished_days_ago)
    with node.session_factory() as db, db.begin():
        job = ExportJob(requested_by=requested_by, status=ExportStatus.DONE, parameters={}, total=1)
        db.add(job)
        db.flush()
        folder = exports_root(node.settings) / f"{job.id}-{finished:%Y%m%dT%H%M%SZ}"
        (folder / "Normal").mkdir(parents=True)
        (folder / "manifest.csv").write_text("path\n")
        job.folder, job.finished_at = str(folder), finished
        return job.id, folder


def test_an_export_is_seen_only_by_who_started_it_and_by_admins(client, admin_client, labelled):
    job_id, _folder = finished_job(labelled, "dr.other", 0)
    assert client.get("/exports/jobs").get_json()["jobs"] == []
    for url in (f"/exports/{job_id}", f"/exports/{job_id}/download"):
        answer = client.get(url)
        assert answer.status_code == 404, url
        assert f"Export {job_id} doesn&#39;t exist." in answer.text
    assert f"/exports/{job_id}/download" not in client.get("/exports").text
    with labelled.session_factory() as db:
        denied = db.scalars(select(AuditEvent).where(AuditEvent.action == "export_denied")).all()
    assert [(e.username, e.client_address, e.detail) for e in denied] == [
        ("dr.rad", "127.0.0.1", {"job": job_id, "owner": "dr.other"})
    ] * 2
    listed = admin_client.get("/exports/jobs").get_json()["jobs"]
    assert [(j["id"], j["requested_by"]) for j in listed] == [(job_id, "dr.other")]
    download = admin_client.get(f"/exports/{job_id}/download")
    assert download.status_code == 200 and download.mimetype == "application/zip"


def test_bundles_past_retention_are_deleted_by_the_sweeper_and_shown_expired(client, labelled):
    retention = labelled.settings.export_retention_days
    old_id, old_folder = finished_job(labelled, "dr.rad", retention + 1)
    new_id, new_folder = finished_job(labelled, "dr.rad", retention - 1)
    due_work(labelled)  # one pass of the sweeper
    assert not old_folder.exists() and new_folder.is_dir()
    jobs = {j["id"]: j for j in client.get("/exports/jobs").get_json()["jobs"]}
    assert (jobs[old_id]["status"], jobs[old_id]["download"]) == ("expired", None)
    assert (jobs[new_id]["status"], jobs[new_id]["download"]) == (
        "done",
        f"/exports/{new_id}/download",
    )
    gone = client.get(f"/exports/{old_id}/download")
    assert gone.status_code == 404
    assert f"Export {old_id} has expired: its files were deleted {retention:g} days" in gone.text
    page = client.get("/exports").text
    assert re.search(rf'<tr data-status="expired">\s*<td>{old_id}</td>', page)
