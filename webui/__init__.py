"""Radiologist web UI (Flask): worklist, study review, labels, exports, upload-and-classify.

``create_app(settings)`` builds the app on the node's settings, database and store; one
blueprint per area. Everything it serves is local (no CDN): the node's machines have no
internet.
"""

from __future__ import annotations

import io
import secrets
from datetime import timedelta
from pathlib import Path

from flask import Flask, Request, Response, g, render_template, request
from flask_wtf.csrf import CSRFProtect

from node import atomic
from node.runtime import Node, build_node
from node.settings import Settings

csrf = CSRFProtect()
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
# Every answer: never framed (the verdict and label forms), scripts and styles only from the
# node's own static files (no inline script runs), no MIME sniffing, no referrer elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class InMemoryUploadRequest(Request):
    """Uploads stay in memory (bounded by MAX_CONTENT_LENGTH): nothing uploaded touches the
    disk unless the user asks to keep it."""

    def _get_file_stream(self, *args, **kwargs):
        return io.BytesIO()


def create_app(settings: Settings, test_config: dict | None = None, node: Node | None = None):
    """The web UI on ``settings`` (database, store, models); ``test_config`` overrides Flask
    configuration (tests), ``node`` reuses an already built node."""
    app = Flask(__name__)
    app.request_class = InMemoryUploadRequest
    app.config.update(
        SECRET_KEY=_secret_key(settings),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.web_secure_cookies,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SECURE=settings.web_secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        MAX_CONTENT_LENGTH=MAX_UPLOAD_BYTES,
        WTF_CSRF_TIME_LIMIT=None,  # the session's own lifetime bounds the token
    )
    if test_config:
        app.config.update(test_config)
    app.extensions["ainode_node"] = node or build_node(settings)
    app.extensions["ainode_settings"] = settings
    csrf.init_app(app)

    from webui import (
        admin,
        auth,
        dashboard,
        exports,
        health,
        labels,
        routing,
        study,
        upload,
        worklist,
    )

    auth.init_app(app)
    for blueprint in (
        auth.bp,
        worklist.bp,
        study.bp,
        labels.bp,
        exports.bp,
        upload.bp,
        admin.bp,
        routing.bp,
        dashboard.bp,
        health.bp,
    ):
        app.register_blueprint(blueprint)
    _error_pages(app)
    app.after_request(_security_headers)
    app.teardown_appcontext(_close_session)
    return app


def _security_headers(response: Response) -> Response:
    """The headers of :data:`SECURITY_HEADERS` on every answer; pages and data (patient
    data) are not stored by the browser unless the view says otherwise (slice images)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "static" and "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response


def _close_session(_exc) -> None:
    opened = g.pop("db_session", None)
    if opened is not None:
        opened.close()


def _secret_key(settings: Settings) -> str:
    """The session signing key: configured, or generated once into the data folder."""
    if settings.web_secret_key:
        return settings.web_secret_key
    path = Path(settings.data_dir) / "web_secret_key"
    if not path.exists():
        atomic.private_folder(path.parent)
        # 0600 from its creation; of web processes starting at once, the first key wins
        atomic.create_exclusive(path, secrets.token_urlsafe(48).encode("ascii"), mode=0o600)
    return path.read_text(encoding="utf-8").strip()


def _error_pages(app: Flask) -> None:
    for code in (400, 403, 404, 405, 410, 413):

        @app.errorhandler(code)
        def error(exc, code=code):
            message = getattr(exc, "description", "") or ""
            return render_template("error.html", code=code, message=message), code


def node() -> Node:
    """The node (database, store, settings) of the running app."""
    from flask import current_app

    return current_app.extensions["ainode_node"]


def session():
    """A database session for this request, closed when the request ends."""
    if "db_session" not in g:
        g.db_session = node().session_factory()
    return g.db_session
