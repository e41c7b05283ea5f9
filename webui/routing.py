"""Admin page of the routing rules (``node.records.routing``): list, edit, reorder, add and
delete the study and series rules, and a tester that shows, for a stored study, which rule
matches and which series would be analysed, on the rules as edited, before they are saved."""

from __future__ import annotations

from dataclasses import dataclass, fields

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from node.analysis.analyze import AnalysisError, eligible_series
from node.records import routing
from node.records.db import Series, Study
from node.records.routing import SERIES, STUDY, Conditions, Rule
from node.workflow.jobs import instance_paths
from webui import audit, node, session
from webui.auth import admin_required

bp = Blueprint("routing", __name__)
MAX_ROWS = 200  # rules of one kind a form may carry
RECENT_STUDIES = 25
TEXT_FIELDS = ("modality", "body_part", "study_description", "series_description", "calling_ae")
NUMBER_FIELDS = {
    "slice_thickness_min": float,
    "slice_thickness_max": float,
    "series_size_min": int,
    "series_size_max": int,
}


@bp.route("/admin/routing")
@admin_required
def index():
    """The rules in force, an empty row to add one of each kind, and the tester."""
    db = session()
    rows = {kind: [_row(rule) for rule in routing.load_rules(db, kind)] for kind in (STUDY, SERIES)}
    return _page(rows)


@bp.route("/admin/routing", methods=["POST"])
@admin_required
def save():
    """Replace both rule lists with the form's (order by position; ticked rows deleted)."""
    rows, rules, error = _from_form()
    if error:
        flash(error, "error")
        return _page(rows, status=400)
    db = session()
    for kind in (STUDY, SERIES):
        change = routing.save_rules(db, kind, rules[kind], current_user.username)
        if change["before"] != change["after"]:
            audit.record(db, current_user.username, "routing_rules", **change)
    db.commit()
    flash(
        f"Routing rules saved: {len(rules[STUDY])} study rule(s), "
        f"{len(rules[SERIES])} series rule(s).",
        "info",
    )
    return redirect(url_for("routing.index"))


@bp.route("/admin/routing/test", methods=["POST"])
@admin_required
def test():
    """Evaluate the rules as entered (nothing saved) on the study asked for."""
    rows, rules, error = _from_form()
    if error:
        flash(error, "error")
        return _page(rows, status=400)
    db = session()
    study = _find_study(request.form.get("study", "").strip(), request.form.get("recent", ""))
    decision = routing.decide_study(rules[STUDY], routing.study_facts(db, study.id))
    outcome = _series_outcome(study, rules[SERIES])
    audit.record(db, current_user.username, "routing_test", study.id)
    db.commit()
    return _page(rows, tested=study, decision=decision, outcome=outcome)


def _page(rows: dict[str, list[dict]], status: int = 200, **tested):
    recent = session().scalars(
        select(Study).order_by(Study.last_received_at.desc()).limit(RECENT_STUDIES)
    )
    return render_template(
        "routing.html",
        rows=rows,
        blank=_row(None),
        actions=routing.ACTIONS,
        syntaxes=routing.SYNTAXES,
        recent=list(recent),
        entered_study=request.form.get("study", ""),
        **tested,
    ), status


def _row(rule: Rule | None) -> dict:
    """A rule as the form's strings."""
    if rule is None:
        return {"name": "", "action": "", "syntax": "glob"}
    values = {f.name: getattr(rule.conditions, f.name) for f in fields(Conditions)}
    row = {k: "" if v is None else str(v) for k, v in values.items()}
    return row | {"name": rule.name, "action": rule.action}


def _from_form() -> tuple[dict, dict, str | None]:
    """The rows as entered (kept for the page), the rules they make, or the first error."""
    rows: dict[str, list[dict]] = {}
    rules: dict[str, list[Rule]] = {}
    errors: list[str] = []
    for kind in (STUDY, SERIES):
        entered = []
        count = request.form.get(f"{kind}-count", "0")
        for i in range(min(int(count) if count.isdigit() else 0, MAX_ROWS)):
            row = {
                key: request.form.get(f"{kind}-{i}-{key}", "").strip()
                for key in ("name", "action", "position", "delete", "syntax", *TEXT_FIELDS)
                + tuple(NUMBER_FIELDS)
            }
            if row["delete"] or (not row["name"] and not row["action"]):
                continue  # deleted, or the blank row left blank
            entered.append((_position(row["position"], i), i, row))
        entered.sort(key=lambda item: (item[0], item[1]))
        rows[kind] = [row for _, _, row in entered]
        rules[kind] = []
        for row in rows[kind]:
            try:
                rules[kind].append(_rule(kind, row))
            except ValueError as exc:
                errors.append(f"{kind} rule {row['name'] or '(no name)'}: {exc}")
    return rows, rules, (errors[0] if errors else None)


def _position(text: str, default: int) -> float:
    try:
        return float(text)
    except ValueError:
        return float(default + 1)


def _rule(kind: str, row: dict) -> Rule:
    values: dict = {key: row[key] for key in TEXT_FIELDS if row[key]}
    values["syntax"] = row["syntax"] or "glob"
    for key, number in NUMBER_FIELDS.items():
        if row[key]:
            try:
                values[key] = number(row[key])
            except ValueError:
                message = f"{key.replace('_', ' ')} must be a number, got {row[key]!r}"
                raise ValueError(message) from None
    return Rule(kind, row["name"], row["action"], Conditions.from_dict(values))


def _find_study(uid: str, recent: str) -> Study:
    db = session()
    if uid:
        study = db.scalar(select(Study).where(Study.study_instance_uid == uid))
        if study is None:
            abort(404, f"Study {uid} doesn't exist on this node.")
        return study
    if recent.isdigit() and (study := db.get(Study, int(recent))) is not None:
        return study
    abort(400, "Give a Study Instance UID or pick a recent study to test the rules on.")


@dataclass(frozen=True)
class SeriesOutcome:
    """What the tester found for the series: the candidates, the choice, and from where."""

    candidates: list[routing.SeriesFacts]
    choice: routing.SeriesChoice | None
    message: str
    from_files: bool


def _series_outcome(study: Study, rules: list[Rule]) -> SeriesOutcome:
    """The series the analysis would evaluate: read from the stored headers, as the
    analysis reads them; from the series rows when the files cannot be read."""
    seen: dict = {}

    def choose(series):
        seen["facts"] = [routing.SeriesFacts.from_datasets(s) for s in series]
        seen["choice"] = routing.choose_series(rules, seen["facts"])
        return seen["choice"].index, seen["choice"].reason

    try:
        eligible_series(instance_paths(node(), study.id), None, choose)
    except AnalysisError as exc:
        return SeriesOutcome(seen.get("facts", []), seen.get("choice"), str(exc), True)
    except (OSError, InvalidDicomError) as exc:
        rows = session().scalars(
            select(Series)
            .where(Series.study_id == study.id, Series.modality == "CT")
            .order_by(Series.id)
        )
        facts = [routing.series_facts(row) for row in rows]
        choice = routing.choose_series(rules, facts)
        note = (
            f"the stored files cannot be read ({type(exc).__name__}): judged on the CT series rows"
        )
        return SeriesOutcome(facts, choice, note, False)
    return SeriesOutcome(seen["facts"], seen["choice"], "", True)
