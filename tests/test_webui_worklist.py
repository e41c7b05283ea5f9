"""The worklist: what a radiologist sees, filters, sort, pages, live refresh, bulk tagging.

Every test runs on SQLite and on PostgreSQL: the page is one hand-built statement. Tests
that only read share one node per database (``browsing``); the others get a fresh one.
"""

from __future__ import annotations

import html
import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import pytest
from sqlalchemy import event, select

from node.records import users
from node.records.db import Analysis, AuditEvent, KeywordClass, Label, Series, Study
from node.runtime import build_node
from node.settings import Settings
from tests.webui import PASSWORDS, USERNAMES, csrf_token, sign_in

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
ORDER = ("covid", "normal", "pneumonia", "reanalysed", "failed", "receiving")  # insertion order
NEWEST = ["receiving", "failed", "covid", "normal", "pneumonia", "reanalysed"]


@pytest.fixture
def make_settings(make_settings, database_url):
    """The shared settings factory, on this test's database (SQLite or PostgreSQL)."""

    def build(**overrides):
        overrides.setdefault("database_url", database_url)
        return make_settings(**overrides)

    return build


def add_study(db, index: int, *, status="analyzed", received=NOW, **fields) -> Study:
    """A study with one 60-instance series, as ingest leaves it."""
    study = Study(
        study_instance_uid=f"2.25.{1000 + index}",
        status=status,
        first_received_at=received,
        last_received_at=received,
        status_changed_at=received,
        series_count=1,
        instance_count=60,
        modalities="CT",
        **fields,
    )
    db.add(study)
    db.flush()
    db.add(Series(study_id=study.id, series_instance_uid=f"2.25.{5000 + index}", instance_count=60))
    db.flush()
    return study


def add_analysis(db, study: Study, predicted: str | None, probability: float | None, **fields):
    probabilities = None
    if predicted:
        rest = (1 - probability) / 2
        probabilities = {c: rest for c in ("Covid_19", "Normal", "Pneumonia")}
        probabilities[predicted] = probability
    fields.setdefault("status", "done")
    db.add(
        Analysis(
            study_id=study.id,
            model_name="effnet",
            model_version="1.2",
            predicted_class=predicted,
            probabilities=probabilities,
            **fields,
        )
    )
    db.flush()


def add_label(db, study: Study, keyword: str, series: bool = False) -> None:
    series_id = study.series[0].id if series else None
    db.add(Label(study_id=study.id, series_id=series_id, keyword=keyword, created_by="dr.old"))


def fill_ward(node) -> dict[str, int]:
    """Six studies covering each filter and sort; name → study id."""
    with node.session_factory() as db, db.begin():
        covid = add_study(
            db, 1, received=NOW - timedelta(hours=1), study_date="20240509",
            study_description="CT TORAX SIMPLE", patient_name="DOE^JOHN", patient_id="PID-1",
        )  # fmt: skip
        add_analysis(db, covid, "Covid_19", 0.97)
        add_label(db, covid, "COVID")
        add_label(db, covid, "teaching")
        normal = add_study(
            db, 2, status="reported", received=NOW - timedelta(hours=2), study_date="20240301",
            study_description="CHEST CT 500 MA", patient_name="ROE^JANE", patient_id="PID-2",
        )  # fmt: skip
        add_analysis(db, normal, "Normal", 0.80)
        add_label(db, normal, "Normal")
        pneumonia = add_study(
            db, 3, received=NOW - timedelta(days=1), study_date="20231224",
            study_description="Tórax 50% dose", patient_name="SMITH^ANNA", patient_id="PID-3",
        )  # fmt: skip
        add_analysis(db, pneumonia, "Pneumonia", 0.65, model_demo=True)
        reanalysed = add_study(
            db, 4, status="analyzing", received=NOW - timedelta(days=3), patient_id="PID-4"
        )
        add_analysis(db, reanalysed, "Covid_19", 0.90)
        add_analysis(db, reanalysed, "Normal", 0.55)
        add_analysis(db, reanalysed, None, None, status="running")
        failed = add_study(
            db, 5, status="failed", received=NOW - timedelta(minutes=30), study_date="20240510",
            status_reason="no CT images", study_description="CT TORAX SIMPLE",
            patient_name="DOE^JANE", patient_id="PID-5",
        )  # fmt: skip
        add_label(db, failed, "covid", series=True)
        receiving = add_study(
            db, 6, status="receiving", received=NOW, study_date="20240510",
            study_description="CT TORAX SIMPLE", patient_name="X^Y", patient_id="PID-6",
        )  # fmt: skip
        studies = (covid, normal, pneumonia, reanalysed, failed, receiving)
        return {name: study.id for name, study in zip(ORDER, studies, strict=True)}


