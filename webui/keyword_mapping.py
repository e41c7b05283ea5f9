"""The admins' keyword → class mapping (:class:`~node.records.db.KeywordClass` rows).

While no row exists the settings' ``keyword_classes`` are in force; the first edit copies
them into rows, so an edit changes one keyword and keeps the others. Keywords match
case-insensitively, as labels do. Functions leave committing to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.analysis.result import CLASSES
from node.records.db import KeywordClass, utcnow
from node.records.labels import check_keyword
from node.settings import Settings

EXCLUDE = "exclude"
CHOICES = (*CLASSES, EXCLUDE)


@dataclass(frozen=True)
class MappingChange:
    """One edit of the mapping: the keyword, its class before and after (None: absent)."""

    keyword: str
    before: str | None
    after: str | None

    def as_detail(self) -> dict:
        return {"keyword": self.keyword, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class MappingRow:
    """A keyword and its class (``exclude``) as the editor shows it."""

    keyword: str
    choice: str
    updated_by: str | None  # None: from the settings, not edited yet
    updated_at: object = None


def mapping_rows(session: Session, settings: Settings) -> list[MappingRow]:
    """The mapping in force: the rows, or the settings' mapping while there are none."""
    rows = _rows(session)
    if not rows:
        return [
            MappingRow(keyword, _choice(class_name), None)
            for keyword, class_name in sorted(settings.keyword_classes.items(), key=_folded)
        ]
    return [
        MappingRow(row.keyword, _choice(row.class_name), row.updated_by, row.updated_at)
        for row in sorted(rows, key=lambda r: r.keyword.casefold())
    ]


def set_keyword_class(
    session: Session, settings: Settings, keyword: str, choice: str, by: str
) -> MappingChange:
    """Map ``keyword`` to a class (or ``exclude``); ValueError names what is wrong."""
    keyword = check_keyword(keyword)
    if choice not in CHOICES:
        raise ValueError(f"class must be one of {', '.join(CHOICES)}, got {choice!r}")
    class_name = None if choice == EXCLUDE else choice
    row = _find(_seeded(session, settings, by), keyword)
    if row is None:
        session.add(
            KeywordClass(keyword=keyword, class_name=class_name, updated_by=by, updated_at=utcnow())
        )
        session.flush()
        return MappingChange(keyword, None, choice)
    before = _choice(row.class_name)
    row.class_name, row.updated_by, row.updated_at = class_name, by, utcnow()
    session.flush()
    return MappingChange(row.keyword, before, choice)


def remove_keyword_class(
    session: Session, settings: Settings, keyword: str, by: str
) -> MappingChange:
    """Take ``keyword`` out of the mapping (its labels become plain tags)."""
    keyword = check_keyword(keyword)
    rows = _seeded(session, settings, by)
    row = _find(rows, keyword)
    if row is None:
        raise ValueError(f"keyword {keyword!r} is not in the mapping")
    if len(rows) == 1:
        raise ValueError(
            f"{row.keyword!r} is the last keyword of the mapping and cannot be removed: without "
            "any, the settings' mapping would apply again. Map it to 'exclude' instead."
        )
    change = MappingChange(row.keyword, _choice(row.class_name), None)
    session.delete(row)
    session.flush()
    return change


def _rows(session: Session) -> list[KeywordClass]:
    return list(session.scalars(select(KeywordClass)))


def _seeded(session: Session, settings: Settings, by: str) -> list[KeywordClass]:
    """The rows, made from the settings' mapping first when there are none yet."""
    rows = _rows(session)
    if rows:
        return rows
    now = utcnow()
    rows = [
        KeywordClass(keyword=keyword, class_name=class_name, updated_by=by, updated_at=now)
        for keyword, class_name in settings.keyword_classes.items()
    ]
    session.add_all(rows)
    session.flush()
    return rows


def _find(rows: list[KeywordClass], keyword: str) -> KeywordClass | None:
    folded = keyword.casefold()
    return next((row for row in rows if row.keyword.casefold() == folded), None)


def _choice(class_name: str | None) -> str:
    return class_name if class_name is not None else EXCLUDE


def _folded(item: tuple[str, str | None]) -> str:
    return item[0].casefold()
