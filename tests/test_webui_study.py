"""Study review and keyword labels in the web UI: real phantom series on a real node."""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from node import phantom
from node.analysis import imaging
from node.records.db import (
    Analysis,
    AnalysisStatus,
    AuditEvent,
    Instance,
    KeywordClass,
    Label,
    Report,
    ReportStatus,
    SlicePrediction,
    Study,
    Verdict,
    utcnow,
)
from node.settings import Peer
from node.workflow.sweeper import due_work
from tests.webui import csrf_token

SLICES = 12
EVALUATED = range(2, 10)  # head-first positions of the slices the "model" evaluated
PATIENT = "QZWXVO^JOHANNA"
NASTY = 'O\'Brien "quoted" <script>alert(1)</script>'


@pytest.fixture(scope="module")
def series_files(tmp_path_factory) -> SimpleNamespace:
    """A 12-slice study series and a 4-slice second series of the same study (64×64)."""
    root = tmp_path_factory.mktemp("study-phantoms")
    spec = phantom.PhantomSpec(
        finding="covid", slices=SLICES, rows=64, columns=64, seed=5, patient_name=PATIENT
    )
    main = phantom.write_series(spec, root / "main")
    study_uid = str(dcmread(main[0], stop_before_pixels=True).StudyInstanceUID)
    extra = dataclasses.replace(
        spec, slices=4, seed=6, study_instance_uid=study_uid, series_description="Scout"
    )
    head_first = sorted(
        main, key=lambda p: -float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )
    return SimpleNamespace(
        main=main, extra=phantom.write_series(extra, root / "extra"), head_first=head_first
    )


def ingest(web_node, series_files) -> int:
    """Ingest both series (the main one feet first, so order must come from geometry)."""
    for path in [*reversed(series_files.main), *series_files.extra]:
        web_node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    with web_node.session_factory() as db:
        return db.scalars(select(Study.id)).one()


def slice_probabilities(position: int) -> dict[str, float]:
    covid = round(0.1 + 0.1 * position, 3)
    return {"Covid_19": covid, "Normal": round(0.9 - covid, 3), "Pneumonia": 0.1}


@pytest.fixture
def reviewed(web_node, series_files) -> SimpleNamespace:
    """The study ingested, with a done (demo) analysis, its slice predictions and a failed SR."""
    study_id = ingest(web_node, series_files)
    with web_node.session_factory() as db:
        analysis = Analysis(
            study_id=study_id,
            model_name="effnet-chest",
            model_version="2.1.0",
            model_demo=True,
            status=AnalysisStatus.DONE,
            finished_at=utcnow(),
            rule="top-mean",
            predicted_class="Covid_19",
            probabilities={"Covid_19": 0.81, "Normal": 0.07, "Pneumonia": 0.12},
            slices_evaluated=len(EVALUATED),
            timings={},
            instances_skipped={},
        )
        db.add(analysis)
        db.flush()
        for position, index in enumerate(EVALUATED):
            uid = str(
                dcmread(series_files.head_first[index], stop_before_pixels=True).SOPInstanceUID
            )
            db.add(
                SlicePrediction(
                    analysis_id=analysis.id,
                    position=position,
                    sop_instance_uid=uid,
                    frame=None,
                    probabilities=slice_probabilities(position),
                )
            )
        report = Report(
            analysis_id=analysis.id,
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            destination="pacs",
            method="dimse",
            status=ReportStatus.FAILED,
            retries=3,
            last_error="association rejected by PACS",
        )
        db.add(report)
        db.commit()
        return SimpleNamespace(study_id=study_id, analysis_id=analysis.id, report_id=report.id)


def page_text(answer) -> str:
    """What a user reads: the page without tags, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", answer.text)).split())


def viewer_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page)
    assert match, "page has no viewer data"
    return json.loads(match.group(1))


def audit_events(web_node, action: str) -> list[AuditEvent]:
    with web_node.session_factory() as db:
        return list(db.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def post(client, url: str, data: dict, page_url: str):
    """A form post with the page's CSRF token."""
    token = csrf_token(client.get(page_url).text)
    return client.post(url, data={"csrf_token": token, **data})


# --------------------------------------------------------------------------- the page