@pytest.fixture
def ward(web_node) -> dict[str, int]:
    """The six studies on this test's own node."""
    return fill_ward(web_node)


class Browsing(NamedTuple):
    client: object
    ward: dict[str, int]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def browsing(request, tmp_path_factory):
    """A signed-in radiologist on a node holding the six studies, for tests that only read."""
    folder = tmp_path_factory.mktemp("worklist")
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'ainode.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database("ainode_worklist_browsing")
    settings = Settings(data_dir=folder / "data", database_url=url, web_secure_cookies=False)
    node = build_node(settings, migrate=True)
    with node.session_factory() as db, db.begin():
        users.add_user(db, USERNAMES["radiologist"], PASSWORDS["radiologist"], "radiologist")
    ward = fill_ward(node)
    from webui import create_app

    app = create_app(settings, {"TESTING": True}, node=node)
    yield Browsing(sign_in(app.test_client(), "radiologist"), ward)
    node.close()
    if request.param != "sqlite":
        request.getfixturevalue("postgres").drop_database("ainode_worklist_browsing")


def names(ward: dict[str, int], ids: list[int]) -> list[str]:
    by_id = {v: k for k, v in ward.items()}
    return [by_id[i] for i in ids]


def listed(client, ward, query: str = "") -> list[str]:
    """Study names in the order the JSON endpoint gives them."""
    answer = client.get(f"/worklist.json?{query}")
    assert answer.status_code == 200, answer.text
    return names(ward, [row["id"] for row in answer.json["rows"]])


def shown(client, ward, query: str = "") -> list[str]:
    """Study names in the order the page shows them."""
    answer = client.get(f"/?{query}")
    assert answer.status_code == 200, answer.text
    return names(ward, [int(i) for i in re.findall(r'<tr data-study-id="(\d+)"', answer.text)])


# --------------------------------------------------------------------------- what is shown


@pytest.mark.parametrize("path", ["/", "/worklist.json?status=failed"])
def test_worklist_asks_to_sign_in_first(anonymous, path):
    answer = anonymous.get(path)
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/login")


def test_anonymous_tagging_is_sent_to_sign_in(anonymous, ward, web_node):
    token = csrf_token(anonymous.get("/login").text)
    data = {"csrf_token": token, "study_id": [ward["covid"]], "keyword": "x", "action": "add"}
    answer = anonymous.post("/worklist/tag", data=data)
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/login")
    with web_node.session_factory() as db:
        assert "x" not in db.scalars(select(Label.keyword)).all()


def test_rows_show_patient_prediction_model_labels_and_dates(browsing):
    client, ward = browsing
    text = client.get("/").text
    row = text[text.index(f'<tr data-study-id="{ward["covid"]}"') :]
    row = row[: row.index("</tr>")]
    for expected in (
        f'href="/studies/{ward["covid"]}"',
        "DOE, JOHN",
        "PID-1",
        "CT TORAX SIMPLE",
        "2024-05-09",
        "2024-05-10 11:00",
        '<span class="status status-analyzed"',
        "Covid_19",
        "97.0%",
        "effnet:1.2",
        '<span class="tag tag-Covid_19" title="training: Covid_19">COVID</span>',
        '<span class="tag">teaching</span>',
        ">60<",
    ):
        assert expected in row, expected
    assert "DEMO" not in row
    assert "6 studies" in text


def test_demo_model_failure_reason_and_latest_done_analysis_are_shown(browsing):
    client, ward = browsing
    text = client.get("/").text
    rows = dict(re.findall(r'<tr data-study-id="(\d+)">(.*?)</tr>', text, re.S))
    assert ">DEMO</span>" in rows[str(ward["pneumonia"])]
    assert 'title="no CT images">failed' in rows[str(ward["failed"])]
    reanalysed = rows[str(ward["reanalysed"])]
    assert "Normal" in reanalysed and "55.0%" in reanalysed and "Covid_19" not in reanalysed
    assert "training: excluded" not in text  # no keyword maps to exclusion here


