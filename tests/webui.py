"""Web UI test helpers: an app on a migrated node with one user per role, signed-in clients."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.records import users
from node.runtime import build_node
from node.settings import Settings
from tests.config import write_config

PASSWORDS = {"radiologist": "radiologist-pass-1", "admin": "admin-pass-123"}
USERNAMES = {"radiologist": "dr.rad", "admin": "ad.min"}


def csrf_token(html: str) -> str:
    """The CSRF token a page carries (meta tag or hidden form field)."""
    match = re.search(r'name="csrf[-_]token"[^>]*(?:content|value)="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


def sign_in(client, role: str):
    """Sign ``client`` in as the test user of ``role``; returns the client."""
    token = csrf_token(client.get("/login").text)
    answer = client.post(
        "/login",
        data={"csrf_token": token, "username": USERNAMES[role], "password": PASSWORDS[role]},
    )
    assert answer.status_code == 302, answer.text
    return client


def add_accounts(node) -> None:
    """One test user per role."""
    with node.session_factory() as session:
        for role, name in USERNAMES.items():
            users.add_user(session, name, PASSWORDS[role], role, full_name=f"Test {role}")
        session.commit()


@pytest.fixture(scope="session")
def accounts_database(tmp_path_factory) -> Path:
    """A migrated SQLite database holding the test accounts, copied into each web test's node
    (migrating and hashing two passwords again for every one of ~300 tests costs minutes)."""
    folder = tmp_path_factory.mktemp("web-accounts")
    node = build_node(Settings(data_dir=folder, min_free_disk_mb=0), migrate=True)
    add_accounts(node)
    node.close()
    return folder / "ainode.db"


@pytest.fixture
def web_node(make_settings, accounts_database):
    """A migrated node with a radiologist and an admin account."""
    settings = make_settings(web_secure_cookies=False)
    url = settings.resolved_database_url
    target = Path(url.removeprefix("sqlite:///"))
    copy = url.startswith("sqlite:///") and not target.exists()
    if copy:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(accounts_database, target)
    node = build_node(settings, migrate=True)  # a copy is at head already: nothing to do
    if not copy:
        add_accounts(node)
    yield node
    node.close()


@pytest.fixture
def app(web_node):
    """The Flask app on ``web_node``."""
    from webui import create_app

    return create_app(web_node.settings, {"TESTING": True}, node=web_node)


@pytest.fixture
def client(app):
    """A signed-in radiologist."""
    return sign_in(app.test_client(), "radiologist")


@pytest.fixture
def admin_client(app):
    """A signed-in admin."""
    return sign_in(app.test_client(), "admin")


@pytest.fixture
def anonymous(app):
    """Nobody signed in."""
    return app.test_client()


@contextlib.contextmanager
def running_worker(settings: Settings, folder: Path, timeout: float = 120) -> Iterator[None]:
    """A real ``ainode worker`` process on ``settings`` (its database and broker), ready to
    take tasks; stopped (and waited for) at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(settings, folder / "worker.toml")
    log = folder / "worker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ainode.cli", "--config", str(config), "worker"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while " ready." not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