def test_study_page_shows_header_result_model_and_sr(client, reviewed):
    answer = client.get(f"/studies/{reviewed.study_id}")
    assert answer.status_code == 200
    assert "private" in answer.headers["Cache-Control"]
    text = page_text(answer)
    for expected in (
        "QZWXVO JOHANNA",
        "2026-01-10",
        "Tórax Simple",
        "Covid_19",
        "81.0 %",
        "effnet-chest:2.1.0",
        "DEMO — not for clinical use",
        "association rejected by PACS",
        "Re-send report",
    ):
        assert expected in text, expected
    assert re.search(r"<dt>Instances</dt><dd>16</dd>", answer.text)
    assert re.search(r"<dt>Series</dt><dd>2</dd>", answer.text)
    assert re.search(r"<th>Status</th><td><span[^>]*>failed</span>", answer.text)
    assert re.search(r"<th>Retries</th><td>3</td>", answer.text)


def test_viewer_shows_the_evaluated_series_head_first_with_its_probability_strip(client, reviewed):
    data = viewer_data(client.get(f"/studies/{reviewed.study_id}").text)
    assert data["count"] == SLICES  # the 12-slice series, not the 4-slice one
    assert data["strip_classes"] == ["Covid_19", "Pneumonia"]
    expected = [None] * SLICES
    for position, index in enumerate(EVALUATED):
        probabilities = slice_probabilities(position)
        expected[index] = [probabilities["Covid_19"], probabilities["Pneumonia"]]
    assert data["strip"] == expected


def test_page_without_result_offers_no_verdict_and_still_shows_slices(
    client, web_node, series_files
):
    study_id = ingest(web_node, series_files)
    answer = client.get(f"/studies/{study_id}")
    assert answer.status_code == 200
    assert "No result yet" in answer.text
    assert "Re-send report" not in answer.text and 'value="agree"' not in answer.text
    assert viewer_data(answer.text)["count"] == SLICES  # the largest eligible series
    refused = post(
        client, f"/studies/{study_id}/verdict", {"verdict": "agree"}, f"/studies/{study_id}"
    )
    assert refused.status_code == 400
    assert f"Study {study_id} has no result to agree with or correct." in page_text(refused)


@pytest.mark.parametrize("url", ["/studies/999", "/studies/999/slices/0.png"])
def test_unknown_study_is_a_404_page(client, url):
    answer = client.get(url)
    assert answer.status_code == 404
    assert "Study 999 doesn't exist." in page_text(answer)


@pytest.mark.parametrize(
    "url", ["/studies/abc", "/studies/1.5", "/studies/-1", "/studies/1/slices/-1.png"]
)
def test_non_integer_ids_do_not_route(client, url):
    assert client.get(url).status_code == 404


@pytest.mark.parametrize("url", ["/studies/{id}", "/studies/{id}/slices/0.png"])
def test_anonymous_is_sent_to_sign_in(anonymous, reviewed, url):
    answer = anonymous.get(url.format(id=reviewed.study_id))
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/login")


# --------------------------------------------------------------------------- slices


def png_pixels(answer) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    assert answer.mimetype == "image/png"
    image = Image.open(io.BytesIO(answer.data))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def expected_pixels(path: Path, window: imaging.Window) -> np.ndarray:
    return imaging.windowed_slices(dcmread(path), window)[0]


@pytest.mark.parametrize(
    ("query", "window"),
    [
        ("", imaging.LUNG),
        ("?window=lung", imaging.LUNG),
        ("?window=mediastinum", imaging.MEDIASTINUM),
        ("?window=custom&center=50.5&width=350", imaging.Window(50.5, 350)),
    ],
)
def test_slice_png_is_node_imaging_windowing_head_first(
    client, reviewed, series_files, query, window
):
    for n, path in enumerate(series_files.head_first):
        answer = client.get(f"/studies/{reviewed.study_id}/slices/{n}.png{query}")
        assert "private" in answer.headers["Cache-Control"]
        np.testing.assert_array_equal(png_pixels(answer), expected_pixels(path, window))


def test_reading_a_study_is_audited_once_per_page_and_once_an_hour_for_slices(
    client, web_node, reviewed
):
    client.environ_base["REMOTE_ADDR"] = "192.0.2.33"
    assert client.get(f"/studies/{reviewed.study_id}").status_code == 200
    for n in (0, 1, 2, 1):  # scrolling
        assert client.get(f"/studies/{reviewed.study_id}/slices/{n}.png").status_code == 200
    assert client.get(f"/studies/{reviewed.study_id}").status_code == 200
    with web_node.session_factory() as db:
        events = db.scalars(
            select(AuditEvent)
            .where(AuditEvent.action.in_(("study_view", "slice_view")))
            .order_by(AuditEvent.id)
        ).all()
    assert [(e.username, e.action, e.study_id, e.client_address) for e in events] == [
        ("dr.rad", "study_view", reviewed.study_id, "192.0.2.33"),
        ("dr.rad", "slice_view", reviewed.study_id, "192.0.2.33"),
        ("dr.rad", "study_view", reviewed.study_id, "192.0.2.33"),
    ]