def test_page_and_json_list_the_same_studies_newest_first(browsing):
    client, ward = browsing
    assert shown(client, ward) == listed(client, ward) == NEWEST


def test_json_rows_carry_status_class_probability_labels_but_no_patient(client, ward, web_node):
    rows = {row["id"]: row for row in client.get("/worklist.json").json["rows"]}
    covid = rows[ward["covid"]]
    assert covid == {
        "id": ward["covid"],
        "uid": "2.25.1001",
        "status": "analyzed",
        "status_reason": None,
        "class": "Covid_19",
        "probability": pytest.approx(0.97),
        "model": "effnet:1.2",
        "labels": ["COVID", "teaching"],
        "outside_experience": False,  # the refresh keeps the row's mark (issue 16)
    }
    assert rows[ward["pneumonia"]]["model"] == "effnet:1.2 DEMO"
    assert rows[ward["failed"]]["labels"] == ["covid"]  # series labels count too
    with web_node.session_factory() as db, db.begin():
        db.get(Study, ward["receiving"]).status = "stable"
    refreshed = {row["id"]: row for row in client.get("/worklist.json").json["rows"]}
    assert refreshed[ward["receiving"]]["status"] == "stable"


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=failed", ["failed"]),
        ("status=analyzed&class=Pneumonia", ["pneumonia"]),
        ("class=Covid_19", ["covid"]),  # reanalysed's latest done analysis says Normal
        ("class=Normal", ["normal", "reanalysed"]),
        ("label=covid", ["failed", "covid"]),
        ("label=TEACHING", ["covid"]),
        ("label=nobody-uses-this", []),
        ("dates=received&from=2024-05-09&to=2024-05-09", ["pneumonia"]),
        ("from=2024-05-10", ["receiving", "failed", "covid", "normal"]),
        ("dates=study_date&from=2024-01-01&to=2024-05-09", ["covid", "normal"]),
        ("dates=study_date&to=2023-12-31", ["pneumonia"]),
        ("description=torax", ["receiving", "failed", "covid"]),
        ("description=50%25", ["pneumonia"]),  # a literal %, not a wildcard
        ("description=ct_", []),  # a literal _, not a wildcard
        ("patient=doe", ["failed", "covid"]),
        ("patient=john+doe", ["covid"]),
        ("patient=pid-2", ["normal"]),
        # empty fields, as a submitted filter form sends them: no filter
        ("status=&class=&label=&dates=&from=&to=&description=&patient=&page=&per_page=", NEWEST),
    ],
)
def test_filters(browsing, query, expected):
    client, ward = browsing
    assert listed(client, ward, query) == expected
    assert shown(client, ward, query) == expected


def test_filter_form_keeps_what_was_asked(browsing):
    client, ward = browsing
    text = client.get("/?status=failed&label=covid&dates=study_date&from=2024-01-01").text
    assert '<option value="failed" selected>' in text
    assert 'name="label" value="covid"' in text
    assert '<option value="study_date" selected>' in text
    assert 'name="from" value="2024-01-01"' in text
    assert '<option value="COVID">' in text  # known keywords are offered


def test_no_match_says_so(browsing):
    client, ward = browsing
    text = client.get("/?patient=nobody").text
    assert "No studies match these filters." in text and "0 studies" in text


# --------------------------------------------------------------------------- sort and pages


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sort=received&order=asc", ["reanalysed", "pneumonia", "normal", "covid", "failed",
                                     "receiving"]),
        ("sort=probability", ["covid", "normal", "pneumonia", "reanalysed", "receiving", "failed"]),
        ("sort=probability&order=asc", ["reanalysed", "pneumonia", "normal", "covid", "failed",
                                        "receiving"]),
        ("sort=status", ["receiving", "reanalysed", "covid", "pneumonia", "normal", "failed"]),
        ("sort=class", ["covid", "normal", "reanalysed", "pneumonia", "failed", "receiving"]),
        ("sort=study_date", ["receiving", "failed", "covid", "normal", "pneumonia", "reanalysed"]),
        ("sort=probability&class=Normal", ["normal", "reanalysed"]),
    ],
)  # fmt: skip
def test_sort(browsing, query, expected):
    client, ward = browsing
    assert listed(client, ward, query) == expected
    assert shown(client, ward, query) == expected


