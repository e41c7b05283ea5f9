"""Admin pages: audit trail, keyword → class mapping (and what exports make of it), users."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node import phantom
from node.records import audit
from node.records.db import AuditEvent, KeywordClass, User, utcnow
from node.records.export import export_bundle
from node.records.labels import add_label, effective_keyword_classes
from tests.webui import PASSWORDS, csrf_token, sign_in

SETTINGS_MAPPING = {
    "COVID": "Covid_19",
    "Normal": "Normal",
    "Pneumonia": "Pneumonia",
    "Exclude": None,
}


def post_form(client, url: str, fields: dict, follow: bool = False):
    token = csrf_token(client.get("/admin").text)
    return client.post(url, data={"csrf_token": token, **fields}, follow_redirects=follow)


def mapping_in_force(node) -> dict:
    with node.session_factory() as db:
        return effective_keyword_classes(node.settings, db)


def audit_events(node, action: str) -> list[AuditEvent]:
    with node.session_factory() as db:
        return list(
            db.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
            )
        )


# --------------------------------------------------------------------------- access


ADMIN_PAGES = ["/admin", "/admin/mapping", "/admin/users"]


@pytest.mark.parametrize("url", ADMIN_PAGES)
def test_admin_pages_are_for_admins_only(client, admin_client, anonymous, url):
    assert admin_client.get(url).status_code == 200
    refused = client.get(url)
    assert refused.status_code == 403
    assert "This page is for administrators." in refused.text
    sent = anonymous.get(url)
    assert sent.status_code == 302 and sent.headers["Location"].startswith("/login")


@pytest.mark.parametrize(
    ("url", "fields"),
    [
        ("/admin/mapping", {"keyword": "Viral", "class_name": "Pneumonia"}),
        ("/admin/mapping/remove", {"keyword": "COVID"}),
        ("/admin/users", {"username": "x.y", "password": "long-enough-1", "role": "admin"}),
    ],
)
def test_radiologists_cannot_change_anything(client, web_node, url, fields):
    assert post_form(client, url, fields).status_code == 403
    with web_node.session_factory() as db:
        assert db.scalars(select(KeywordClass)).all() == []
        assert db.scalar(select(User).where(User.username == "x.y")) is None


# --------------------------------------------------------------------------- audit trail


def test_audit_trail_lists_events_newest_first_and_filters(client, admin_client, web_node):
    # the radiologist signed in first, then the admin
    page = admin_client.get("/admin")
    assert audit_rows(page.text) == [("ad.min", "127.0.0.1"), ("dr.rad", "127.0.0.1")]
    only_rad = admin_client.get("/admin?user=dr.rad&action=login").text
    assert "dr.rad" in only_rad and "<td>ad.min</td>" not in only_rad
    assert "1 event," in only_rad
    none = admin_client.get("/admin?action=export").text
    assert "No event matches." in none
    tomorrow = (utcnow() + timedelta(days=1)).date().isoformat()
    assert "No event matches." in admin_client.get(f"/admin?since={tomorrow}").text
    assert "2 events" in admin_client.get(f"/admin?until={tomorrow}").text


def audit_rows(html: str) -> list[tuple[str, str]]:
    """(user, client address) of each row of the audit trail, as shown."""
    return re.findall(
        r'<tr>\s*<td>[^<]+</td>\s*<td>([^<]+)</td>\s*<td class="address">([^<]+)</td>', html
    )


def test_audit_trail_shows_where_each_event_came_from(app, web_node):
    clients = {}
    for role, address in (("radiologist", "192.0.2.10"), ("admin", "192.0.2.20")):
        clients[role] = app.test_client()
        clients[role].environ_base["REMOTE_ADDR"] = address
        sign_in(clients[role], role)
    with web_node.session_factory() as db, db.begin():
        audit.record(db, "cli:root", "user_add", user="dr.new", role="radiologist")
    page = clients["admin"].get("/admin")
    assert page.status_code == 200
    assert audit_rows(page.text) == [
        ("cli:root", "command line"),
        ("ad.min", "192.0.2.20"),
        ("dr.rad", "192.0.2.10"),
    ]


def test_audit_trail_is_paginated(admin_client, web_node):
    start = utcnow() - timedelta(days=1)
    with web_node.session_factory() as db, db.begin():
        for n in range(60):
            db.add(
                AuditEvent(
                    at=start + timedelta(seconds=n),
                    username="dr.old",
                    action="label_add",
                    detail={"n": n},
                )
            )
    first = admin_client.get("/admin?user=dr.old").text
    assert "60 events" in first and "Page 1 of 2" in first
    assert "{&#34;n&#34;: 59}" in first and "{&#34;n&#34;: 10}" in first
    assert "{&#34;n&#34;: 9}" not in first
    second = admin_client.get("/admin?user=dr.old&page=2").text
    assert "Page 2 of 2" in second and "{&#34;n&#34;: 0}" in second


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("action=delete", "Unknown action &#39;delete&#39;"),
        ("since=yesterday", "&#39;since&#39; must be a date as YYYY-MM-DD"),
    ],
)
def test_bad_audit_filters_are_refused(admin_client, query, message):
    answer = admin_client.get(f"/admin?{query}")
    assert answer.status_code == 400
    assert message in answer.text


# --------------------------------------------------------------------------- mapping


def test_mapping_starts_from_the_settings_and_the_first_edit_copies_it(admin_client, web_node):
    page = admin_client.get("/admin/mapping").text
    assert "This is the mapping from the settings" in page
    answer = post_form(
        admin_client, "/admin/mapping", {"keyword": "Viral", "class_name": "Pneumonia"}, True
    )
    assert answer.status_code == 200
    assert "Keyword &#39;Viral&#39;: new → Pneumonia." in answer.text
    assert mapping_in_force(web_node) == {**SETTINGS_MAPPING, "Viral": "Pneumonia"}
    post_form(admin_client, "/admin/mapping", {"keyword": "covid", "class_name": "exclude"})
    post_form(admin_client, "/admin/mapping/remove", {"keyword": "pneumonia"})
    assert mapping_in_force(web_node) == {
        "COVID": None,
        "Normal": "Normal",
        "Exclude": None,
        "Viral": "Pneumonia",
    }
    details = [e.detail for e in audit_events(web_node, "mapping")]
    assert details == [
        {"keyword": "Viral", "before": None, "after": "Pneumonia"},
        {"keyword": "COVID", "before": "Covid_19", "after": "exclude"},
        {"keyword": "Pneumonia", "before": "Pneumonia", "after": None},
    ]
    assert "This is the mapping from the settings" not in admin_client.get("/admin/mapping").text


@pytest.mark.parametrize(
    ("url", "fields", "message"),
    [
        ("/admin/mapping", {"keyword": "Viral", "class_name": "Flu"}, "class must be one of"),
        ("/admin/mapping", {"keyword": " ", "class_name": "Normal"}, "keyword must be 1-64"),
        ("/admin/mapping/remove", {"keyword": "Viral"}, "is not in the mapping"),
    ],
)
def test_bad_mapping_edits_are_refused(admin_client, web_node, url, fields, message):
    answer = post_form(admin_client, url, fields)
    assert answer.status_code == 400
    assert message in answer.text
    assert mapping_in_force(web_node) == SETTINGS_MAPPING
    assert audit_events(web_node, "mapping") == []


def test_the_last_keyword_cannot_be_removed(admin_client, web_node):
    for keyword in ("COVID", "Normal", "Pneumonia"):
        post_form(admin_client, "/admin/mapping/remove", {"keyword": keyword})
    answer = post_form(admin_client, "/admin/mapping/remove", {"keyword": "Exclude"})
    assert answer.status_code == 400
    assert "the last keyword of the mapping" in answer.text
    assert mapping_in_force(web_node) == {"Exclude": None}


def test_a_mapping_edit_changes_what_exports_make_of_labels(admin_client, web_node, tmp_path):
    spec = phantom.PhantomSpec(finding="pneumonia", slices=8, rows=96, columns=96, seed=5)
    files = phantom.write_series(spec, tmp_path / "series")
    for path in files:
        web_node.ingestor.ingest_part10(path.read_bytes(), "TESTSCU")
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with web_node.session_factory() as db, db.begin():
        add_label(db, study_uid, "Viral", "dr.rad")
    before = export_bundle(web_node, tmp_path / "before")
    assert sum(before.studies.values()) == 0
    assert [s["reason"] for s in before.skipped] == ["no class keyword"]
    post_form(admin_client, "/admin/mapping", {"keyword": "viral", "class_name": "Pneumonia"})
    after = export_bundle(web_node, tmp_path / "after")
    assert after.studies == {"Covid_19": 0, "Normal": 0, "Pneumonia": 1}
    info = (tmp_path / "after" / "export.json").read_text(encoding="utf-8")
    assert '"viral": "Pneumonia"' in info


# --------------------------------------------------------------------------- users


def test_admin_adds_a_user_who_can_sign_in(admin_client, app, web_node):
    fields = {
        "username": "dr.new",
        "full_name": "Dr New",
        "role": "radiologist",
        "password": "a-long-password",
        "password_again": "a-long-password",
    }
    answer = post_form(admin_client, "/admin/users", fields, follow=True)
    assert answer.status_code == 200
    assert "User dr.new (radiologist) added." in answer.text
    assert "<td>Dr New</td>" in answer.text
    assert [e.detail for e in audit_events(web_node, "user_add")] == [
        {"user": "dr.new", "role": "radiologist"}
    ]
    other = app.test_client()
    token = csrf_token(other.get("/login").text)
    signed_in = other.post(
        "/login", data={"csrf_token": token, "username": "dr.new", "password": "a-long-password"}
    )
    assert signed_in.status_code == 302


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"username": "dr.short", "password": "short"}, "at least 10 characters"),
        ({"username": "dr.rad", "password": PASSWORDS["admin"]}, "already exists"),
        ({"username": "../etc", "password": "a-long-password"}, "1-64 letters, digits"),
        ({"username": "dr.x", "password": "a-long-password", "role": "root"}, "role must be one"),
        (
            {"username": "dr.x", "password": "a-long-password", "password_again": "other-pass-1"},
            "the two passwords differ",
        ),
    ],
)
def test_bad_users_are_refused_with_the_reason(admin_client, web_node, fields, message):
    answer = post_form(admin_client, "/admin/users", {"role": "radiologist", **fields})
    assert answer.status_code == 400
    assert message in answer.text
    assert audit_events(web_node, "user_add") == []
    with web_node.session_factory() as db:
        assert len(db.scalars(select(User)).all()) == 2