def test_presets_and_custom_window_differ(client, reviewed):
    base = f"/studies/{reviewed.study_id}/slices/6.png"
    images = [
        png_pixels(client.get(base + query)).tobytes()
        for query in ("?window=lung", "?window=mediastinum", "?window=custom&center=-300&width=800")
    ]
    assert len(set(images)) == 3


def test_slice_is_cached_privately_and_revalidated(client, reviewed):
    page = client.get(f"/studies/{reviewed.study_id}").text
    version = viewer_data(page)["version"]
    url = f"/studies/{reviewed.study_id}/slices/3.png?window=lung"
    current = client.get(f"{url}&v={version}")
    assert current.headers["Cache-Control"].startswith("private, max-age=")
    assert client.get(url).headers["Cache-Control"] == "private, no-cache"
    again = client.get(url, headers={"If-None-Match": current.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("window=bone", "window must be one of lung, mediastinum, custom, got 'bone'"),
        ("window=custom&width=400", "a custom window needs center (HU)"),
        ("window=custom&center=40", "a custom window needs width (HU)"),
        ("window=custom&center=abc&width=400", "center must be a number of HU, got 'abc'"),
        ("window=custom&center=nan&width=400", "center must be a finite number of HU, got 'nan'"),
        ("window=custom&center=1e9&width=400", "center must be between -32768 and 32768 HU"),
        ("window=custom&center=40&width=0", "width must be greater than 0 HU, got '0'"),
        ("window=custom&center=40&width=-400", "width must be greater than 0 HU, got '-400'"),
        ("window=custom&center=40&width=inf", "width must be a finite number of HU, got 'inf'"),
        ("window=custom&center=40&width=70000", "width must be at most 65536 HU, got '70000'"),
    ],
)
def test_bad_window_is_a_400_with_the_reason(client, reviewed, query, message):
    answer = client.get(f"/studies/{reviewed.study_id}/slices/0.png?{query}")
    assert answer.status_code == 400
    assert message in page_text(answer)


@pytest.mark.parametrize("n", [SLICES, SLICES + 100, 10**12])
def test_slice_out_of_range_is_a_404(client, reviewed, n):
    answer = client.get(f"/studies/{reviewed.study_id}/slices/{n}.png")
    assert answer.status_code == 404
    assert f"has no slice {n} ({SLICES} slices to show)" in page_text(answer)


def test_unreadable_store_file_is_named_not_crashed(client, web_node, reviewed):
    with web_node.session_factory() as db:
        key = db.scalars(select(Instance.store_key).order_by(Instance.id)).first()
    web_node.store.remove(key)
    page = page_text(client.get(f"/studies/{reviewed.study_id}"))
    assert "No slices to show: cannot read the stored instances" in page
    answer = client.get(f"/studies/{reviewed.study_id}/slices/0.png")
    assert answer.status_code == 404
    assert "has no slices to show: cannot read the stored instances" in page_text(answer)


# --------------------------------------------------------------------------- verdicts


def verdicts(web_node) -> list[Verdict]:
    with web_node.session_factory() as db:
        return list(db.scalars(select(Verdict).order_by(Verdict.id)))


def test_agree_is_stored_audited_and_shown(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    answer = post(client, f"{page}/verdict", {"verdict": "agree", "comment": ""}, page)
    assert answer.status_code == 303
    assert answer.headers["Location"].endswith(f"{page}#result")
    (row,) = verdicts(web_node)
    assert (row.agrees, row.corrected_class, row.username, row.analysis_id) == (
        True,
        None,
        "dr.rad",
        reviewed.analysis_id,
    )
    (event,) = audit_events(web_node, "verdict")
    assert (event.username, event.study_id) == ("dr.rad", reviewed.study_id)
    assert event.detail["agrees"] is True and event.detail["verdict_id"] == row.id
    shown = page_text(client.get(page))
    assert "Agreement recorded." in shown and "Agreed by dr.rad" in shown


def test_correction_with_comment_is_stored_audited_and_escaped(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    answer = post(client, f"{page}/verdict", {"verdict": "Pneumonia", "comment": NASTY}, page)
    assert answer.status_code == 303
    (row,) = verdicts(web_node)
    assert (row.agrees, row.corrected_class, row.comment) == (False, "Pneumonia", NASTY)
    (event,) = audit_events(web_node, "verdict")
    assert event.detail["corrected_class"] == "Pneumonia"
    shown = client.get(page).text
    assert "Corrected to" in shown and "<script>alert(1)" not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown


def test_verdict_as_json(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    token = csrf_token(client.get(page).text)
    answer = client.post(
        f"{page}/verdict", json={"verdict": "Normal"}, headers={"X-CSRFToken": token}
    )
    assert answer.status_code == 200
    assert answer.json == {"ok": True, "message": "Correction to Normal recorded."}
    assert [v.corrected_class for v in verdicts(web_node)] == ["Normal"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"verdict": "Covid"},
            "verdict must be agree or one of Covid_19, Normal, Pneumonia, got 'Covid'",
        ),
        ({}, "verdict must be agree or one of Covid_19, Normal, Pneumonia, got None"),
        ({"verdict": "Covid_19"}, "Covid_19 is the predicted class: use Agree."),
        ({"verdict": "agree", "comment": "x" * 1025}, "comment must be text of at most 1024"),
    ],
)
def test_bad_verdict_is_a_400_and_stores_nothing(client, web_node, reviewed, fields, message):
    page = f"/studies/{reviewed.study_id}"
    answer = post(client, f"{page}/verdict", fields, page)
    assert answer.status_code == 400
    assert message in page_text(answer)
    assert verdicts(web_node) == [] and audit_events(web_node, "verdict") == []


