"""The queries every reader of results shares: a study's latest analysis and its latest SR
(the web UI's study page and re-send, ``ainode studies``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.records.db import Analysis, AnalysisStatus, Report


def latest_analysis(session: Session, study_id: int, done: bool = False) -> Analysis | None:
    """The newest analysis of a study (the newest finished one with ``done``)."""
    query = select(Analysis).where(Analysis.study_id == study_id)
    if done:
        query = query.where(Analysis.status == AnalysisStatus.DONE)
    return session.scalars(query.order_by(Analysis.id.desc()).limit(1)).first()


def latest_report(session: Session, analysis: Analysis | None) -> Report | None:
    """The newest SR of an analysis."""
    if analysis is None:
        return None
    return session.scalars(
        select(Report).where(Report.analysis_id == analysis.id).order_by(Report.id.desc()).limit(1)
    ).first()
