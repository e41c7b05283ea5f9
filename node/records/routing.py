"""Routing rules: which stable studies the model analyses, and which of their series.

Two ordered lists, kept in the database (:class:`~node.records.db.RoutingRule`). A **study
rule** says ``analyze`` or ``ignore``; the first whose conditions a study meets decides, and
a study no rule matches is ``ignored`` (kept, visible, forceable by a person). A **series
rule** says which series to evaluate (``largest``, ``thinnest``, ``smallest``); the first
that matches at least one of the study's eligible (axial CT) series picks among those.

Descriptions, body parts and AE titles are matched folded, as the pull matches
descriptions (:func:`node.records.folding.fold`): "TÓRAX simple" is "Tórax Simple". A glob
pattern matches the whole text; a regular expression is searched anywhere in it.

The default rules (:data:`DEFAULT_STUDY_RULES`, :data:`DEFAULT_SERIES_RULES`, seeded by
migration 0010) are the node's behaviour before rules existed: every stable study is
analysed, on its largest series.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.analysis.analyze import AnalysisOptions
from node.records.db import Instance, RoutingRule, Series, Study, utcnow
from node.records.folding import fold, without_accents

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.analysis.analyze import SeriesChooser
    from node.settings import Settings

STUDY, SERIES = "study", "series"
ANALYZE, IGNORE = "analyze", "ignore"
ACTIONS = {STUDY: (ANALYZE, IGNORE), SERIES: ("largest", "thinnest", "smallest")}
SYNTAXES = ("glob", "regex")
NAME_MAX_LENGTH = 128
PATTERN_MAX_LENGTH = 256
# the conditions a series rule can have (the others are about the whole study)
SERIES_CONDITIONS = (
    "modality",
    "body_part",
    "series_description",
    "slice_thickness_min",
    "slice_thickness_max",
    "series_size_min",
    "series_size_max",
)


@dataclass(frozen=True)
class Conditions:
    """What a rule asks of a study (or series); an empty field asks nothing.

    ``modality``: modalities separated by commas or spaces, any of which must be in the
    study's modalities (a series rule: the series' modality). ``body_part``,
    ``study_description``, ``series_description``, ``calling_ae``: patterns (``syntax``).
    The series conditions (body part, series description, slice thickness and series size
    ranges, inclusive) must all hold for one series of the study.
    """

    modality: str = ""
    body_part: str = ""
    study_description: str = ""
    series_description: str = ""
    calling_ae: str = ""
    syntax: str = "glob"
    slice_thickness_min: float | None = None
    slice_thickness_max: float | None = None
    series_size_min: int | None = None
    series_size_max: int | None = None

    def __post_init__(self) -> None:
        if self.syntax not in SYNTAXES:
            raise ValueError(f"pattern syntax must be glob or regex, got {self.syntax!r}")
        for name in ("body_part", "study_description", "series_description", "calling_ae"):
            pattern = getattr(self, name)
            if len(pattern) > PATTERN_MAX_LENGTH:
                raise ValueError(f"{_label(name)}: at most {PATTERN_MAX_LENGTH} characters")
            if pattern and self.syntax == "regex":
                try:
                    re.compile(without_accents(pattern))
                except re.error as exc:
                    raise ValueError(f"{_label(name)}: not a regular expression ({exc})") from None
        for low, high in (
            ("slice_thickness_min", "slice_thickness_max"),
            ("series_size_min", "series_size_max"),
        ):
            lo, hi = getattr(self, low), getattr(self, high)
            for name, value in ((low, lo), (high, hi)):
                if value is not None and value < 0:
                    raise ValueError(f"{_label(name)}: must not be negative, got {value}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{_label(low)} {lo} is above {_label(high)} {hi}")

    @classmethod
    def from_dict(cls, values: dict) -> Conditions:
        """Conditions from stored or entered values (unknown keys refused)."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown condition(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def as_dict(self) -> dict:
        """The conditions set (what is stored)."""
        default = Conditions()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name) and f.name != "syntax"
        } | ({"syntax": self.syntax} if self.syntax != "glob" else {})

    def describe(self) -> str:
        """The conditions in words ("every study" when none)."""
        parts = []
        for name, value in self.as_dict().items():
            if name != "syntax":
                parts.append(f"{_label(name)} {value}")
        if parts and self.syntax == "regex":
            parts.append("(regular expressions)")
        return ", ".join(parts) or "always"

    def _series_conditions(self) -> bool:
        """Whether a study rule asks anything of a series (modality is the study's)."""
        return any(getattr(self, n) not in ("", None) for n in SERIES_CONDITIONS if n != "modality")

    def _pattern(self, pattern: str, value: str | None) -> bool:
        if not pattern:
            return True
        if self.syntax == "regex":
            return re.search(without_accents(pattern), fold(value), re.IGNORECASE) is not None
        return fnmatch.fnmatchcase(fold(value), fold(pattern))

    def matches_series(self, series: SeriesFacts, with_modality: bool) -> bool:
        """Whether ``series`` meets the series conditions (and the modality, if asked)."""
        wanted = _modalities(self.modality) if with_modality else set()
        if wanted and (series.modality or "").upper() not in wanted:
            return False
        return (
            self._pattern(self.body_part, series.body_part_examined)
            and self._pattern(self.series_description, series.series_description)
            and _within(series.slice_thickness, self.slice_thickness_min, self.slice_thickness_max)
            and _within(series.instance_count, self.series_size_min, self.series_size_max)
        )

    def matches_study(self, study: StudyFacts) -> bool:
        """Whether ``study`` meets every condition (series ones on one series)."""
        wanted = _modalities(self.modality)
        if wanted and not wanted & {m.upper() for m in study.modalities}:
            return False
        if not self._pattern(self.study_description, study.study_description):
            return False
        if self.calling_ae and not any(
            self._pattern(self.calling_ae, ae) for ae in study.calling_aes
        ):
            return False
        if self._series_conditions():
            return any(self.matches_series(s, with_modality=False) for s in study.series)
        return True


