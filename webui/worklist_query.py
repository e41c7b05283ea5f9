"""The worklist's query: filters read from a query string, and one page of studies in SQL.

A page is one statement: the filtered, sorted page of study ids (a LIMIT/OFFSET subquery
that touches only the columns it sorts on) joined back to the study, its latest done
analysis and its keywords. Filters are plain predicates on ``study`` (label and class
filters are ``IN`` subqueries), so the count needs no join.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import case, false, func, select
from sqlalchemy.orm import Session, aliased

from node.analysis.result import CLASSES
from node.records.db import Analysis, AnalysisStatus, Label, Study, StudyStatus

DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 200
# Keywords are printable (node.records.labels.check_keyword): no control character in one.
KEYWORD_SEPARATOR = "\x1f"
SORTS = ("received", "study_date", "status", "class", "probability")
DATE_FIELDS = ("received", "study_date")
# The lifecycle's order, so that sorting by status reads like the study's life.
STATUS_ORDER = tuple(StudyStatus)
DESCENDING_FIRST = {"received", "study_date", "probability"}
MAX_TEXT = 128


@dataclass(frozen=True)
class WorklistQuery:
    """What the user asked for: filters, sort and page (every field validated)."""

    status: str | None = None
    predicted_class: str | None = None
    label: str | None = None
    date_field: str = "received"
    date_from: date | None = None
    date_to: date | None = None
    description: str | None = None
    patient: str | None = None
    sort: str = "received"
    order: str = "desc"
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    def args(self, **changes) -> dict[str, str]:
        """Query-string arguments that give this query back (defaults left out)."""
        changed = replace(self, **changes)
        default = WorklistQuery()
        values = {}
        for field in fields(self):
            value = getattr(changed, field.name)
            if (
                field.name != "order"
                and value is not None
                and value != getattr(default, field.name)
            ):
                values[ARG_NAMES[field.name]] = str(value)
        if changed.order != default_order(changed.sort):
            values["order"] = changed.order
        return values

    def with_page(self, page: int) -> WorklistQuery:
        return replace(self, page=page)


ARG_NAMES = {
    "status": "status",
    "predicted_class": "class",
    "label": "label",
    "date_field": "dates",
    "date_from": "from",
    "date_to": "to",
    "description": "description",
    "patient": "patient",
    "sort": "sort",
    "order": "order",
    "page": "page",
    "per_page": "per_page",
}


def default_order(sort: str) -> str:
    """Newest, latest and most probable first; statuses and classes in their order."""
    return "desc" if sort in DESCENDING_FIRST else "asc"


def parse_query(args: Mapping[str, str]) -> WorklistQuery:
    """The query a query string asks for; ``ValueError`` naming the bad argument.

    Empty values mean "no filter" (a submitted filter form sends every field). ``per_page``
    above :data:`MAX_PER_PAGE` is lowered to it; ``page`` beyond the last page is brought
    back to the last page by :func:`fetch_page`.
    """
    text = {name: (args.get(name) or "").strip() for name in ARG_NAMES.values()}
    sort = _choice(text["sort"] or "received", SORTS, "sort")
    date_from = _date(text["from"], "from")
    date_to = _date(text["to"], "to")
    if date_from and date_to and date_from > date_to:
        raise ValueError(f"from ({date_from}) must not be after to ({date_to})")
    return WorklistQuery(
        status=_choice(text["status"], tuple(StudyStatus), "status") or None,
        predicted_class=_choice(text["class"], CLASSES, "class") or None,
        label=_text(text["label"], "label"),
        date_field=_choice(text["dates"] or "received", DATE_FIELDS, "dates"),
        date_from=date_from,
        date_to=date_to,
        description=_text(text["description"], "description"),
        patient=_text(text["patient"], "patient"),
        sort=sort,
        order=_choice(text["order"] or default_order(sort), ("asc", "desc"), "order"),
        page=_whole(text["page"] or "1", "page"),
        per_page=min(_whole(text["per_page"] or str(DEFAULT_PER_PAGE), "per_page"), MAX_PER_PAGE),
    )


def _choice(value: str, allowed: Sequence[str], name: str) -> str:
    if value and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _date(value: str, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be a date as YYYY-MM-DD; got {value!r}") from None


def _text(value: str, name: str) -> str | None:
    if len(value) > MAX_TEXT:
        raise ValueError(f"{name} must be at most {MAX_TEXT} characters")
    return value or None


def _whole(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a whole number from 1; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class WorklistRow:
    """One study as the worklist shows it (patient data included: this is the PACS side)."""

    id: int
    uid: str
    status: str
    status_reason: str | None
    patient_name: str | None
    patient_id: str | None
    study_date: str | None
    description: str | None
    received_at: datetime
    series_count: int
    instance_count: int
    predicted_class: str | None
    probability: float | None
    model_name: str | None
    model_version: str | None
    model_demo: bool
    labels: tuple[str, ...]
    outside_experience: bool = False  # the model said the study is unlike its training data

    def as_json(self) -> dict:
        """The fields the page refreshes (no patient data: the page already has it)."""
        values = asdict(self)
        keep = ("id", "uid", "status", "status_reason", "predicted_class", "probability")
        shown = {name: values[name] for name in keep}
        shown["class"] = shown.pop("predicted_class")
        shown["model"] = self.model_label
        shown["labels"] = list(self.labels)
        shown["outside_experience"] = self.outside_experience
        return shown

    @property
    def model_label(self) -> str | None:
        if self.model_name is None:
            return None
        label = f"{self.model_name}:{self.model_version}"
        return f"{label} DEMO" if self.model_demo else label


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist and where it sits among all matching studies."""

    query: WorklistQuery
    rows: list[WorklistRow]
    total: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.query.per_page))