def test_sort_headers_toggle_the_order_and_keep_the_filters(browsing):
    client, ward = browsing
    text = html.unescape(client.get("/?sort=probability&status=analyzed").text)
    assert 'href="/?status=analyzed&sort=probability&order=asc"' in text
    assert 'href="/?status=analyzed&sort=status"' in text


@pytest.mark.parametrize(
    ("query", "page", "expected"),
    [
        ("per_page=2", 1, ["receiving", "failed"]),
        ("per_page=2&page=2", 2, ["covid", "normal"]),
        ("per_page=2&page=3", 3, ["pneumonia", "reanalysed"]),
        ("per_page=2&page=99", 3, ["pneumonia", "reanalysed"]),  # beyond the last: the last
        ("per_page=4&page=2", 2, ["pneumonia", "reanalysed"]),
        ("status=failed&page=5", 1, ["failed"]),
        ("patient=nobody&page=3", 1, []),
    ],
)
def test_pages(browsing, query, page, expected):
    client, ward = browsing
    answer = client.get(f"/worklist.json?{query}").json
    assert (answer["page"], names(ward, [r["id"] for r in answer["rows"]])) == (page, expected)
    assert shown(client, ward, query) == expected


def test_page_links_and_per_page_limit(browsing):
    client, ward = browsing
    text = html.unescape(client.get("/?per_page=2&page=2").text)
    assert "page 2 of 3" in text
    assert 'href="/?per_page=2" ' in text and 'href="/?page=3&per_page=2" rel="next"' in text
    assert client.get("/worklist.json?per_page=5000").json["per_page"] == 200


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("page=abc", "page must be a whole number from 1; got 'abc'"),
        ("page=0", "page must be a whole number from 1; got '0'"),
        ("page=-1", "page must be a whole number from 1; got '-1'"),
        ("per_page=1.5", "per_page must be a whole number from 1; got '1.5'"),
        ("status=done", "status must be one of receiving, stable, queued, analyzing, analyzed, "
                        "reported, failed, ignored, suspended; got 'done'"),
        ("class=covid", "class must be one of Covid_19, Normal, Pneumonia; got 'covid'"),
        ("sort=name", "sort must be one of received, study_date, status, class, probability; "
                      "got 'name'"),
        ("order=up", "order must be one of asc, desc; got 'up'"),
        ("dates=scan", "dates must be one of received, study_date; got 'scan'"),
        ("from=10/05/2024", "from must be a date as YYYY-MM-DD; got '10/05/2024'"),
        ("from=2024-05-10&to=2024-05-01", "from (2024-05-10) must not be after to (2024-05-01)"),
        ("patient=" + "x" * 129, "patient must be at most 128 characters"),
    ],
)  # fmt: skip
def test_bad_query_is_a_400_naming_the_argument(browsing, query, message):
    client, ward = browsing
    for path in ("/", "/worklist.json"):
        answer = client.get(f"{path}?{query}")
        assert answer.status_code == 400
        assert message in html.unescape(answer.text)


@contextmanager
def statements(engine):
    """Count the SQL statements run inside the block."""
    seen = []

    def count(*_args):
        seen.append(1)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.mark.parametrize("query", ["", "sort=probability&label=covid&class=Covid_19"])
def test_page_takes_the_same_few_statements_however_many_studies(client, ward, web_node, query):
    with statements(web_node.engine) as few:
        client.get(f"/?{query}")
    with web_node.session_factory() as db, db.begin():
        for index in range(100, 160):
            study = add_study(db, index, received=NOW - timedelta(days=10))
            add_analysis(db, study, "Covid_19", 0.5)
            add_label(db, study, "COVID")
    with statements(web_node.engine) as many:
        assert client.get(f"/?{query}").status_code == 200
    assert len(few) == len(many) <= 6