def _modalities(text: str) -> set[str]:
    return {m for m in re.split(r"[\s,\\]+", text.upper()) if m}


def _within(value: float | None, low: float | None, high: float | None) -> bool:
    if low is None and high is None:
        return True
    if value is None:
        return False  # a range asked, and the series does not say
    return (low is None or value >= low) and (high is None or value <= high)


def _label(name: str) -> str:
    return name.replace("_", " ")


@dataclass(frozen=True)
class Rule:
    """One routing rule: its kind, name, action and conditions."""

    kind: str
    name: str
    action: str
    conditions: Conditions = field(default_factory=Conditions)

    def __post_init__(self) -> None:
        if self.kind not in ACTIONS:
            raise ValueError(f"rule kind must be study or series, got {self.kind!r}")
        name = self.name.strip()
        if not name or len(name) > NAME_MAX_LENGTH:
            raise ValueError(f"a rule needs a name of 1 to {NAME_MAX_LENGTH} characters")
        object.__setattr__(self, "name", name)
        if self.action not in ACTIONS[self.kind]:
            choices = ", ".join(ACTIONS[self.kind])
            raise ValueError(f"rule {name!r}: action must be one of {choices}, got {self.action!r}")
        study_only = self.conditions.as_dict().keys() - {"syntax", *SERIES_CONDITIONS}
        if self.kind == SERIES and study_only:
            names = ", ".join(_label(n) for n in sorted(study_only))
            raise ValueError(f"series rule {self.name!r}: {names} is about the study, not a series")


