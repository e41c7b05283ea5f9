"""The worklist: studies with status, prediction and labels; filters, live refresh, bulk tags."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qsl, urlencode

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.analysis.result import CLASSES
from node.records.db import Label, Study, StudyStatus, utcnow
from node.records.labels import (
    add_label,
    canonical_keyword,
    check_keyword,
    effective_keyword_classes,
    remove_label,
)
from webui import audit, node, session
from webui.worklist_query import (
    MAX_PER_PAGE,
    WorklistPage,
    WorklistQuery,
    default_order,
    fetch_page,
    known_keywords,
    parse_query,
)

bp = Blueprint("worklist", __name__)
MAX_TAGGED = 1000
PER_PAGE_CHOICES = (25, 50, 100, MAX_PER_PAGE)
SEARCH_AUDIT_WINDOW = timedelta(hours=1)  # the page repeats its search every 5 s


@bp.route("/")
@login_required
def index():
    db = session()
    keywords = known_keywords(db)
    query = _query()
    _audit_patient_search(db, query)
    return render_page(fetch_page(db, query, keywords), keywords)


def render_page(page: WorklistPage, keywords: list[str]) -> str:
    """The worklist page for ``page``; ``keywords`` are offered in the keyword boxes."""
    return render_template(
        "worklist.html",
        page=page,
        query=page.query,
        keywords=keywords,
        tag_classes=_tag_classes(session(), {k for row in page.rows for k in row.labels}),
        statuses=tuple(StudyStatus),
        classes=CLASSES,
        per_page_choices=PER_PAGE_CHOICES,
        filters=urlencode(page.query.args()),
        show_name=show_name,
        show_date=show_date,
        default_order=default_order,
    )


@bp.route("/worklist.json")
@login_required
def page_json():
    """The rows of the page the same query string shows (for the 5-second refresh)."""
    db = session()
    query = _query()
    _audit_patient_search(db, query)
    page = fetch_page(db, query, known_keywords(db) if query.label else ())
    return jsonify(
        page=page.query.page,
        pages=page.pages,
        per_page=page.query.per_page,
        total=page.total,
        rows=[row.as_json() for row in page.rows],
        keyword_classes=_tag_classes(db, {k for row in page.rows for k in row.labels}),
    )


@bp.route("/worklist/tag", methods=["POST"])
@login_required
def tag():
    """Put a keyword on (or take it off) the selected studies: a form, or JSON
    ``{"study_ids": [...], "keyword": "...", "action": "add" | "remove"}``."""
    wants_json = request.is_json
    sent = _tag_request(wants_json)
    ids = _study_ids(sent["study_ids"])
    try:
        keyword = check_keyword(sent["keyword"])
        if not ids:
            raise ValueError("Select at least one study.")
    except ValueError as exc:
        if wants_json:
            return jsonify(error=str(exc)), 400
        flash(str(exc), "error")
        return redirect(_back(sent["filters"]))
    db = session()
    studies = _studies(db, ids)
    if sent["action"] == "add":
        keyword = canonical_keyword(keyword, effective_keyword_classes(node().settings, db))
        changed = _add(db, studies, keyword)
    else:
        changed = _remove(db, studies, keyword)
    db.commit()
    unchanged = [study_id for study_id in studies if study_id not in changed]
    if wants_json:
        return jsonify(action=sent["action"], keyword=keyword, changed=changed, unchanged=unchanged)
    flash(_tag_message(sent["action"], keyword, len(changed), len(unchanged)), "info")
    return redirect(_back(sent["filters"]))


def _audit_patient_search(db: Session, query: WorklistQuery) -> None:
    """Audit a search by patient name or ID (once an hour per user and search: the page
    refreshes itself with the same query)."""
    if not query.patient:
        return
    since = utcnow() - SEARCH_AUDIT_WINDOW
    if not audit.recorded_since(
        db, current_user.username, "patient_search", since, patient=query.patient
    ):
        audit.record(db, current_user.username, "patient_search", patient=query.patient)
        db.commit()


def _query() -> WorklistQuery:
    try:
        return parse_query(request.args)
    except ValueError as exc:
        abort(400, str(exc))


def _tag_request(wants_json: bool) -> dict:
    """The tag request's fields, from JSON or from the form; 400 when malformed."""
    if wants_json:
        sent = request.get_json(silent=True)
        if not isinstance(sent, dict):
            abort(400, "The request must be a JSON object.")
        sent = {
            "study_ids": sent.get("study_ids", []),
            "keyword": sent.get("keyword"),
            "action": sent.get("action", "add"),
            "filters": "",
        }
    else:
        sent = {
            "study_ids": request.form.getlist("study_id"),
            "keyword": request.form.get("keyword", ""),
            "action": request.form.get("action", "add"),
            "filters": request.form.get("filters", ""),
        }
    if sent["action"] not in ("add", "remove"):
        abort(400, f"action must be add or remove, got {sent['action']!r}")
    return sent