def known_keywords(session: Session) -> list[str]:
    """Every keyword in use, sorted case-insensitively (an index-only scan)."""
    found = session.scalars(select(Label.keyword).distinct())
    return sorted(found, key=lambda k: (k.casefold(), k))


def fetch_page(session: Session, query: WorklistQuery, keywords: Sequence[str]) -> WorklistPage:
    """The page ``query`` asks for (the last page when it asks beyond it).

    ``keywords`` are the keywords in use (:func:`known_keywords`); a label filter matches
    any of their spellings case-insensitively while the SQL stays an indexed equality.
    """
    predicates = _predicates(query, keywords)
    total = session.scalar(select(func.count()).select_from(Study).where(*predicates))
    last = max(1, math.ceil(total / query.per_page))
    if query.page > last:
        query = query.with_page(last)
    statement = _page_statement(query, predicates)
    rows = [_row(*found) for found in session.execute(statement)]
    return WorklistPage(query, rows, total)


def _latest_done_ids():
    """Ids of each study's latest finished analysis."""
    return (
        select(func.max(Analysis.id))
        .where(Analysis.status == AnalysisStatus.DONE)
        .group_by(Analysis.study_id)
    )


def _predicates(query: WorklistQuery, keywords: Sequence[str]) -> list:
    where = []
    if query.status:
        where.append(Study.status == query.status)
    if query.predicted_class:
        analysed = select(Analysis.study_id).where(
            Analysis.id.in_(_latest_done_ids()), Analysis.predicted_class == query.predicted_class
        )
        where.append(Study.id.in_(analysed))
    if query.label:
        folded = query.label.casefold()
        spellings = [k for k in keywords if k.casefold() == folded]
        labelled = select(Label.study_id).where(Label.keyword.in_(spellings))
        where.append(Study.id.in_(labelled) if spellings else false())
    where.extend(_date_predicates(query))
    if query.description:
        where.append(Study.study_description.ilike(_contains(query.description), escape="\\"))
    for term in (query.patient or "").split():
        pattern = _contains(term)
        where.append(
            Study.patient_name.ilike(pattern, escape="\\")
            | Study.patient_id.ilike(pattern, escape="\\")
        )
    return where