# --------------------------------------------------------------------------- labels


def labels(web_node) -> list[tuple[str, str]]:
    with web_node.session_factory() as db:
        return [(x.keyword, x.created_by) for x in db.scalars(select(Label).order_by(Label.id))]


def test_one_click_and_typed_labels_are_added_and_audited(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    shown = client.get(page).text
    for keyword in ("COVID", "Normal", "Pneumonia", "Exclude"):
        assert f'name="keyword" value="{keyword}"' in shown
    answer = post(client, f"{page}/labels", {"keyword": "covid"}, page)  # configured spelling
    assert answer.status_code == 303 and answer.headers["Location"].endswith("#labels")
    post(client, f"{page}/labels", {"keyword": "  ground glass  "}, page)
    assert labels(web_node) == [("COVID", "dr.rad"), ("ground glass", "dr.rad")]
    assert [e.detail["keyword"] for e in audit_events(web_node, "label_add")] == [
        "COVID",
        "ground glass",
    ]
    again = post(client, f"{page}/labels", {"keyword": "COVID"}, page)
    assert again.status_code == 303
    assert "“COVID” is already on this study." in page_text(client.get(page))
    assert len(labels(web_node)) == 2 and len(audit_events(web_node, "label_add")) == 2


def test_one_click_buttons_follow_the_admins_mapping(client, web_node, reviewed):
    with web_node.session_factory() as db:
        db.add(KeywordClass(keyword="GGO", class_name="Covid_19", updated_by="ad.min"))
        db.commit()
    page = f"/studies/{reviewed.study_id}"
    shown = client.get(page).text
    assert 'name="keyword" value="GGO"' in shown
    assert 'name="keyword" value="Exclude"' not in shown
    post(client, f"{page}/labels", {"keyword": "ggo"}, page)
    assert labels(web_node) == [("GGO", "dr.rad")]  # stored in the mapping's spelling


def test_keyword_with_quotes_and_markup_is_stored_and_escaped(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    post(client, f"{page}/labels", {"keyword": NASTY}, page)
    assert labels(web_node) == [(NASTY, "dr.rad")]
    shown = client.get(page).text
    assert "<script>alert(1)" not in shown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown  # the tag and the flash message
    removed = post(client, f"{page}/labels/remove", {"keyword": NASTY}, page)
    assert removed.status_code == 303
    assert labels(web_node) == []
    (event,) = audit_events(web_node, "label_remove")
    assert (event.detail["keyword"], event.username) == (NASTY, "dr.rad")


def test_remove_button_takes_the_label_off(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    post(client, f"{page}/labels", {"keyword": "Exclude"}, page)
    shown = client.get(page).text
    form = re.search(r'<form method="post" action="([^"]+/labels/remove)"(.*?)</form>', shown, re.S)
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form.group(2)))
    assert client.post(form.group(1), data=fields).status_code == 303
    assert labels(web_node) == []
    assert "Label “Exclude” removed." in page_text(client.get(page))
    missing = post(client, f"{page}/labels/remove", {"keyword": "Exclude"}, page)
    assert missing.status_code == 303
    assert "“Exclude” was not on this study." in page_text(client.get(page))
    assert len(audit_events(web_node, "label_remove")) == 1


@pytest.mark.parametrize(
    ("keyword", "message"),
    [
        ("", "Label not added: keyword must be 1-64 characters, got ''"),
        ("   ", "Label not added: keyword must be 1-64 characters"),
        ("x" * 65, "Label not added: keyword must be 1-64 characters"),
        ("two\nlines", "Label not added: keyword must not contain control characters"),
    ],
)
def test_bad_keyword_message_is_shown_and_nothing_stored(
    client, web_node, reviewed, keyword, message
):
    page = f"/studies/{reviewed.study_id}"
    answer = post(client, f"{page}/labels", {"keyword": keyword}, page)
    assert answer.status_code == 303
    assert message in page_text(client.get(page))
    assert labels(web_node) == [] and audit_events(web_node, "label_add") == []


def test_labels_as_json(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    token = csrf_token(client.get(page).text)
    headers = {"X-CSRFToken": token}
    added = client.post(f"{page}/labels", json={"keyword": "Pneumonia"}, headers=headers)
    assert added.status_code == 200 and added.json["ok"] is True
    bad = client.post(f"{page}/labels", json={"keyword": 7}, headers=headers)
    assert bad.status_code == 400
    assert bad.json == {"ok": False, "message": "Label not added: keyword must be text, got 7"}
    removed = client.post(f"{page}/labels/remove", json={"keyword": "pneumonia"}, headers=headers)
    assert removed.status_code == 200 and labels(web_node) == []


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("verdict", {"verdict": "agree"}),
        ("labels", {"keyword": "COVID"}),
        ("labels/remove", {"keyword": "COVID"}),
        ("report/resend", {}),
    ],
)
def test_posts_without_csrf_token_are_refused(client, web_node, reviewed, path, fields):
    answer = client.post(f"/studies/{reviewed.study_id}/{path}", data=fields)
    assert answer.status_code == 400
    assert "CSRF token is missing" in page_text(answer)
    assert labels(web_node) == [] and verdicts(web_node) == []
    assert audit_events(web_node, "resend_report") == []