def _study_ids(values: object) -> list[int]:
    """Study ids as sent (checkbox values or a JSON list), in order, without repeats."""
    if not isinstance(values, list) or len(values) > MAX_TAGGED:
        abort(400, f"study_ids must be a list of at most {MAX_TAGGED} study ids.")
    ids = []
    for value in values:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
        ):
            abort(400, f"Study id must be a whole number, got {value!r}.")
        ids.append(int(value))
    return list(dict.fromkeys(ids))


def _studies(db: Session, ids: list[int]) -> dict[int, str]:
    """Study id → Study Instance UID for ``ids``; 404 naming the first that isn't here."""
    found = dict(
        db.execute(select(Study.id, Study.study_instance_uid).where(Study.id.in_(ids))).all()
    )
    for study_id in ids:
        if study_id not in found:
            abort(404, f"Study {study_id} doesn't exist.")
    return {study_id: found[study_id] for study_id in ids}


def _add(db: Session, studies: dict[int, str], keyword: str) -> list[int]:
    """Add a study-level ``keyword`` where it is missing; one audit event per study changed."""
    folded = keyword.casefold()
    present = db.execute(
        select(Label.study_id, Label.keyword).where(
            Label.study_id.in_(list(studies)), Label.series_id.is_(None)
        )
    )
    have = {study_id for study_id, found in present if found.casefold() == folded}
    changed = []
    for study_id, uid in studies.items():
        if study_id in have:
            continue
        add_label(db, uid, keyword, current_user.username)
        audit.record(db, current_user.username, "label_add", study_id, keyword=keyword, bulk=True)
        changed.append(study_id)
    return changed


def _remove(db: Session, studies: dict[int, str], keyword: str) -> list[int]:
    """Remove a study-level ``keyword`` (any case); one audit event per study changed."""
    changed = []
    for study_id, uid in studies.items():
        if remove_label(db, uid, keyword):
            audit.record(
                db, current_user.username, "label_remove", study_id, keyword=keyword, bulk=True
            )
            changed.append(study_id)
    return changed


def _tag_message(action: str, keyword: str, changed: int, unchanged: int) -> str:
    studies = f"{changed} {'study' if changed == 1 else 'studies'}"
    if action == "add":
        text = f"Tagged {studies} with “{keyword}”"
        return text + (f"; {unchanged} already had it." if unchanged else ".")
    text = f"Removed “{keyword}” from {studies}"
    return text + (f"; {unchanged} did not have it on the study." if unchanged else ".")


def _back(filters: str) -> str:
    """The worklist with the filters it was on (rebuilt from known arguments only)."""
    try:
        query = parse_query(dict(parse_qsl(filters)))
    except ValueError:
        query = WorklistQuery()
    return url_for("worklist.index", **query.args())


def _tag_classes(db: Session, keywords: set[str]) -> dict[str, str | None]:
    """For each keyword that maps to training: its class, or "excluded"."""
    if not keywords:
        return {}
    folded = {
        k.strip().casefold(): v for k, v in effective_keyword_classes(node().settings, db).items()
    }
    return {k: folded[k.casefold()] or "excluded" for k in keywords if k.casefold() in folded}


def show_name(name: str | None) -> str:
    """A DICOM person name as read aloud: ``DOE^JOHN^^DR`` → ``DOE, JOHN DR``."""
    if not name:
        return ""
    family, *rest = name.split("=")[0].split("^")
    given = " ".join(part for part in rest if part)
    return f"{family}, {given}" if given and family else family or given


def show_date(value: str | None) -> str:
    """A DICOM DA (``YYYYMMDD``) as ``YYYY-MM-DD``; anything else as stored."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""
