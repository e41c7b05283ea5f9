"""Admin pages: the audit trail, the keyword → class mapping, users (admins only)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.records import sign_in, users
from node.records.db import AuditEvent, User, UserRole
from webui import audit, node, session
from webui.auth import admin_required
from webui.keyword_mapping import (
    CHOICES,
    mapping_rows,
    remove_keyword_class,
    set_keyword_class,
)

bp = Blueprint("admin", __name__)
EVENTS_PER_PAGE = 50
FULL_NAME_MAX_LENGTH = 128


@bp.context_processor
def _formatting() -> dict:
    def utc_time(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "—"

    def detail_text(detail: dict | None) -> str:
        return json.dumps(detail or {}, ensure_ascii=False, sort_keys=True)

    return {"utc_time": utc_time, "detail_text": detail_text}


# --------------------------------------------------------------------------- audit trail


@bp.route("/admin")
@admin_required
def index():
    """The audit trail, newest first, filtered by user, action and date."""
    filters = {
        "user": request.args.get("user", "").strip(),
        "action": request.args.get("action", "").strip(),
        "since": request.args.get("since", "").strip(),
        "until": request.args.get("until", "").strip(),
    }
    if filters["action"] and filters["action"] not in audit.ACTIONS:
        abort(400, f"Unknown action {filters['action']!r}: choose one of the list.")
    page = request.args.get("page", "1")
    page = int(page) if page.isdigit() and int(page) > 0 else 1
    query = _audit_query(filters)
    db = session()
    total = db.scalar(select(func.count()).select_from(query.subquery()))
    events = db.scalars(
        query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
        .limit(EVENTS_PER_PAGE)
        .offset((page - 1) * EVENTS_PER_PAGE)
    ).all()
    pages = max(1, -(-total // EVENTS_PER_PAGE))
    return render_template(
        "admin.html",
        events=events,
        filters=filters,
        actions=audit.ACTIONS,
        page=page,
        pages=pages,
        total=total,
    )


def _audit_query(filters: dict[str, str]):
    query = select(AuditEvent)
    if filters["user"]:
        query = query.where(AuditEvent.username == filters["user"])
    if filters["action"]:
        query = query.where(AuditEvent.action == filters["action"])
    since, until = _day(filters["since"], "since"), _day(filters["until"], "until")
    if since is not None:
        query = query.where(AuditEvent.at >= datetime.combine(since, time.min, tzinfo=UTC))
    if until is not None:
        end = datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC)
        query = query.where(AuditEvent.at < end)
    return query


def _day(value: str, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        abort(400, f"'{name}' must be a date as YYYY-MM-DD, got {value!r}.")


# --------------------------------------------------------------------------- mapping


@bp.route("/admin/mapping")
@admin_required
def mapping():
    return _mapping_page()


def _mapping_page(status: int = 200, keyword: str = ""):
    rows = mapping_rows(session(), node().settings)
    seeded = any(row.updated_by is not None for row in rows)
    return render_template(
        "admin_mapping.html", rows=rows, choices=CHOICES, seeded=seeded, keyword=keyword
    ), status


@bp.route("/admin/mapping", methods=["POST"])
@admin_required
def set_mapping():
    """Map a keyword to a class or to ``exclude`` (added when new)."""
    keyword = request.form.get("keyword", "")
    return _change_mapping(
        lambda db: set_keyword_class(
            db, node().settings, keyword, request.form.get("class_name", ""), current_user.username
        ),
        keyword,
    )


@bp.route("/admin/mapping/remove", methods=["POST"])
@admin_required
def remove_mapping():
    """Take a keyword out of the mapping."""
    keyword = request.form.get("keyword", "")
    return _change_mapping(
        lambda db: remove_keyword_class(db, node().settings, keyword, current_user.username),
        keyword,
    )


def _change_mapping(edit, keyword: str):
    db = session()
    try:
        change = edit(db)
    except ValueError as exc:
        db.rollback()
        flash(str(exc), "error")
        return _mapping_page(400, keyword)
    audit.record(db, current_user.username, "mapping", **change.as_detail())
    db.commit()
    after = change.after or "removed"
    flash(f"Keyword {change.keyword!r}: {change.before or 'new'} → {after}.", "info")
    return redirect(url_for("admin.mapping"))


# --------------------------------------------------------------------------- users


@bp.route("/admin/users")
@admin_required
def users_page():
    return _users_page()


def _users_page(status: int = 200, entered: dict | None = None):
    db = session()
    listed = db.scalars(select(User).order_by(User.username)).all()
    delayed = {user.username: sign_in.account_delayed_until(db, user.username) for user in listed}
    return render_template(
        "admin_users.html",
        users=listed,
        roles=tuple(UserRole),
        entered=entered or {},
        delayed=delayed,
    ), status


@bp.route("/admin/users", methods=["POST"])
@admin_required
def add_user():
    """Create a user: name, full name, role, password (at least 10 characters)."""
    entered = {
        "username": request.form.get("username", "").strip(),
        "full_name": request.form.get("full_name", "").strip(),
        "role": request.form.get("role", UserRole.RADIOLOGIST),
    }
    db = session()
    try:
        user = _create_user(
            db, entered, request.form.get("password", ""), request.form.get("password_again")
        )
    except ValueError as exc:
        db.rollback()
        flash(str(exc), "error")
        return _users_page(400, entered)
    audit.record(db, current_user.username, "user_add", user=user.username, role=user.role)
    db.commit()
    flash(f"User {user.username} ({user.role}) added.", "info")
    return redirect(url_for("admin.users_page"))


def _create_user(db: Session, entered: dict, password: str, again: str | None) -> User:
    if len(entered["full_name"]) > FULL_NAME_MAX_LENGTH:
        raise ValueError(f"full name must be at most {FULL_NAME_MAX_LENGTH} characters")
    if again is not None and again != password:
        raise ValueError("the two passwords differ")
    return users.add_user(
        db, entered["username"], password, entered["role"], full_name=entered["full_name"]
    )
