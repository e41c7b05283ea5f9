"""Keyword labels on a study: add (typed, or one click) and remove, through ``node.records.labels``.

Both take a form post or JSON (with the CSRF token either way) and answer with a flash on
the study page (or JSON). Validation messages come from ``node.records.labels`` and reach the user.
"""

from __future__ import annotations

from flask import Blueprint
from flask_login import current_user, login_required

from node.records.labels import (
    UnknownStudyError,
    add_label,
    effective_keyword_classes,
    labels_of,
    remove_label,
)
from webui import audit, node, session
from webui.review import answer, find_study, posted_fields

bp = Blueprint("labels", __name__)


def _series_uid(fields: dict) -> str | None:
    """The series a label is on (None: the whole study); ``ValueError`` when not text."""
    value = fields.get("series_uid") or None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"series_uid must be text, got {value!r}")
    return value.strip() if value is not None else None


@bp.post("/studies/<int:study_id>/labels")
@login_required
def add(study_id: int):
    """Put a keyword on the study (or one of its series); adding it again changes nothing."""
    db = session()
    study = find_study(db, study_id)
    fields = posted_fields()
    before = {(x.keyword.casefold(), x.series_instance_uid) for x in labels_of(db, study_id)}
    try:
        series_uid = _series_uid(fields)
        label = add_label(
            db,
            study.study_instance_uid,
            fields.get("keyword"),
            current_user.username,
            series_uid=series_uid,
            keyword_classes=effective_keyword_classes(node().settings, db),
        )
    except (ValueError, UnknownStudyError) as exc:
        db.rollback()
        return answer(study_id, f"Label not added: {exc}", "error", anchor="labels")
    if (label.keyword.casefold(), series_uid) in before:
        return answer(study_id, f"“{label.keyword}” is already on this study.", anchor="labels")
    audit.record(
        db,
        current_user.username,
        "label_add",
        study_id,
        keyword=label.keyword,
        series_instance_uid=series_uid,
    )
    db.commit()
    return answer(study_id, f"Label “{label.keyword}” added.", anchor="labels")


@bp.post("/studies/<int:study_id>/labels/remove")
@login_required
def remove(study_id: int):
    """Take a keyword off the study (or one of its series)."""
    db = session()
    study = find_study(db, study_id)
    fields = posted_fields()
    keyword = fields.get("keyword")
    try:
        series_uid = _series_uid(fields)
        removed = remove_label(db, study.study_instance_uid, keyword, series_uid=series_uid)
    except (ValueError, UnknownStudyError) as exc:
        db.rollback()
        return answer(study_id, f"Label not removed: {exc}", "error", anchor="labels")
    if not removed:
        return answer(study_id, f"“{keyword.strip()}” was not on this study.", anchor="labels")
    audit.record(
        db,
        current_user.username,
        "label_remove",
        study_id,
        keyword=keyword.strip(),
        series_instance_uid=series_uid,
    )
    db.commit()
    return answer(study_id, f"Label “{keyword.strip()}” removed.", anchor="labels")
