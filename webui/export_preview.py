"""What an export would hold, read from the labels alone: studies, patients, instances per class.

No pixel is read and nothing is written. The selection is the export's own
(:class:`node.records.export.LabelFilter`: a study is taken when one of its labels is a chosen
keyword, case-insensitive, labelled in the date range) and the class follows the export
too (series labels decide for their series, else the study's); the export itself may
still skip a study that has no usable CT series or no lung slices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cached_property

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.analysis.result import CLASSES
from node.records.db import Label, Study
from node.records.export import LabelFilter
from node.records.labels import LabelConflict, classify_keywords

EXCLUDED = "excluded from training"
NO_CLASS = "no class keyword"
DEPENDS_ON_SERIES = "class depends on the series evaluated"


@dataclass(frozen=True)
class ExportSelection:
    """Which labelled studies an export takes: keywords (None: any label), labels' date range."""

    keywords: tuple[str, ...] | None = None
    since: date | None = None
    until: date | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.until < self.since:
            raise ValueError(f"'until' ({self.until}) is before 'since' ({self.since})")

    @cached_property
    def _filter(self) -> LabelFilter:
        return LabelFilter.of(self.keywords, self.since, self.until)

    def selects(self, keyword: str, created_at: datetime) -> bool:
        """Whether one label (its keyword and when it was put) selects its study, as the
        export itself decides."""
        return self._filter.selects(keyword, created_at)

    def as_dict(self) -> dict:
        """The selection as JSON (dates as ISO text)."""
        return {
            "keywords": list(self.keywords) if self.keywords is not None else None,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


@dataclass
class ExportPreview:
    """Studies, instances (an upper bound of the images) and patients per class."""

    studies: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    instances: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    patients: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    patients_total: int = 0
    selected: int = 0
    not_exported: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "studies": dict(self.studies),
            "instances": dict(self.instances),
            "patients": dict(self.patients),
            "patients_total": self.patients_total,
            "selected": self.selected,
            "exported": sum(self.studies.values()),
            "not_exported": dict(self.not_exported),
        }


@dataclass
class _Study:
    patient: str
    instances: int
    series_count: int
    labels: list[tuple[int | None, str]] = field(default_factory=list)  # (series id, keyword)
    selected: bool = False


def selection_keywords(
    keywords: Iterable[str], classes: Iterable[str], mapping: Mapping[str, str | None]
) -> tuple[str, ...] | None:
    """The keywords that select studies: those chosen plus those of the chosen classes.

    None (any label) when neither keywords nor classes are chosen.
    """
    keywords, classes = list(keywords), set(classes)
    if not keywords and not classes:
        return None
    of_classes = [k for k, class_name in mapping.items() if class_name in classes]
    chosen: dict[str, str] = {}
    for keyword in [*keywords, *of_classes]:
        chosen.setdefault(keyword.casefold(), keyword)
    return tuple(sorted(chosen.values(), key=str.casefold))


def preview_export(
    session: Session, mapping: Mapping[str, str | None], selection: ExportSelection
) -> ExportPreview:
    """Counts per class of the studies ``selection`` takes, from the database only."""
    preview = ExportPreview()
    patients: dict[str, set[str]] = {name: set() for name in CLASSES}
    skipped: Counter[str] = Counter()
    for study in _studies(session, selection):
        preview.selected += 1
        outcome = study_class(study.labels, study.series_count, mapping)
        if outcome not in CLASSES:
            skipped[outcome] += 1
            continue
        preview.studies[outcome] += 1
        preview.instances[outcome] += study.instances
        patients[outcome].add(study.patient)
    preview.patients = {name: len(keys) for name, keys in patients.items()}
    preview.patients_total = len(set().union(*patients.values()))
    preview.not_exported = dict(skipped)
    return preview


def _studies(session: Session, selection: ExportSelection) -> list[_Study]:
    rows = session.execute(
        select(
            Label.study_id,
            Label.series_id,
            Label.keyword,
            Label.created_at,
            Study.patient_id,
            Study.instance_count,
            Study.series_count,
        )
        .join(Study, Label.study_id == Study.id)
        .order_by(Label.study_id, Label.id)
    ).all()
    studies: dict[int, _Study] = {}
    for study_id, series_id, keyword, created_at, patient_id, instances, series_count in rows:
        # Without a Patient ID a study stands alone, as in the export's patient keys.
        patient = patient_id.strip() if patient_id and patient_id.strip() else f"study:{study_id}"
        study = studies.setdefault(study_id, _Study(patient, instances, series_count))
        study.labels.append((series_id, keyword))
        study.selected = study.selected or selection.selects(keyword, created_at)
    return [study for study in studies.values() if study.selected]


def study_class(
    labels: list[tuple[int | None, str]], series_count: int, mapping: Mapping[str, str | None]
) -> str:
    """The class a study is exported as, or why it is not (:data:`EXCLUDED`, ...)."""
    on_study = [keyword for series_id, keyword in labels if series_id is None]
    on_series: dict[int, list[str]] = {}
    for series_id, keyword in labels:
        if series_id is not None:
            on_series.setdefault(series_id, []).append(keyword)
    try:
        # A series whose own labels are only plain tags takes the study's labels.
        decided = [_outcome(*classify_keywords(k, mapping)) for k in on_series.values()]
        outcomes = {outcome for outcome in decided if outcome is not None}
        if len(outcomes) < len(decided) or len(decided) < max(series_count, 1):
            outcomes.add(_outcome(*classify_keywords(on_study, mapping)) or NO_CLASS)
    except LabelConflict as conflict:
        return str(conflict)
    return outcomes.pop() if len(outcomes) == 1 else DEPENDS_ON_SERIES


def _outcome(class_name: str | None, keyword: str | None) -> str | None:
    if keyword is None:
        return None
    return class_name if class_name is not None else EXCLUDED


def keywords_in_use(session: Session) -> list[tuple[str, int]]:
    """(keyword, number of studies carrying it) of every label on the node, by keyword."""
    rows = session.execute(
        select(Label.keyword, func.count(func.distinct(Label.study_id))).group_by(Label.keyword)
    ).all()
    return sorted(((keyword, count) for keyword, count in rows), key=lambda x: x[0].casefold())
