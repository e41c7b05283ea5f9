"""A study's chain of reports: why each was made, which sent SR a new one replaces, and
who a radiologist's correction names (read-only queries; delivery owns the rows)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.records.db import (
    Analysis,
    AnalysisStatus,
    Report,
    ReportKind,
    ReportStatus,
    User,
    Verdict,
)


def report_kind(session: Session, analysis_id: int, verdict: Verdict | None) -> ReportKind:
    """A radiologist's correction (``verdict``), a re-analysis (an earlier analysis of the
    study finished), or the study's first model result."""
    if verdict is not None:
        return ReportKind.CORRECTION
    study_id = select(Analysis.study_id).where(Analysis.id == analysis_id).scalar_subquery()
    earlier = session.scalar(
        select(Analysis.id)
        .where(
            Analysis.study_id == study_id,
            Analysis.id < analysis_id,
            Analysis.status == AnalysisStatus.DONE,
        )
        .limit(1)
    )
    return ReportKind.REANALYSIS if earlier is not None else ReportKind.MODEL


def latest_sent_report(
    session: Session, study_id: int, before_report_id: int | None = None
) -> Report | None:
    """The study's newest sent report (older than ``before_report_id``): the SR a new one
    replaces."""
    query = (
        select(Report)
        .join(Analysis, Report.analysis_id == Analysis.id)
        .where(Analysis.study_id == study_id, Report.status == ReportStatus.SENT)
    )
    if before_report_id is not None:
        query = query.where(Report.id < before_report_id)
    return session.scalars(query.order_by(Report.id.desc()).limit(1)).first()


def report_chain(session: Session, study_id: int) -> list[Report]:
    """Every report of a study, newest first (the web UI shows them as the chain)."""
    return list(
        session.scalars(
            select(Report)
            .join(Analysis, Report.analysis_id == Analysis.id)
            .where(Analysis.study_id == study_id)
            .order_by(Report.id.desc())
        )
    )


def observer_name(session: Session, username: str) -> str:
    """The person observer's name (PN) for a user: their full name, else the user name; a
    name without components is one (family) name, which the trailing caret says."""
    full_name = session.scalar(select(User.full_name).where(User.username == username))
    name = (full_name or username).replace("\\", " ").strip()[:63]
    return name if "^" in name else f"{name}^"