def test_a_patient_search_is_audited_once_while_the_page_refreshes(client, ward, web_node):
    client.environ_base["REMOTE_ADDR"] = "192.0.2.44"
    assert client.get("/?patient=doe").status_code == 200
    for _ in range(3):  # the page's own refresh, every 5 s
        assert client.get("/worklist.json?patient=doe").status_code == 200
    assert client.get("/worklist.json?patient=roe").status_code == 200
    assert client.get("/worklist.json?status=failed").status_code == 200  # no search
    with web_node.session_factory() as db:
        events = db.scalars(
            select(AuditEvent).where(AuditEvent.action == "patient_search").order_by(AuditEvent.id)
        ).all()
    assert [(e.username, e.client_address, e.detail) for e in events] == [
        ("dr.rad", "192.0.2.44", {"patient": "doe"}),
        ("dr.rad", "192.0.2.44", {"patient": "roe"}),
    ]


# --------------------------------------------------------------------------- bulk tagging


def tag(client, ids, keyword, action="add", **extra):
    token = csrf_token(client.get("/").text)
    data = {"csrf_token": token, "study_id": ids, "keyword": keyword, "action": action, **extra}
    return client.post("/worklist/tag", data=data)


def labels_and_audit(web_node) -> tuple[set, list]:
    with web_node.session_factory() as db:
        labels = set(db.execute(select(Label.study_id, Label.keyword)).all())
        audit = db.execute(
            select(AuditEvent.username, AuditEvent.action, AuditEvent.study_id, AuditEvent.detail)
            .where(AuditEvent.action != "login")
            .order_by(AuditEvent.id)
        ).all()
    return labels, [tuple(row) for row in audit]


def test_tag_selected_adds_once_and_audits_each_change(client, ward, web_node):
    answer = tag(client, [ward["covid"], ward["normal"]], "teaching", filters="status=analyzed")
    assert (answer.status_code, answer.headers["Location"]) == (302, "/?status=analyzed")
    page = client.get(answer.headers["Location"]).text
    assert "Tagged 1 study with “teaching”; 1 already had it." in page
    labels, audit = labels_and_audit(web_node)
    assert (ward["normal"], "teaching") in labels
    detail = {"keyword": "teaching", "bulk": True}
    assert audit == [("dr.rad", "label_add", ward["normal"], detail)]
    again = client.get(tag(client, [ward["normal"]], "TEACHING").headers["Location"]).text
    assert "Tagged 0 studies with “TEACHING”; 1 already had it." in again
    assert labels_and_audit(web_node) == (labels, audit)


def test_tag_uses_the_configured_spelling(client, ward, web_node):
    tag(client, [ward["pneumonia"], ward["reanalysed"]], " pneumonia ")
    labels, audit = labels_and_audit(web_node)
    assert {(ward["pneumonia"], "Pneumonia"), (ward["reanalysed"], "Pneumonia")} <= labels
    assert [row[1:3] for row in audit] == [
        ("label_add", ward["pneumonia"]),
        ("label_add", ward["reanalysed"]),
    ]


def test_remove_from_selected(client, ward, web_node):
    answer = tag(client, [ward["covid"], ward["pneumonia"]], "TEACHING", action="remove")
    text = client.get(answer.headers["Location"]).text
    assert "Removed “TEACHING” from 1 study; 1 did not have it on the study." in text
    labels, audit = labels_and_audit(web_node)
    assert (ward["covid"], "teaching") not in labels
    assert audit == [
        ("dr.rad", "label_remove", ward["covid"], {"keyword": "TEACHING", "bulk": True})
    ]


def test_tag_by_json_with_the_csrf_header(client, ward, web_node):
    token = csrf_token(client.get("/").text)
    body = {"study_ids": [ward["failed"], ward["covid"]], "keyword": "COVID", "action": "add"}
    answer = client.post("/worklist/tag", json=body, headers={"X-CSRFToken": token})
    assert answer.status_code == 200
    assert answer.json == {
        "action": "add",
        "keyword": "COVID",
        "changed": [ward["failed"]],  # its COVID was on a series only
        "unchanged": [ward["covid"]],
    }
    assert len(labels_and_audit(web_node)[1]) == 1