DEFAULT_STUDY_RULES = (Rule(STUDY, "Analyse every study", ANALYZE),)
DEFAULT_SERIES_RULES = (Rule(SERIES, "Largest axial CT series", "largest"),)


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules see of one series."""

    series_instance_uid: str
    modality: str | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    slice_thickness: float | None = None
    instance_count: int = 0

    @classmethod
    def from_datasets(cls, datasets: Sequence[Dataset]) -> SeriesFacts:
        """The facts of a series from its instances' headers (the first one's values)."""
        first = datasets[0]
        return cls(
            str(first.SeriesInstanceUID),
            _text(first.get("Modality")),
            _text(first.get("SeriesDescription")),
            _text(first.get("BodyPartExamined")),
            _thickness(first.get("SliceThickness")),
            len(datasets),
        )


def _text(value) -> str | None:
    return str(value) if value not in (None, "") else None


def _thickness(value) -> float | None:
    try:
        return float(value[0] if isinstance(value, list | tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class StudyFacts:
    """What the study rules see of one study."""

    study_description: str | None = None
    modalities: frozenset[str] = frozenset()
    calling_aes: frozenset[str] = frozenset()
    series: tuple[SeriesFacts, ...] = ()


@dataclass(frozen=True)
class StudyDecision:
    """Whether a study is analysed, the rule that said so (None: no rule matched), why."""

    analyze: bool
    rule: Rule | None
    reason: str


def decide_study(rules: Sequence[Rule], study: StudyFacts) -> StudyDecision:
    """The first study rule ``study`` matches decides; none: the study is ignored."""
    for rule in rules:
        if rule.conditions.matches_study(study):
            verb = "sends it to analysis" if rule.action == ANALYZE else "ignores it"
            return StudyDecision(rule.action == ANALYZE, rule, f"routing rule {rule.name!r} {verb}")
    tried = ", ".join(repr(r.name) for r in rules) or "there are none"
    return StudyDecision(False, None, f"no routing rule matched (study rules: {tried})")


@dataclass(frozen=True)
class SeriesChoice:
    """The series chosen (its index among the candidates; None: none), by which rule, why."""

    index: int | None
    rule: Rule | None
    reason: str


def choose_series(rules: Sequence[Rule], candidates: Sequence[SeriesFacts]) -> SeriesChoice:
    """The first series rule that matches a candidate picks among those it matches."""
    for rule in rules:
        matching = [
            i
            for i, series in enumerate(candidates)
            if rule.conditions.matches_series(series, with_modality=True)
        ]
        if matching:
            index = _preferred(rule.action, matching, candidates)
            return SeriesChoice(index, rule, f"series rule {rule.name!r} chose the {rule.action}")
    tried = ", ".join(repr(r.name) for r in rules) or "there are none"
    return SeriesChoice(None, None, f"no series rule matched a series (series rules: {tried})")


def _preferred(action: str, matching: list[int], candidates: Sequence[SeriesFacts]) -> int:
    """Of equals, the first met (the largest: as the node always chose)."""
    size = {i: candidates[i].instance_count for i in matching}
    if action == "largest":
        return max(matching, key=lambda i: size[i])
    if action == "smallest":
        return min(matching, key=lambda i: size[i])
    thickness = {i: candidates[i].slice_thickness for i in matching}
    return min(  # thinnest; a series that does not say comes last, then the larger first
        matching, key=lambda i: (thickness[i] is None, thickness[i] or 0.0, -size[i])
    )


def series_chooser(rules: Sequence[Rule]) -> SeriesChooser:
    """The analysis' hook (:data:`node.analysis.analyze.SeriesChooser`) for ``rules``."""

    def choose(series: Sequence[Sequence[Dataset]]) -> tuple[int | None, str]:
        choice = choose_series(rules, [SeriesFacts.from_datasets(s) for s in series])
        return choice.index, choice.reason

    return choose


def options_with_rules(session: Session, settings: Settings) -> AnalysisOptions:
    """The settings' analysis options with the series rules in force choosing the series:
    what the workers, the viewer and the export all read."""
    chooser = series_chooser(load_rules(session, SERIES))
    return replace(AnalysisOptions.from_settings(settings), choose_series=chooser)


# --------------------------------------------------------------------------- database


def load_rules(session: Session, kind: str) -> list[Rule]:
    """The rules of ``kind`` in force, in order."""
    rows = session.scalars(
        select(RoutingRule)
        .where(RoutingRule.kind == kind)
        .order_by(RoutingRule.position, RoutingRule.id)
    )
    return [
        Rule(row.kind, row.name, row.action, Conditions.from_dict(row.conditions)) for row in rows
    ]


def save_rules(session: Session, kind: str, rules: Sequence[Rule], by: str) -> dict:
    """Replace the rules of ``kind`` with ``rules`` (caller commits); returns the audit
    detail: the rules before and after, in words."""
    before = [_summary(r) for r in load_rules(session, kind)]
    session.execute(delete(RoutingRule).where(RoutingRule.kind == kind))
    now = utcnow()
    session.add_all(
        RoutingRule(
            kind=kind,
            position=position,
            name=rule.name,
            action=rule.action,
            conditions=rule.conditions.as_dict(),
            updated_by=by,
            updated_at=now,
        )
        for position, rule in enumerate(rules, start=1)
    )
    session.flush()
    return {"kind": kind, "before": before, "after": [_summary(r) for r in rules]}


def _summary(rule: Rule) -> str:
    return f"{rule.name}: {rule.action} if {rule.conditions.describe()}"


def needs_facts(rules: Sequence[Rule]) -> bool:
    """Whether deciding with ``rules`` looks at the study at all."""
    return any(rule.conditions.as_dict() for rule in rules)


def study_facts(session: Session, study_id: int) -> StudyFacts:
    """What the study rules see of a stored study (its rows, never its files)."""
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study {study_id} does not exist")
    series = session.scalars(
        select(Series).where(Series.study_id == study_id).order_by(Series.id)
    ).all()
    aes = session.scalars(
        select(Instance.source_ae)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id, Instance.source_ae.is_not(None))
        .distinct()
    ).all()
    return StudyFacts(
        study.study_description,
        frozenset(m for m in (study.modalities or "").replace(",", "\\").split("\\") if m),
        frozenset(aes),
        tuple(series_facts(row) for row in series),
    )


def series_facts(row: Series) -> SeriesFacts:
    """What the rules see of a stored series row."""
    return SeriesFacts(
        row.series_instance_uid,
        row.modality,
        row.series_description,
        row.body_part_examined,
        row.slice_thickness,
        row.instance_count,
    )
