"""Retention of received pixel data: what may go, and removing it.

The policy (off unless the site sets it: how long a hospital keeps images is its decision)
-----------------------------------------------------------------------------------------
- A study ``reported`` (its SR delivered) more than ``retention_days`` ago loses its pixel
  data. Its rows, results, per-slice predictions, verdicts, labels, reports and SRs stay;
  each instance file is replaced by its header (everything before Pixel Data), so an SR
  can still be rebuilt, re-sent or revised, and the web UI still shows the study.
  ``Instance.removed_at``, ``Study.pixels_removed_at`` and ``Study.pixels_removed_bytes``
  record what went and what it freed (:func:`freed_bytes_total`).
- When the store's free disk is below ``retention_min_free_disk_mb``, reported studies go
  oldest report first, whatever their age, until the free space is back above it.
- Neither ever takes a protected study:

  * *being analysed*: only ``reported`` studies are considered, so a study receiving,
    stable, queued, analysing (or analysed, failed, ignored, suspended) is never taken;
    the claim is a conditional UPDATE on that status, so one reopened meanwhile stays;
  * *labelled for training and not yet exported*: a label whose keyword maps to a class
    (plain tags and exclude keywords do not), until a finished export job (done, or done
    and since expired) created after the study's newest label selected one of its labels;
  * *under review*: (1) the SR of its latest result is not delivered (a report pending,
    sending, retrying or failed — a person may still re-send or re-analyse), or (2) a
    radiologist corrected its latest result less than ``retention_review_days`` ago:
    a disagreement is discussed and often becomes a training label, and the people
    involved look at the images.

The lifecycle's sweeper runs :func:`run_retention` every ``retention_interval_seconds``;
``ainode retention [--dry-run]`` runs it (or lists what it would take) at once. Each run
also removes temporary files a crash left in the store (unfinished writes, spooled
datasets) not touched for :data:`ORPHAN_AGE`. Logs name studies by UID, never a patient.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from node.ingest.store import StoreError
from node.records import audit
from node.records.db import (
    Analysis,
    AnalysisStatus,
    ExportJob,
    ExportStatus,
    Instance,
    Label,
    Report,
    ReportStatus,
    Series,
    Study,
    StudyStatus,
    Verdict,
    utcnow,
)
from node.records.export import LabelFilter
from node.records.labels import effective_keyword_classes

if TYPE_CHECKING:
    from node.runtime import Node
    from node.settings import Settings

log = logging.getLogger(__name__)

REMOVED = "pixel data removed by retention"
ORPHAN_AGE = timedelta(hours=1)  # no write or receive leaves its temporary untouched this long
MB = 2**20
LIFECYCLE = "lifecycle"  # the audit trail's name for the sweeper's runs
STUDIES_PER_PASS = 10  # the sweeper's share: its lifecycle passes must not wait long
EXPORTED = (ExportStatus.DONE, ExportStatus.EXPIRED)
UNDELIVERED = (
    ReportStatus.PENDING,
    ReportStatus.SENDING,
    ReportStatus.RETRYING,
    ReportStatus.FAILED,
)


REPORTED_WITH_PIXELS = select(Study.id).where(
    Study.status == StudyStatus.REPORTED, Study.pixels_removed_at.is_(None)
)


def removed_reason(removed_at: datetime) -> str:
    """What a refused re-analysis, a skipped export or the viewer says about such a study."""
    return f"{REMOVED} on {removed_at:%Y-%m-%d}"


@dataclass(frozen=True)
class Candidate:
    """A study whose pixel data the policy takes, and why."""

    study_id: int
    study_instance_uid: str
    study_date: str | None
    reported_at: datetime
    size_bytes: int  # its stored instance files, as received
    why: str


@dataclass
class RetentionRun:
    """What one run took (or, dry, would take)."""

    dry_run: bool
    studies: list[Candidate] = field(default_factory=list)
    freed_bytes: int = 0  # by the studies' pixel data (dry: their stored size)
    orphans: int = 0
    orphan_bytes: int = 0
    more: bool = False  # ``max_studies`` stopped it: more studies are due

    @property
    def total_bytes(self) -> int:
        return self.freed_bytes + self.orphan_bytes


def active(settings: Settings) -> bool:
    """Whether the site set a retention policy (days, a free-disk floor, or both)."""
    return settings.retention_days is not None or settings.retention_min_free_disk_mb is not None


def run_retention(
    node: Node,
    now: datetime | None = None,
    dry_run: bool = False,
    max_studies: int | None = None,
    actor: str = LIFECYCLE,
) -> RetentionRun:
    """Remove the pixel data the policy takes (at most ``max_studies`` studies, oldest
    report first), and the store's orphan temporaries. ``actor`` is who the audit trail
    names for each study (the lifecycle, or the person at the command line)."""
    now = now or utcnow()
    run = RetentionRun(dry_run)
    if not dry_run:
        _finish_interrupted(node)
    run.studies = candidates(node, now)
    if max_studies is not None and len(run.studies) > max_studies:
        run.studies, run.more = run.studies[:max_studies], True
    for candidate in run.studies:
        if dry_run:
            run.freed_bytes += candidate.size_bytes
        else:
            run.freed_bytes += remove_pixel_data(node, candidate, now, actor)
    # files' times are the real clock's, whatever ``now`` a caller judges ages by
    orphan_before = time.time() - ORPHAN_AGE.total_seconds()
    for path, size in node.store.orphan_temporaries(orphan_before):
        if not dry_run:
            path.unlink(missing_ok=True)
        run.orphans += 1
        run.orphan_bytes += size
    if run.orphans and not dry_run:
        log.info(
            "retention: %d orphan temporary files removed (%d bytes)", run.orphans, run.orphan_bytes
        )
    return run


def candidates(node: Node, now: datetime) -> list[Candidate]:
    """The studies the policy takes now, oldest report first."""
    settings = node.settings
    if not active(settings):
        return []
    with node.session_factory() as session:
        rows = session.execute(
            select(Study.id, Study.study_instance_uid, Study.study_date, Study.status_changed_at)
            .where(Study.status == StudyStatus.REPORTED, Study.pixels_removed_at.is_(None))
            .order_by(Study.status_changed_at, Study.id)
        ).all()
        kept = protected(session, settings, REPORTED_WITH_PIXELS, now)
        sizes = _stored_sizes(session, REPORTED_WITH_PIXELS)
    taken: list[Candidate] = []
    free = node.store.free_bytes() if settings.retention_min_free_disk_mb is not None else None
    floor = (settings.retention_min_free_disk_mb or 0) * MB
    for row in rows:
        if row.id in kept:
            continue
        why = _why(settings, now, row.status_changed_at, free, floor)
        if why is None:
            continue
        size = sizes.get(row.id, 0)
        uid, reported_at = row.study_instance_uid, row.status_changed_at
        taken.append(Candidate(row.id, uid, row.study_date, reported_at, size, why))
        if free is not None:
            free += size  # what removing it gives back (less its headers)
    return taken


def _why(settings, now, reported_at, free: int | None, floor: int) -> str | None:
    days = settings.retention_days
    if days is not None and reported_at <= now - timedelta(days=days):
        age = (now - reported_at).total_seconds() / 86400
        return f"reported {age:.0f} days ago (retention_days {days:g})"
    if free is not None and free < floor:
        return (
            f"free disk {free // MB} MB below retention_min_free_disk_mb "
            f"{settings.retention_min_free_disk_mb}"
        )
    return None


def protected(session: Session, settings: Settings, study_ids: Select, now: datetime) -> dict:
    """Of the studies ``study_ids`` selects (a query, not a list: a node holds more studies
    than a statement takes parameters), those a protection keeps: id → the protection."""
    kept: dict[int, str] = {}
    for study_id in _unexported_training_labels(session, settings, study_ids):
        kept[study_id] = "labelled for training, not yet exported"
    for study_id in _under_review(session, settings, study_ids, now):
        kept.setdefault(study_id, "under review")
    return kept


def _unexported_training_labels(
    session: Session, settings: Settings, study_ids: Select
) -> set[int]:
    mapping = effective_keyword_classes(settings, session)
    training = {k.strip().casefold() for k, c in mapping.items() if c is not None}
    labels: dict[int, list[Label]] = {}
    for label in session.scalars(select(Label).where(Label.study_id.in_(study_ids))):
        labels.setdefault(label.study_id, []).append(label)
    labelled = {
        study_id: found
        for study_id, found in labels.items()
        if any(label.keyword.strip().casefold() in training for label in found)
    }
    if not labelled:
        return set()
    jobs = session.scalars(select(ExportJob).where(ExportJob.status.in_(EXPORTED))).all()
    return {
        study_id
        for study_id, found in labelled.items()
        if not any(_exported_by(job, found) for job in jobs)
    }


def _exported_by(job: ExportJob, labels: Iterable[Label]) -> bool:
    """Whether a finished export job, created after every label, selected the study."""
    labels = list(labels)
    if job.created_at < max(label.created_at for label in labels):
        return False
    parameters = job.parameters or {}
    selection = LabelFilter.of(
        parameters.get("selection"), _day(parameters.get("since")), _day(parameters.get("until"))
    )
    return any(selection.selects(label.keyword, label.created_at) for label in labels)


def _day(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def _under_review(
    session: Session, settings: Settings, study_ids: Select, now: datetime
) -> set[int]:
    latest = (
        select(Analysis.study_id, func.max(Analysis.id).label("analysis_id"))
        .where(Analysis.study_id.in_(study_ids), Analysis.status == AnalysisStatus.DONE)
        .group_by(Analysis.study_id)
        .subquery()
    )
    last_report = (
        select(Report.analysis_id, func.max(Report.id).label("report_id"))
        .group_by(Report.analysis_id)
        .subquery()
    )
    undelivered = session.scalars(
        select(latest.c.study_id)
        .join(last_report, last_report.c.analysis_id == latest.c.analysis_id)
        .join(Report, Report.id == last_report.c.report_id)
        .where(Report.status.in_(UNDELIVERED))
    ).all()
    corrected = session.scalars(
        select(Verdict.study_id)
        .join(latest, latest.c.analysis_id == Verdict.analysis_id)
        .where(
            Verdict.agrees.is_(False),
            Verdict.at > now - timedelta(days=settings.retention_review_days),
        )
    ).all()
    return set(undelivered) | set(corrected)


def _stored_sizes(session: Session, study_ids: Select) -> dict[int, int]:
    return dict(
        session.execute(
            select(Series.study_id, func.coalesce(func.sum(Instance.size_bytes), 0))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(study_ids), Instance.removed_at.is_(None))
            .group_by(Series.study_id)
        ).all()
    )


def remove_pixel_data(node: Node, candidate: Candidate, now: datetime, actor: str) -> int:
    """Claim a study for removal, then strip its instance files; returns the bytes freed.
    ``now`` is the clock the protections are judged by; the removal is stamped with the
    real time (what it covers: the instances received before it).

    The claim is a committed conditional UPDATE: still ``reported`` since the same time,
    nothing removed yet, and no protection gained meanwhile. A study taken back (an
    instance arrived, a re-analysis) or protected since is left alone (0 bytes).
    """
    with node.session_factory() as session, session.begin():
        this_study = select(Study.id).where(Study.id == candidate.study_id)
        if candidate.study_id in protected(session, node.settings, this_study, now):
            return 0
        removed_at = utcnow()
        claimed = session.execute(
            update(Study)
            .where(
                Study.id == candidate.study_id,
                Study.status == StudyStatus.REPORTED,
                Study.status_changed_at == candidate.reported_at,
                Study.pixels_removed_at.is_(None),
            )
            .values(pixels_removed_at=removed_at, pixels_removed_bytes=0)
        ).rowcount
        if claimed == 1:
            audit.record(session, actor, "retention", candidate.study_id, why=candidate.why)
    if claimed != 1:
        log.info("retention: study %s changed meanwhile; kept", candidate.study_instance_uid)
        return 0
    instances, freed = _strip_study(node, candidate.study_id)
    log.info(
        "retention: study %s pixel data removed (%d instances, %d bytes freed; %s)",
        candidate.study_instance_uid,
        instances,
        freed,
        candidate.why,
    )
    return freed


def _finish_interrupted(node: Node) -> None:
    """Strip what a run that died half-way left of the studies it had claimed."""
    with node.session_factory() as session:
        unfinished = session.execute(
            select(Study.id, Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(
                Study.pixels_removed_at.is_not(None),
                Instance.removed_at.is_(None),
                Instance.received_at <= Study.pixels_removed_at,
            )
            .distinct()
        ).all()
    for study_id, uid in unfinished:
        instances, freed = _strip_study(node, study_id)
        log.info("retention: study %s finished (%d instances, %d bytes)", uid, instances, freed)


def _strip_study(node: Node, study_id: int) -> tuple[int, int]:
    """Strip the pixel data of a claimed study's instances received before its claim."""
    with node.session_factory() as session:
        claimed_at = session.scalar(select(Study.pixels_removed_at).where(Study.id == study_id))
        rows = session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.store_key)
            .join(Series, Instance.series_id == Series.id)
            .where(
                Series.study_id == study_id,
                Instance.removed_at.is_(None),
                Instance.received_at <= claimed_at,
            )
            .order_by(Instance.id)
        ).all()
    freed = 0
    for instance_id, sop_instance_uid, key in rows:
        gained = _strip_file(node, sop_instance_uid, key)
        with node.session_factory() as session, session.begin():
            session.execute(
                update(Instance).where(Instance.id == instance_id).values(removed_at=claimed_at)
            )
            session.execute(
                update(Study)
                .where(Study.id == study_id)
                .values(pixels_removed_bytes=func.coalesce(Study.pixels_removed_bytes, 0) + gained)
            )
        freed += gained
    return len(rows), freed


