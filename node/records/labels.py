"""Training labels: keywords radiologists put on studies and series, and the class they give.

Functions take an open session and leave committing to the caller. Keywords match the
configured ``keyword_classes`` case-insensitively; a label is stored in the configured
spelling when it is one of them, else as typed (stripped), and kept as a plain tag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.records.db import KeywordClass, Label, Series, Study, utcnow

if TYPE_CHECKING:
    from node.settings import Settings

KEYWORD_MAX_LENGTH = 64
CREATED_BY_MAX_LENGTH = 128


class UnknownStudyError(LookupError):
    """The study (or the series within it) is not on this node."""


class LabelConflict(ValueError):
    """A study's keywords map to more than one class, so it has no single label."""

    def __init__(self, classes: Iterable[str]) -> None:
        self.classes = tuple(sorted(set(classes)))
        super().__init__(f"conflicting labels ({', '.join(self.classes)})")


@dataclass(frozen=True)
class StudyLabel:
    """One label as a user sees it: keyword, the series it is on (None: the study), who, when."""

    keyword: str
    series_instance_uid: str | None
    created_by: str
    created_at: datetime


def check_keyword(keyword: object) -> str:
    """The keyword stripped, or ``ValueError`` saying what is wrong with it."""
    if not isinstance(keyword, str):
        raise ValueError(f"keyword must be text, got {keyword!r}")
    stripped = keyword.strip()
    if not 1 <= len(stripped) <= KEYWORD_MAX_LENGTH:
        raise ValueError(f"keyword must be 1-{KEYWORD_MAX_LENGTH} characters, got {keyword!r}")
    if not stripped.isprintable():
        raise ValueError(
            f"keyword must not contain control characters or line breaks, got {keyword!r}"
        )
    return stripped


def effective_keyword_classes(settings: Settings, session: Session) -> dict[str, str | None]:
    """The keyword → class mapping in force: the admins' :class:`~node.records.db.KeywordClass` rows
    when any exist, else ``Settings.keyword_classes`` (a class of None excludes)."""
    rows = session.scalars(select(KeywordClass).order_by(KeywordClass.keyword)).all()
    if rows:
        return {row.keyword: row.class_name for row in rows}
    return dict(settings.keyword_classes)


def canonical_keyword(keyword: str, keyword_classes: Mapping[str, str | None]) -> str:
    """The configured spelling of ``keyword`` when it is a configured one, else as given."""
    folded = keyword.strip().casefold()
    for configured in keyword_classes:
        if configured.strip().casefold() == folded:
            return configured
    return keyword.strip()


def classify_keywords(
    keywords: Iterable[str], keyword_classes: Mapping[str, str | None]
) -> tuple[str | None, str | None]:
    """(class, the keyword that gives it) for a set of keywords.

    Returns ``(None, keyword)`` when a keyword excludes the study from training (it maps to
    None; exclusion wins over any class) and ``(None, None)`` when no keyword is configured.

    Raises
    ------
    LabelConflict
        When the keywords map to two or more different classes.
    """
    folded = {k.strip().casefold(): v for k, v in keyword_classes.items()}
    spelled = {k.strip().casefold(): k for k in keyword_classes}
    found: dict[str, str] = {}
    for keyword in sorted({k.strip().casefold() for k in keywords}):
        if keyword not in folded:
            continue  # a plain tag
        if folded[keyword] is None:
            return None, spelled[keyword]
        found.setdefault(folded[keyword], spelled[keyword])
    if len(found) > 1:
        raise LabelConflict(found)
    if not found:
        return None, None
    (class_name, keyword), *_ = found.items()
    return class_name, keyword


def class_for(keywords: Iterable[str], keyword_classes: Mapping[str, str | None]) -> str | None:
    """The training class the keywords give; None when excluded or unmapped.

    Raises :class:`LabelConflict` when they map to different classes.
    """
    return classify_keywords(keywords, keyword_classes)[0]


def find_study(session: Session, study_uid: str) -> Study:
    """The study with this Study Instance UID, or :class:`UnknownStudyError` naming it."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_uid)
    ).one_or_none()
    if study is None:
        raise UnknownStudyError(f"study {study_uid} is not on this node")
    return study


def _find_series(session: Session, study: Study, series_uid: str | None) -> Series | None:
    if series_uid is None:
        return None
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == series_uid, Series.study_id == study.id)
    ).one_or_none()
    if series is None:
        raise UnknownStudyError(
            f"series {series_uid} is not in study {study.study_instance_uid} on this node"
        )
    return series


def _matching(session: Session, study: Study, series: Series | None, keyword: str) -> list[Label]:
    query = select(Label).where(Label.study_id == study.id)
    query = query.where(
        Label.series_id.is_(None) if series is None else Label.series_id == series.id
    )
    folded = keyword.casefold()
    return [label for label in session.scalars(query) if label.keyword.casefold() == folded]


def add_label(
    session: Session,
    study_uid: str,
    keyword: str,
    by: str,
    series_uid: str | None = None,
    keyword_classes: Mapping[str, str | None] | None = None,
) -> Label:
    """Put ``keyword`` on a study (or one of its series); adding it again changes nothing.

    ``keyword_classes`` gives the configured spelling a keyword is stored in (``covid`` is
    stored as ``COVID``). Returns the new or the existing label.
    """
    keyword = check_keyword(keyword)
    if keyword_classes is not None:
        keyword = canonical_keyword(keyword, keyword_classes)
    if not isinstance(by, str) or not 1 <= len(by.strip()) <= CREATED_BY_MAX_LENGTH:
        raise ValueError(f"the labeller must be 1-{CREATED_BY_MAX_LENGTH} characters, got {by!r}")
    study = find_study(session, study_uid)
    series = _find_series(session, study, series_uid)
    existing = _matching(session, study, series, keyword)
    if existing:
        return existing[0]
    label = Label(
        study_id=study.id,
        series_id=series.id if series is not None else None,
        keyword=keyword,
        created_by=by.strip(),
        created_at=utcnow(),
    )
    session.add(label)
    session.flush()
    return label


def remove_label(
    session: Session, study_uid: str, keyword: str, series_uid: str | None = None
) -> bool:
    """Take ``keyword`` off a study (or one of its series); False when it was not there."""
    keyword = check_keyword(keyword)
    study = find_study(session, study_uid)
    series = _find_series(session, study, series_uid)
    found = _matching(session, study, series, keyword)
    for label in found:
        session.delete(label)
    session.flush()
    return bool(found)


def labels_of(session: Session, study_id: int) -> list[StudyLabel]:
    """The labels of a study (database id): study-level first, then by series, by keyword."""
    rows = session.execute(
        select(Label, Series.series_instance_uid)
        .outerjoin(Series, Label.series_id == Series.id)
        .where(Label.study_id == study_id)
    ).all()
    labels = [
        StudyLabel(label.keyword, series_uid, label.created_by, label.created_at)
        for label, series_uid in rows
    ]
    return sorted(
        labels,
        key=lambda x: (x.series_instance_uid is not None, x.series_instance_uid or "", x.keyword),
    )
