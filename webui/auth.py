"""Sign-in and roles: Flask-Login on the node's user table, throttled failed sign-ins.

How failed sign-ins are slowed (per client address and per user name, never a lock-out)
is :mod:`node.records.sign_in`'s design; every attempt, refusal and sign-out is audited
with the client address.
"""

from __future__ import annotations

import unicodedata
from functools import wraps
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from node.records import sign_in, users
from node.records.db import User, UserRole
from webui import audit, session

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please sign in."
WRONG = "Wrong user name or password."


class SignedIn(UserMixin):
    """The signed-in user as Flask-Login sees it (a plain copy, not a database row)."""

    def __init__(self, user: User) -> None:
        self.id = str(user.id)
        self.username = user.username
        self.full_name = user.full_name or user.username
        self.role = user.role

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


def init_app(app) -> None:
    """Attach the login manager to ``app``."""
    login_manager.init_app(app)


@login_manager.user_loader
def _load(user_id: str) -> SignedIn | None:
    user = session().get(User, int(user_id)) if user_id.isdigit() else None
    return SignedIn(user) if user is not None and user.active else None


def admin_required(view):
    """Only admins (403 for everyone else, sign-in first)."""

    @wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.is_authenticated:
            return login_manager.unauthorized()
        if not current_user.is_admin:
            abort(403, "This page is for administrators.")
        return view(*args, **kwargs)

    return wrapped


class LoginForm(FlaskForm):
    username = StringField("User name", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=256)])


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Sign in: 302 to ``next`` (same site only), 401 for a wrong name or password, 429
    with Retry-After while this address or this user name must wait."""
    form = LoginForm()
    if not form.validate_on_submit():
        return render_template("login.html", form=form)
    db = session()
    username, address = form.username.data.strip(), audit.client_address()
    known = audit.signed_in_from(db, username, address)
    policy = sign_in.Policy.from_settings(current_app.extensions["ainode_settings"])
    throttled = sign_in.claim_attempt(db, policy, address, username, known)
    if throttled is not None:
        db.rollback()  # nothing counted: the attempt is refused unchecked
        audit.record(
            db,
            username,
            "login_throttled",
            scope=throttled.scope,
            retry_after=throttled.retry_after,
        )
        db.commit()
        flash(f"Too many failed sign-ins: try again in {_wait(throttled.retry_after)}.", "error")
        answer = make_response(render_template("login.html", form=form), 429)
        answer.headers["Retry-After"] = str(throttled.retry_after)
        return answer
    db.commit()  # counted before the password is checked: parallel guesses are all counted
    user = users.authenticate(db, username, form.password.data)
    if user is None:
        audit.record(db, username, "login_failed")
        db.commit()
        flash(WRONG, "error")
        return render_template("login.html", form=form), 401
    sign_in.forget(db, address, username)
    login_user(SignedIn(user))
    audit.record(db, user.username, "login")
    db.commit()
    return redirect(_safe_next(request.args.get("next")))


@bp.route("/logout", methods=["POST"])
def logout():
    if current_user.is_authenticated:
        db = session()
        audit.record(db, current_user.username, "logout")
        db.commit()
    logout_user()
    flash("Signed out.", "info")
    return redirect(url_for("auth.login"))


def _wait(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{-(-seconds // 60)} min"


def _safe_next(target: str | None) -> str:
    """``target`` when it is a path on this site, else the worklist (no open redirect).

    A path starts with exactly one "/", holds no whitespace, and no backslash or control
    character, raw or percent-encoded (browsers drop tabs and newlines and read "\\" as
    "/", so "/\\t/evil.example" would become "//evil.example"), and has no scheme or host.
    """
    default = url_for("worklist.index")
    if not target:
        return default
    if any(ch.isspace() for ch in target):
        return default
    for text in (target, unquote(target)):
        if not text.startswith("/") or text.startswith("//") or "\\" in text:
            return default
        if any(unicodedata.category(ch).startswith("C") for ch in text):
            return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target