@pytest.mark.parametrize("as_json", [False, True])
def test_tag_without_csrf_token_is_refused(client, ward, web_node, as_json):
    before = labels_and_audit(web_node)
    if as_json:
        answer = client.post("/worklist/tag", json={"study_ids": [ward["normal"]], "keyword": "x"})
    else:
        data = {"study_id": [ward["normal"]], "keyword": "x", "action": "add"}
        answer = client.post("/worklist/tag", data=data)
    assert answer.status_code == 400 and "CSRF" in answer.text
    assert labels_and_audit(web_node) == before


def test_keyword_with_markup_and_quotes_is_shown_escaped(client, ward, web_node):
    keyword = """<script>alert("x")</script> it's"""
    page = client.get(tag(client, [ward["normal"]], keyword).headers["Location"]).text
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; it&#39;s"
    assert f'<span class="tag">{escaped}</span>' in page  # the row
    assert f"Tagged 1 study with “{escaped}”." in page  # the flash message
    assert f'<option value="{escaped}">' in page  # the keyword list
    assert "<script>alert(" not in page
    assert (ward["normal"], keyword) in labels_and_audit(web_node)[0]
    row = next(r for r in client.get("/worklist.json").json["rows"] if r["id"] == ward["normal"])
    assert keyword in row["labels"]  # JSON is data; worklist.js sets it as text


def test_unknown_study_is_a_404_and_changes_nothing(client, ward, web_node):
    before = labels_and_audit(web_node)
    answer = tag(client, [ward["covid"], 999999], "teaching-2")
    assert answer.status_code == 404
    assert "Study 999999 doesn't exist." in html.unescape(answer.text)
    assert labels_and_audit(web_node) == before


@pytest.mark.parametrize(
    ("ids", "keyword", "message"),
    [
        (["covid"], "", "keyword must be 1-64 characters, got ''"),
        (["covid"], "   ", "keyword must be 1-64 characters, got '   '"),
        (["covid"], "k" * 65, "keyword must be 1-64 characters"),
        (["covid"], "two\nlines", "keyword must not contain control characters or line breaks"),
        ([], "teaching", "Select at least one study."),
    ],
)
def test_bad_tag_request_says_what_is_wrong(client, ward, web_node, ids, keyword, message):
    before = labels_and_audit(web_node)
    study_ids = [ward[name] for name in ids]
    answer = tag(client, study_ids, keyword, filters="status=failed")
    assert answer.headers["Location"] == "/?status=failed"
    assert message in html.unescape(client.get(answer.headers["Location"]).text)
    token = csrf_token(client.get("/").text)
    body = {"study_ids": study_ids, "keyword": keyword}
    as_json = client.post("/worklist/tag", json=body, headers={"X-CSRFToken": token})
    assert as_json.status_code == 400 and message in as_json.json["error"]
    assert labels_and_audit(web_node) == before


@pytest.mark.parametrize(
    ("ids", "action", "message"),
    [
        (["abc"], "add", "Study id must be a whole number, got 'abc'."),
        (["1.5"], "add", "Study id must be a whole number, got '1.5'."),
        (["1"], "delete", "action must be add or remove, got 'delete'"),
    ],
)
def test_malformed_tag_request_is_a_400(client, ward, ids, action, message):
    answer = tag(client, ids, "teaching", action=action)
    assert answer.status_code == 400 and message in html.unescape(answer.text)


@pytest.mark.parametrize(
    ("filters", "location"),
    [
        ("status=failed&sort=probability&evil=1", "/?status=failed&sort=probability"),
        ("//elsewhere.example/", "/"),
        ("page=abc", "/"),
    ],
)
def test_tagging_returns_to_the_same_filters_only(client, ward, filters, location):
    assert tag(client, [ward["covid"]], "teaching", filters=filters).headers["Location"] == location


def test_tags_follow_the_admins_keyword_mapping(client, ward, web_node):
    with web_node.session_factory() as db, db.begin():
        db.add(KeywordClass(keyword="Teaching", class_name=None, updated_by="ad.min"))
    text = client.get("/").text
    assert '<span class="tag tag-excluded" title="training: excluded">teaching</span>' in text
    assert '<span class="tag">COVID</span>' in text  # the admins' mapping replaced the settings'
    tag(client, [ward["normal"]], "TEACHING")
    assert (ward["normal"], "Teaching") in labels_and_audit(web_node)[0]  # the admins' spelling
