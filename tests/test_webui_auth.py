"""Web UI sign-in: roles, CSRF, secure cookies, throttled failed sign-ins (per address and
per user name, never a lock-out), the audit trail of sign-ins, open redirects, and the
security headers of every answer."""

from __future__ import annotations

import getpass
import re
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from ainode.cli import main
from node.records import sign_in, users
from node.records.db import AuditEvent, SignInThrottle, User, utcnow
from node.runtime import build_node
from tests.webui import PASSWORDS, USERNAMES, add_accounts, csrf_token
from tests.webui import sign_in as sign_in_as

ADDRESS_A, ADDRESS_B = "192.0.2.10", "192.0.2.20"


def post_login(
    client, username: str, password: str, next_url: str | None = None, address: str = "127.0.0.1"
):
    environ = {"REMOTE_ADDR": address}
    token = csrf_token(client.get("/login", environ_base=environ).text)
    return client.post(
        "/login",
        query_string={"next": next_url} if next_url is not None else None,
        data={"csrf_token": token, "username": username, "password": password},
        environ_base=environ,
    )


def audit_rows(node, *actions: str) -> list[tuple]:
    """(user, action, client address, detail) of the audit events, oldest first."""
    with node.session_factory() as session:
        query = select(AuditEvent).order_by(AuditEvent.id)
        if actions:
            query = query.where(AuditEvent.action.in_(actions))
        return [(e.username, e.action, e.client_address, e.detail) for e in session.scalars(query)]


def app_with(node, **settings):
    """The web UI on ``node`` with some settings changed."""
    from webui import create_app

    return create_app(node.settings.model_copy(update=settings), {"TESTING": True}, node=node)