# --------------------------------------------------------------------------- re-send


def test_resend_makes_the_report_due_for_the_dispatcher_and_is_audited(client, web_node, reviewed):
    page = f"/studies/{reviewed.study_id}"
    before = utcnow()
    answer = post(client, f"{page}/report/resend", {}, page)
    assert answer.status_code == 303 and answer.headers["Location"].endswith("#sr")
    with web_node.session_factory() as db:
        report = db.get(Report, reviewed.report_id)
        assert (report.status, report.retries, report.last_error, report.sent_at) == (
            ReportStatus.PENDING,
            0,
            None,
            None,
        )
        assert report.next_retry_at is None and before <= report.due_at <= utcnow()
        assert db.scalars(select(Report)).all() == [report]  # the same SR, sent again
    assert due_work(web_node).reports == [reviewed.report_id]  # the next sweep sends it
    assert due_work(web_node).reports == []  # handed out once
    (event,) = audit_events(web_node, "resend_report")
    assert event.detail["previous_status"] == "failed"
    assert event.detail["report_id"] == reviewed.report_id
    assert "will be sent to pacs again" in page_text(client.get(page))


def test_resend_without_report_or_destination_is_refused(client, web_node, reviewed):
    with web_node.session_factory() as db:
        db.delete(db.get(Report, reviewed.report_id))
        db.commit()
    page = f"/studies/{reviewed.study_id}"
    answer = post(client, f"{page}/report/resend", {}, page)
    assert answer.status_code == 400
    assert "No report destination is configured" in page_text(answer)
    assert audit_events(web_node, "resend_report") == []


def test_send_creates_a_report_when_a_destination_is_configured(web_node, reviewed):
    from tests.webui import sign_in
    from webui import create_app

    peer = Peer(name="pacs", ae_title="PACS", host="127.0.0.1", port=11113)
    settings = web_node.settings.model_copy(update={"peers": [peer]})
    with web_node.session_factory() as db:
        db.delete(db.get(Report, reviewed.report_id))
        db.commit()
    app = create_app(
        settings, {"TESTING": True}, node=dataclasses.replace(web_node, settings=settings)
    )
    client = sign_in(app.test_client(), "radiologist")
    page = f"/studies/{reviewed.study_id}"
    assert "Send report" in client.get(page).text
    assert post(client, f"{page}/report/resend", {}, page).status_code == 303
    with web_node.session_factory() as db:
        (report,) = db.scalars(select(Report)).all()
        assert (report.analysis_id, report.destination, report.status) == (
            reviewed.analysis_id,
            "pacs",
            ReportStatus.PENDING,
        )
        assert report.next_retry_at is None and report.due_at <= utcnow()
    assert due_work(web_node).reports == [report.id]
