"""Sign-in and roles: Flask-Login on the node's user table, a bound on failed sign-ins."""

from __future__ import annotations

from datetime import timedelta
from functools import wraps

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from node.records import users
from node.records.db import User, UserRole
from webui import audit, session

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please sign in."
MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)


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
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        db = session()
        outcome = users.authenticate(
            db, form.username.data.strip(), form.password.data, MAX_FAILED_LOGINS, LOCKOUT
        )
        if outcome.user is not None:
            login_user(SignedIn(outcome.user))
            audit.record(db, outcome.user.username, "login")
            db.commit()
            return redirect(_safe_next(request.args.get("next")))
        db.commit()  # the failed-attempt count
        flash(outcome.message, "error")
        status = 401
    return render_template("login.html", form=form), status


@bp.route("/logout", methods=["POST"])
def logout():
    logout_user()
    flash("Signed out.", "info")
    return redirect(url_for("auth.login"))


def _safe_next(target: str | None) -> str:
    """Only same-site paths: an open redirect would let a link send a user elsewhere."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("worklist.index")