class Clock:
    """The throttle's clock, moved by the test (no sleeping, no race with a slow machine)."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    stopped = Clock()
    monkeypatch.setattr(sign_in, "utcnow", stopped)
    return stopped


@pytest.fixture
def hash_checks(monkeypatch) -> list[str]:
    """Each password hash verified during the test (its hash method), in order."""
    checked: list[str] = []
    verify = users.check_password_hash

    def counting(pwhash: str, password: str) -> bool:
        checked.append(pwhash.split("$", 1)[0])
        return verify(pwhash, password)

    monkeypatch.setattr(users, "check_password_hash", counting)
    return checked


@pytest.mark.parametrize("path", ["/", "/exports", "/upload", "/admin", "/studies/1"])
def test_every_page_asks_to_sign_in_first(anonymous, path):
    answer = anonymous.get(path)
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith("/login")


def test_sign_in_and_out_are_audited_with_the_client_address(anonymous, web_node):
    answer = post_login(
        anonymous, USERNAMES["radiologist"], PASSWORDS["radiologist"], address=ADDRESS_A
    )
    assert (answer.status_code, answer.headers["Location"]) == (302, "/")
    page = anonymous.get("/")
    assert page.status_code == 200 and "Test radiologist (radiologist)" in page.text
    token = csrf_token(page.text)
    out = anonymous.post(
        "/logout", data={"csrf_token": token}, environ_base={"REMOTE_ADDR": ADDRESS_A}
    )
    assert out.status_code == 302
    assert anonymous.get("/").status_code == 302
    assert audit_rows(web_node) == [
        ("dr.rad", "login", ADDRESS_A, {}),
        ("dr.rad", "logout", ADDRESS_A, {}),
    ]


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


def test_wrong_passwords_from_one_address_do_not_keep_the_admin_out(anonymous, app, web_node):
    for _ in range(5):
        answer = post_login(anonymous, "ad.min", "guessed-password", address=ADDRESS_A)
        assert answer.status_code == 401 and "Wrong user name or password." in answer.text
    owner = post_login(app.test_client(), "ad.min", PASSWORDS["admin"], address=ADDRESS_B)
    assert (owner.status_code, owner.headers["Location"]) == (302, "/")
    assert [row[:3] for row in audit_rows(web_node)] == [
        *[("ad.min", "login_failed", ADDRESS_A)] * 5,
        ("ad.min", "login", ADDRESS_B),
    ]


def test_an_address_waits_after_its_failures_and_the_wait_doubles(anonymous, web_node, clock):
    for _ in range(5):
        assert post_login(anonymous, "dr.rad", "bad-password", address=ADDRESS_A).status_code == 401
    refused = post_login(anonymous, "dr.rad", PASSWORDS["radiologist"], address=ADDRESS_A)
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "1")
    assert "Too many failed sign-ins: try again in 1 s." in refused.text
    with web_node.session_factory() as session:  # right password, refused unchecked
        assert session.scalar(select(User.last_login_at).where(User.username == "dr.rad")) is None
    clock.now += timedelta(seconds=1)
    assert post_login(anonymous, "dr.rad", "bad-password", address=ADDRESS_A).status_code == 401
    again = post_login(anonymous, "dr.rad", "bad-password", address=ADDRESS_A)
    assert (again.status_code, again.headers["Retry-After"]) == (429, "2")
    other = post_login(anonymous, "dr.rad", PASSWORDS["radiologist"], address=ADDRESS_B)
    assert other.status_code == 302  # another address is not slowed
    throttled = [row for row in audit_rows(web_node) if row[1] == "login_throttled"]
    assert throttled == [
        ("dr.rad", "login_throttled", ADDRESS_A, {"scope": "address", "retry_after": 1}),
        ("dr.rad", "login_throttled", ADDRESS_A, {"scope": "address", "retry_after": 2}),
    ]


def normalised(answer, username: str) -> tuple:
    """What a client sees of a sign-in answer, less the CSRF token and the name typed."""
    body = re.sub(r'(name="csrf[-_]token"[^>]*(?:content|value)=")[^"]+"', r"\1…", answer.text)
    return answer.status_code, answer.headers.get("Retry-After"), body.replace(username, "NAME")


def test_unknown_and_known_users_get_the_same_answers_and_both_cost_a_hash(
    app, web_node, hash_checks, clock
):
    seen = {}
    for username, address in (("dr.rad", ADDRESS_A), ("nobody", ADDRESS_B)):
        client = app.test_client()
        start = len(hash_checks)
        answers = [post_login(client, username, "bad-password", address=address) for _ in range(7)]
        seen[username] = ([normalised(a, username) for a in answers], len(hash_checks) - start)
    assert seen["dr.rad"] == seen["nobody"]
    statuses = [status for status, _, _ in seen["dr.rad"][0]]
    assert statuses == [401] * 5 + [429] * 2
    assert seen["dr.rad"][1] == 5  # every checked attempt verified a hash, the refused none
    assert "Too many failed sign-ins" in seen["nobody"][0][-1][2]


def test_an_attack_spread_over_addresses_slows_only_new_addresses_of_that_user(web_node, clock):
    app = app_with(web_node, web_sign_in_account_free_failures=3)
    home = "192.0.2.1"
    assert (
        post_login(app.test_client(), "ad.min", PASSWORDS["admin"], address=home).status_code == 302
    )
    for name in ("ad.min", "nobody"):
        for n in range(3):  # three addresses, one guess each: none slowed on its own
            answer = post_login(app.test_client(), name, "guess", address=f"198.51.100.{n}")
            assert answer.status_code == 401
    for name, password in (("ad.min", PASSWORDS["admin"]), ("nobody", "guess")):
        new = post_login(app.test_client(), name, password, address="203.0.113.9")
        assert (new.status_code, new.headers["Retry-After"]) == (429, "1"), name
        assert "Too many failed sign-ins: try again in 1 s." in new.text
    owner = post_login(app.test_client(), "ad.min", PASSWORDS["admin"], address=home)
    assert owner.status_code == 302  # from where the admin signed in before: never slowed
    with web_node.session_factory() as session:  # the owner's sign-in forgot the attack
        assert sign_in.account_delayed_until(session, "ad.min") is None
        assert sign_in.account_delayed_until(session, "nobody") is not None


@pytest.fixture
def any_database_app(make_settings, database_url):
    """The web UI on SQLite and on PostgreSQL, with the test accounts."""
    from webui import create_app

    node = build_node(
        make_settings(database_url=database_url, web_secure_cookies=False), migrate=True
    )
    add_accounts(node)
    yield node, create_app(node.settings, {"TESTING": True}, node=node)
    node.close()


def test_parallel_failed_sign_ins_are_each_counted(any_database_app):
    node, app = any_database_app
    attempts = 12
    clients = [app.test_client() for _ in range(attempts)]
    tokens = [csrf_token(c.get("/login").text) for c in clients]
    start, answers = threading.Barrier(attempts), [None] * attempts

    def attempt(n: int) -> None:
        start.wait(10)
        answers[n] = clients[n].post(
            "/login",
            data={"csrf_token": tokens[n], "username": "dr.rad", "password": f"guess-{n}"},
            environ_base={"REMOTE_ADDR": f"198.51.100.{n}"},
        )

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [a.status_code for a in answers] == [401] * attempts
    with node.session_factory() as session:
        counted = session.get(SignInThrottle, sign_in.account_key("dr.rad"))
        assert counted.failures == attempts
    assert len(audit_rows(node, "login_failed")) == attempts


def test_radiologists_do_not_reach_admin_pages(client, admin_client):
    answer = client.get("/admin")
    assert answer.status_code == 403 and "This page is for administrators." in answer.text
    assert admin_client.get("/admin").status_code == 200


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/x",
        "https://evil.example/",
        "/\\evil",
        "/\\/evil.example",
        "/\t/evil.example",
        "/\r\n/evil.example",
        "/\n/evil.example",
        "/%09/evil.example",
        "/%5C/evil.example",
        "/%2F/evil.example",
        "javascript:alert(1)",
        " /x",
        "/ /evil.example",
        "\t//evil.example",
        "http:/evil.example",
        "",
    ],
)
def test_next_never_leaves_the_site(anonymous, target):
    answer = post_login(anonymous, "dr.rad", PASSWORDS["radiologist"], next_url=target)
    assert (answer.status_code, answer.headers["Location"]) == (302, "/")


@pytest.mark.parametrize(
    "target", ["/studies/1?window=lung", "/?patient=DOE%20J&page=2", "/exports"]
)
def test_next_keeps_a_path_on_this_site(anonymous, target):
    answer = post_login(anonymous, "dr.rad", PASSWORDS["radiologist"], next_url=target)
    assert (answer.status_code, answer.headers["Location"]) == (302, target)


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
    assert sign_in_as(app.test_client(), "admin").get("/admin").status_code == 200


def test_account_changes_from_the_command_line_are_audited(
    make_settings, tmp_path, monkeypatch, capsys
):
    from tests.config import write_config
    from webui import create_app

    settings = make_settings(web_secure_cookies=False)
    config = write_config(settings, tmp_path / "ainode.toml")
    monkeypatch.setenv("FIRST", "first-password-1")
    monkeypatch.setenv("SECOND", "second-password-2")
    run = ["--config", str(config), "user"]
    assert main([*run, "add", "dr.cli", "--password-env", "FIRST"]) == 0
    assert main([*run, "password", "dr.cli", "--password-env", "SECOND"]) == 0
    assert main([*run, "disable", "dr.cli"]) == 0
    assert "user dr.cli disabled" in capsys.readouterr().out
    node = build_node(settings)
    try:
        app = create_app(settings, {"TESTING": True}, node=node)
        refused = post_login(app.test_client(), "dr.cli", "second-password-2")
        assert refused.status_code == 401 and "Wrong user name or password." in refused.text
        assert main([*run, "enable", "dr.cli"]) == 0
        assert post_login(app.test_client(), "dr.cli", "second-password-2").status_code == 302
        rows = [row for row in audit_rows(node) if row[1].startswith("user_")]
    finally:
        node.close()
    assert [(action, address, detail) for _, action, address, detail in rows] == [
        ("user_add", None, {"user": "dr.cli", "role": "radiologist"}),
        ("user_password", None, {"user": "dr.cli"}),
        ("user_disable", None, {"user": "dr.cli"}),
        ("user_enable", None, {"user": "dr.cli"}),
    ]
    assert {who for who, *_ in rows} == {f"cli:{getpass.getuser()}"}


def test_a_new_password_from_the_command_line_lifts_the_account_delay(
    make_settings, tmp_path, monkeypatch
):
    from tests.config import write_config

    settings = make_settings(web_secure_cookies=False, web_sign_in_account_free_failures=1)
    config = write_config(settings, tmp_path / "ainode.toml")
    node = build_node(settings, migrate=True)
    try:
        add_accounts(node)
        app = app_with(node)
        assert (
            post_login(app.test_client(), "dr.rad", "guess", address=ADDRESS_A).status_code == 401
        )
        delayed = post_login(app.test_client(), "dr.rad", "guess", address=ADDRESS_B)
        assert delayed.status_code == 429
        monkeypatch.setenv("NEW", "a-new-password-3")
        assert (
            main(["--config", str(config), "user", "password", "dr.rad", "--password-env", "NEW"])
            == 0
        )
        answer = post_login(app.test_client(), "dr.rad", "a-new-password-3", address="192.0.2.99")
        assert answer.status_code == 302
    finally:
        node.close()


PAGES = ["/login", "/", "/exports", "/exports/jobs", "/upload", "/admin", "/admin/users",
         "/worklist.json", "/no/such/page"]  # fmt: skip


@pytest.mark.parametrize("path", PAGES)
def test_every_answer_forbids_framing_sniffing_and_inline_script(admin_client, path):
    answer = admin_client.get(path)
    assert answer.headers["X-Frame-Options"] == "DENY"
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Referrer-Policy"] == "same-origin"
    assert "no-store" in answer.headers["Cache-Control"]  # patient data: never kept


def test_static_files_carry_the_headers_and_may_be_cached(anonymous):
    answer = anonymous.get("/static/app.js")
    assert answer.status_code == 200
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" not in answer.headers.get("Cache-Control", "")