def _date_predicates(query: WorklistQuery) -> list:
    where = []
    if query.date_field == "study_date":
        if query.date_from:
            where.append(Study.study_date >= query.date_from.strftime("%Y%m%d"))
        if query.date_to:
            where.append(Study.study_date <= query.date_to.strftime("%Y%m%d"))
        return where
    if query.date_from:
        where.append(Study.first_received_at >= datetime.combine(query.date_from, time(), UTC))
    if query.date_to:
        end = datetime.combine(query.date_to + timedelta(days=1), time(), UTC)
        where.append(Study.first_received_at < end)
    return where


def _contains(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _probability():
    """The probability of the predicted class, read from the JSON of probabilities."""
    return case(
        *[(Analysis.predicted_class == c, Analysis.probabilities[c].as_float()) for c in CLASSES]
    )


def _sort_key(sort: str):
    return {
        "received": Study.first_received_at,
        "study_date": Study.study_date,
        "status": case(*[(Study.status == s, i) for i, s in enumerate(STATUS_ORDER)]),
        "class": Analysis.predicted_class,
        "probability": _probability(),
    }[sort]


def _ordered(column, order: str, nulls_last: bool = True):
    ordered = column.desc() if order == "desc" else column.asc()
    return ordered.nulls_last() if nulls_last else ordered


def _latest_done_id(study_id):
    """The id of the latest finished analysis of the study ``study_id`` (a correlated
    subquery: an index lookup on ``analysis.study_id`` per study it is asked for)."""
    done = aliased(Analysis)  # the outer query joins Analysis itself
    return (
        select(func.max(done.id))
        .where(done.study_id == study_id, done.status == AnalysisStatus.DONE)
        .scalar_subquery()
    )


def _page_statement(query: WorklistQuery, predicates: list):
    key = _sort_key(query.sort)
    page = (
        select(Study.id.label("study_id"), key.label("sort_key"))
        .where(*predicates)
        .order_by(_ordered(key, query.order), _ordered(Study.id, query.order, False))
        .limit(query.per_page)
        .offset((query.page - 1) * query.per_page)
    )
    if query.sort in ("class", "probability"):
        page = page.outerjoin(Analysis, Analysis.id == _latest_done_id(Study.id))
    page = page.subquery()
    keywords = (
        select(func.aggregate_strings(Label.keyword, KEYWORD_SEPARATOR))
        .where(Label.study_id == page.c.study_id)
        .scalar_subquery()
    )
    return (
        select(Study, Analysis, keywords)
        .select_from(page)
        .join(Study, Study.id == page.c.study_id)
        .outerjoin(Analysis, Analysis.id == _latest_done_id(page.c.study_id))
        .order_by(
            _ordered(page.c.sort_key, query.order), _ordered(page.c.study_id, query.order, False)
        )
    )


def _row(study: Study, analysis: Analysis | None, keywords: str | None) -> WorklistRow:
    probability = None
    if analysis is not None and analysis.probabilities and analysis.predicted_class:
        probability = analysis.probabilities.get(analysis.predicted_class)
    labels = sorted(set((keywords or "").split(KEYWORD_SEPARATOR)) - {""}, key=str.casefold)
    return WorklistRow(
        id=study.id,
        uid=study.study_instance_uid,
        status=study.status,
        status_reason=study.status_reason,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
        study_date=study.study_date,
        description=study.study_description,
        received_at=study.first_received_at,
        series_count=study.series_count,
        instance_count=study.instance_count,
        predicted_class=analysis.predicted_class if analysis else None,
        probability=probability,
        model_name=analysis.model_name if analysis else None,
        model_version=analysis.model_version if analysis else None,
        model_demo=bool(analysis and analysis.model_demo),
        labels=tuple(labels),
        outside_experience=bool(analysis and analysis.outside_experience),
    )