def _strip_file(node: Node, sop_instance_uid: str, key: str) -> int:
    """Replace a stored file by its header (all before Pixel Data); the bytes freed. A file
    whose header cannot be re-read or written goes whole (logged)."""
    path = node.store.path(key)
    try:
        before = path.stat().st_size
    except FileNotFoundError:
        return 0
    try:
        header = dcmread(path, stop_before_pixels=True)
        out = io.BytesIO()
        header.save_as(out)  # as it was read: preamble, File Meta, transfer syntax
        data = out.getvalue()
        if len(data) >= before:
            return 0  # nothing followed the header: no pixel data to remove
        node.store.write(key, [data])
    except (InvalidDicomError, ValueError, TypeError, EOFError, StoreError) as exc:
        log.warning(
            "retention: instance %s header not kept (%s); file removed whole",
            sop_instance_uid,
            type(exc).__name__,
        )
        node.store.remove(key)
        return before
    return before - len(data)


def pixels_removed_at(session: Session, study_id: int) -> datetime | None:
    """When retention removed the study's pixel data (None: it has it)."""
    return session.scalar(select(Study.pixels_removed_at).where(Study.id == study_id))


def freed_bytes_total(session: Session) -> int:
    """Bytes of pixel data retention freed so far, over every study (for the metrics)."""
    return int(session.scalar(select(func.coalesce(func.sum(Study.pixels_removed_bytes), 0))))
