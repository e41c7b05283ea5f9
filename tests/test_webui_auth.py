"""Web UI sign-in: roles, CSRF, secure cookies, a bound on failed sign-ins, open redirects."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from ainode.cli import main
from node.records import users
from node.records.db import AuditEvent, User
from tests.webui import PASSWORDS, USERNAMES, csrf_token, sign_in


def post_login(client, username: str, password: str, next_url: str | None = None):
    token = csrf_token(client.get("/login").text)
    url = "/login" + (f"?next={next_url}" if next_url else "")
    return client.post(url, data={"csrf_token": token, "username": username, "password": password})


@pytest.mark.parametrize("path", ["/", "/exports", "/upload", "/admin", "/studies/1"])
def test_every_page_asks_to_sign_in_first(anonymous, path):
    answer = anonymous.get(path)
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/login")


def test_sign_in_and_out(anonymous, web_node):
    answer = post_login(anonymous, USERNAMES["radiologist"], PASSWORDS["radiologist"])
    assert (answer.status_code, answer.headers["Location"]) == (302, "/")
    page = anonymous.get("/")
    assert page.status_code == 200 and "Test radiologist (radiologist)" in page.text
    token = csrf_token(page.text)
    assert anonymous.post("/logout", data={"csrf_token": token}).status_code == 302
    assert anonymous.get("/").status_code == 302
    with web_node.session_factory() as session:
        assert [e.action for e in session.scalars(select(AuditEvent))] == ["login"]


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("dr.rad", "wrong-password"),
        ("nobody", "radiologist-pass-1"),
        ("DR.RAD", "radiologist-pass-1"),
    ],
)
def test_wrong_credentials_say_so_without_telling_which(anonymous, username, password):
    answer = post_login(anonymous, username, password)
    assert answer.status_code == 401
    assert "Wrong user name or password." in answer.text


def test_sign_in_without_csrf_token_is_refused(anonymous):
    data = {"username": USERNAMES["radiologist"], "password": PASSWORDS["radiologist"]}
    answer = anonymous.post("/login", data=data)
    assert answer.status_code == 400 and "CSRF" in answer.text


def test_five_wrong_passwords_lock_the_account_for_a_while(anonymous, web_node):
    for _ in range(4):
        assert "Wrong user name" in post_login(anonymous, "dr.rad", "bad-password").text
    assert (
        "Too many failed sign-ins: try again in 15 min."
        in post_login(anonymous, "dr.rad", "bad-password").text
    )
    locked = post_login(anonymous, "dr.rad", PASSWORDS["radiologist"])  # right, but locked
    assert locked.status_code == 401 and "Too many failed sign-ins" in locked.text
    with web_node.session_factory() as session:
        user = session.scalar(select(User).where(User.username == "dr.rad"))
        later = user.locked_until + timedelta(seconds=1)  # the clock, not a sleep
        assert users.authenticate(session, "dr.rad", PASSWORDS["radiologist"], now=later).user


def test_radiologists_do_not_reach_admin_pages(client, admin_client):
    answer = client.get("/admin")
    assert answer.status_code == 403 and "This page is for administrators." in answer.text
    assert admin_client.get("/admin").status_code == 200


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil"])
def test_next_never_leaves_the_site(anonymous, target):
    answer = post_login(anonymous, "dr.rad", PASSWORDS["radiologist"], next_url=target)
    assert answer.headers["Location"] == "/"


def test_session_cookie_is_http_only_secure_and_same_site(web_node):
    from webui import create_app

    app = create_app(
        web_node.settings.model_copy(update={"web_secure_cookies": True}), node=web_node
    )
    client = app.test_client()
    token = csrf_token(client.get("/login").text)
    answer = client.post(
        "/login", data={"csrf_token": token, "username": "ad.min", "password": PASSWORDS["admin"]}
    )
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Lax" in cookie


def test_unknown_pages_get_the_not_found_page(client):
    answer = client.get("/no/such/page")
    assert answer.status_code == 404 and "Not found" in answer.text


def test_user_add_from_the_command_line(make_settings, tmp_path, monkeypatch, capsys):
    from tests.config import write_config

    config = write_config(make_settings(), tmp_path / "ainode.toml")
    monkeypatch.setenv("NEW_PASSWORD", "a-long-password")
    assert main(["--config", str(config), "user", "add", "dr.new", "--role", "admin",
                 "--password-env", "NEW_PASSWORD"]) == 0  # fmt: skip
    assert "user dr.new (admin) created" in capsys.readouterr().out
    assert main(["--config", str(config), "user", "add", "dr.new",
                 "--password-env", "NEW_PASSWORD"]) == 2  # fmt: skip
    assert "user 'dr.new' already exists" in capsys.readouterr().err
    monkeypatch.setenv("SHORT", "short")
    assert main(["--config", str(config), "user", "add", "dr.two", "--password-env", "SHORT"]) == 2
    assert "password must have at least 10 characters" in capsys.readouterr().err


def test_sign_in_helper_works_for_both_roles(app):
    assert sign_in(app.test_client(), "admin").get("/admin").status_code == 200
