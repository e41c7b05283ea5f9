"""Report delivery: the one owner of a Report's state (pending → sending → sent, retrying,
failed).

Opening a report for a result, claiming it for one delivery at a time, sending its SR,
recording the outcome with the one retry policy, and a re-send asked for by a person all go
through here; the workers' task, the sweeper and the web UI call these functions and never
change a Report row themselves.

A study's reports form a chain: each report after the first replaces the study's latest
sent report (``Report.replaces_report_id``), and its SR's Predecessor Documents Sequence
references that SR. A report is superseded, and never sent, once the study is analysed
again or a radiologist's correction is opened after it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.analysis.result import ModelIdentity, SliceResult, StudyResult
from node.records import lifecycle, outbox
from node.records.db import (
    Analysis,
    Instance,
    Report,
    ReportKind,
    ReportStatus,
    Study,
    StudyStatus,
    Verdict,
    utcnow,
)
from node.reporting.chain import latest_sent_report, observer_name, report_kind
from node.settings import Settings

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
S = StudyStatus
MAX_RETRY_DELAY = 3600.0  # seconds: the back-off stops growing at an hour


class ReportRetry(RuntimeError):
    """A transient delivery failure inside the retry window: try again after ``delay`` s."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class NoDestination(ValueError):
    """No report destination is configured (no ``report_peer`` and not exactly one peer)."""


def retry_delay(settings: Settings, failures: int) -> float:
    """Seconds before the next attempt after ``failures`` failed ones (exponential, capped):
    the one retry policy, counted by ``Report.retries``, for ``report_retry_hours`` from the
    first failure."""
    return min(settings.report_retry_seconds * 2 ** max(failures - 1, 0), MAX_RETRY_DELAY)


def open_report(
    session: Session,
    analysis_id: int,
    settings: Settings,
    *,
    verdict: Verdict | None = None,
    due_at: datetime | None = None,
) -> Report:
    """A new pending report of an analysis to the configured destination (its SR's UIDs are
    fixed now, so every re-send is the same instance).

    It replaces the study's latest sent report, if any; its kind says why it was made: the
    study's first result, a re-analysis (an earlier analysis of the study finished), or a
    radiologist's correction (``verdict``). ``due_at`` hands it to the dispatcher's next
    pass (a report opened outside a worker, which has no task to send it)."""
    destination = settings.report_destination
    if destination is None:
        raise NoDestination("no report destination is configured (set report_peer, or one peer)")
    study_id = session.scalar(select(Analysis.study_id).where(Analysis.id == analysis_id))
    kind = report_kind(session, analysis_id, verdict)
    replaced = latest_sent_report(session, study_id)
    report = Report(
        analysis_id=analysis_id,
        sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        destination=destination.name,
        method=settings.report_method,
        status=ReportStatus.PENDING,
        retries=0,
        kind=kind,
        replaces_report_id=replaced.id if replaced is not None else None,
        verdict_id=verdict.id if verdict is not None else None,
        due_at=due_at,
    )
    session.add(report)
    session.flush()
    return report


def open_correction(session: Session, verdict: Verdict, settings: Settings) -> Report | None:
    """Write a radiologist's correction back: a new report whose SR states the corrected
    finding and replaces the study's latest sent SR, due at the dispatcher's next pass.
    None when the site does not write corrections back (``report_corrections``), the
    verdict agrees, or no destination is configured."""
    if not settings.report_corrections or verdict.corrected_class is None:
        return None
    if settings.report_destination is None or verdict.analysis_id is None:
        return None
    return open_report(session, verdict.analysis_id, settings, verdict=verdict, due_at=utcnow())


def resend(session: Session, report: Report, now: datetime | None = None) -> None:
    """Make a report due again at once (a person asked): pending, its retries and error
    cleared; the dispatcher hands it to the report queue at its next pass. A report being
    sent right now is left to that delivery."""
    if report.status == ReportStatus.SENDING:
        return
    report.status = ReportStatus.PENDING
    report.retries = 0
    report.last_error = None
    report.sent_at = None
    report.next_retry_at = None
    report.failing_since = None
    report.due_at = now or utcnow()
    session.flush()


def due_reports(
    session: Session, now: datetime, stale: datetime, lost_send: datetime | None = None
) -> list[int]:
    """Reports to hand to the queue now, marked as handed out (pending or retrying ones
    that are due, and those whose queued message is older than ``stale``: lost). A report
    claimed for sending before ``lost_send`` lost its worker: it is retrying, due now."""
    if lost_send is not None:
        session.execute(
            update(Report)
            .where(Report.status == ReportStatus.SENDING, Report.claimed_at <= lost_send)
            .values(status=ReportStatus.RETRYING, claimed_at=None, due_at=now)
        )
    reports = list(
        session.scalars(
            select(Report.id).where(
                Report.status.in_([ReportStatus.PENDING, ReportStatus.RETRYING]),
                (Report.due_at <= now)
                # the task layer retries on time; this catches retries the broker lost
                | (Report.next_retry_at.is_(None) & (Report.created_at <= stale))
                | (Report.next_retry_at <= stale),
            )
        )
    )
    for report_id in reports:
        session.execute(
            update(Report)
            .where(Report.id == report_id)
            .values(next_retry_at=None, created_at=now, due_at=None)
        )
    return reports


def study_result(node: Node, analysis_id: int) -> tuple[StudyResult, list, Study, Report | None]:
    """Rebuild a stored analysis as a StudyResult, with the evaluated instance headers."""
    with node.session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        study = session.get(Study, analysis.study_id)
        rows = analysis.slices
        keys = {
            i.sop_instance_uid: (i.store_key, i.series.series_instance_uid, i.sop_class_uid)
            for i in session.scalars(
                select(Instance).where(
                    Instance.sop_instance_uid.in_({r.sop_instance_uid for r in rows})
                )
            )
        }
        classes = tuple(analysis.probabilities)
        slices = tuple(
            SliceResult(
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=keys[r.sop_instance_uid][1],
                sop_class_uid=keys[r.sop_instance_uid][2],
                frame=r.frame,
                probabilities=tuple(r.probabilities[c] for c in classes),
            )
            for r in rows
        )
        headers = [
            dcmread(node.store.path(key), stop_before_pixels=True)
            for key, _series, _cls in keys.values()
        ]
        demo = analysis.model_demo
        result = StudyResult(
            classes=classes,
            probabilities=tuple(analysis.probabilities[c] for c in classes),
            predicted_class=analysis.predicted_class,
            rule=analysis.rule,
            slices=slices,
            model=ModelIdentity(analysis.model_name, analysis.model_version, demo=demo),
            **stored_assessment(analysis.assessment),
        )
        return result, headers, study, None


def stored_assessment(stored: dict | None) -> dict:
    """``StudyResult``'s trust fields from ``Analysis.assessment`` (empty for older rows)."""
    stored = stored or {}
    raw = stored.get("raw_probabilities")
    return {
        "raw_probabilities": tuple(raw) if raw is not None else None,
        "decision": stored.get("decision"),
        "ood": stored.get("ood"),
        "key_slices": tuple(stored.get("key_slices") or ()),
    }


def deliver_report(node: Node, report_id: int, observer) -> str:
    """Claim a report, build its SR and send it; records the outcome; returns the status.

    One delivery of a report at a time: the claim moves it to ``sending`` with a conditional
    UPDATE, so a second call meanwhile (a repeated message, the sweeper) does nothing.
    Raises :class:`ReportRetry` after recording a transient failure inside the retry
    window, so the task layer schedules the next attempt.
    """
    from node.reporting.sr import (
        ReportError,
        SendError,
        build_sr,
        send_sr_dimse,
        send_sr_stow,
    )

    report = _claim(node, report_id)
    if report is None:
        with node.session_factory() as session:
            current = session.get(Report, report_id)
            return current.status if current else "unknown"
    claim = report.claimed_at, report.id
    try:
        peer = node.settings.peer(report.destination)
    except ValueError as exc:
        return _record_failure(node, claim, False, f"report peer no longer configured: {exc}")
    reason = _superseded(node, report)
    if reason is not None:
        # not a failure a person must act on: the newer result is reported
        return _record_failure(node, claim, False, f"superseded: {reason}", notify=False)
    try:
        result, headers, study, _ = study_result(node, report.analysis_id)
        predecessor, correction = _revision(node, claim, study)
        sr = build_sr(
            headers,
            result,
            observer,
            sop_instance_uid=report.sop_instance_uid,
            series_instance_uid=report.series_instance_uid,
            predecessor=predecessor,
            correction=correction,
        )
        # a correction states the radiologist's finding: the model's maps are not sent with it
        images = _heatmap_images(node, report, result, observer) if correction is None else []
        if report.method == "stow":
            refused = send_sr_stow(sr, peer, images=images)
        else:
            refused = send_sr_dimse(sr, node.settings, peer, images)
        for reason in refused:  # the SR is the report: an image refused is only logged
            log.warning(
                "report %d: heatmap image not stored by %s: %s", report.id, peer.name, reason
            )
    except ReportError as exc:
        return _record_failure(node, claim, False, f"the SR cannot be built: {exc}")
    except SendError as exc:
        return _record_failure(node, claim, exc.transient, str(exc))
    except Exception as exc:  # a stored file gone, a database hiccup: retried in the window
        log.exception("SR delivery %d failed unexpectedly", report_id)
        return _record_failure(node, claim, True, f"{type(exc).__name__}: {exc}")
    with node.session_factory() as session, session.begin():
        _finish(
            session,
            claim,
            status=ReportStatus.SENT,
            sent_at=utcnow(),
            last_error=None,
            next_retry_at=None,
            failing_since=None,
        )
        lifecycle.move_where(session, study.id, {S.ANALYZED}, S.REPORTED)
    log.info(
        "SR %s for study %s sent to %s",
        report.sop_instance_uid,
        study.study_instance_uid,
        report.destination,
    )
    return ReportStatus.SENT


def _heatmap_images(node: Node, report: Report, result: StudyResult, observer) -> list:
    """The key slices' heatmap Secondary Captures to send with the SR (``report_heatmaps``);
    none, logged, when they cannot be made: the SR goes without them."""
    from pydicom.errors import InvalidDicomError

    from node.analysis.analyze import AnalysisOptions
    from node.reporting.heatmap_sc import build_heatmap_images

    if not node.settings.report_heatmaps:
        return []
    wanted = {
        result.slices[int(key["position"])].sop_instance_uid
        for key in result.key_slices
        if key.get("heatmap")
    }
    if not wanted:
        return []
    options = AnalysisOptions.from_settings(node.settings)
    try:
        with node.session_factory() as session:
            stored = session.execute(
                select(Instance.sop_instance_uid, Instance.store_key).where(
                    Instance.sop_instance_uid.in_(wanted)
                )
            ).all()
        sources = {uid: dcmread(node.store.path(key)) for uid, key in stored}
        return build_heatmap_images(
            result,
            sources,
            observer,
            sr_sop_instance_uid=report.sop_instance_uid,
            window=options.window,
            limits=options.limits,
        )
    except (ValueError, OSError, InvalidDicomError) as exc:  # HeatmapImageError is a ValueError
        log.warning("report %d: the SR goes without heatmap images (%s)", report.id, exc)
        return []


def _claim(node: Node, report_id: int) -> Report | None:
    """Move a pending or retrying report to ``sending`` (atomic); None when it is not."""
    with node.session_factory() as session, session.begin():
        claimed = session.execute(
            update(Report)
            .where(
                Report.id == report_id,
                Report.status.in_([ReportStatus.PENDING, ReportStatus.RETRYING]),
            )
            .values(status=ReportStatus.SENDING, claimed_at=utcnow())
        ).rowcount
        return session.get(Report, report_id) if claimed == 1 else None


def _finish(session: Session, claim: tuple[datetime, int], **values) -> bool:
    """Record the outcome of the delivery that holds ``claim`` (its claim time and the
    report's id); False when the sweeper took the report back meanwhile."""
    claimed_at, report_id = claim
    done = session.execute(
        update(Report)
        .where(
            Report.id == report_id,
            Report.status == ReportStatus.SENDING,
            Report.claimed_at == claimed_at,
        )
        .values(claimed_at=None, **values)
    ).rowcount
    if done != 1:
        log.warning("SR delivery %d: taken back meanwhile; outcome not recorded", report_id)
    return done == 1


def _superseded(node: Node, report: Report) -> str | None:
    """Why this report must not be sent, or None: the study is analysed again after its
    analysis (more images arrived, or a person asked), so the new run reports; or a
    radiologist's correction was opened after it, and that report states the finding."""
    analysis_id = report.analysis_id
    with node.session_factory() as session:
        study_id = session.scalar(select(Analysis.study_id).where(Analysis.id == analysis_id))
        newer = session.scalar(
            select(Analysis.id).where(Analysis.study_id == study_id, Analysis.id > analysis_id)
        )
        status = session.scalar(select(Study.status).where(Study.id == study_id))
        if newer is not None or status in (S.RECEIVING, S.STABLE, S.QUEUED, S.ANALYZING):
            return "the study is analysed again (more images arrived, or a re-analysis)"
        correction = session.scalar(
            select(Report.id)
            .join(Analysis, Report.analysis_id == Analysis.id)
            .where(
                Analysis.study_id == study_id,
                Report.id > report.id,
                Report.kind == ReportKind.CORRECTION,
            )
        )
        if correction is not None:
            return "a radiologist's correction of the result replaces this report"
        return None


def _revision(node: Node, claim: tuple[datetime, int], study: Study):
    """The SR a report replaces and, for a correction, the radiologist's finding.

    A report opened while the SR it replaces was still on its way records that SR at its
    first delivery, once it is sent; the recorded predecessor never changes afterwards.
    Raises :class:`~node.reporting.sr.ReportError` when the correction's verdict is gone.
    """
    from node.reporting.sr import Correction, Predecessor, ReportError

    with node.session_factory() as session, session.begin():
        report = session.get(Report, claim[1])
        replaced = None
        if report.replaces_report_id is not None:
            replaced = session.get(Report, report.replaces_report_id)
        elif report.sent_at is None:
            replaced = latest_sent_report(session, study.id, before_report_id=report.id)
            if replaced is not None:
                session.execute(
                    update(Report)
                    .where(
                        Report.id == report.id,
                        Report.status == ReportStatus.SENDING,
                        Report.claimed_at == claim[0],
                        Report.replaces_report_id.is_(None),
                    )
                    .values(replaces_report_id=replaced.id)
                )
        predecessor = None
        if replaced is not None:
            predecessor = Predecessor(
                study_instance_uid=study.study_instance_uid,
                series_instance_uid=replaced.series_instance_uid,
                sop_instance_uid=replaced.sop_instance_uid,
            )
        if report.kind != ReportKind.CORRECTION:
            return predecessor, None
        verdict = session.get(Verdict, report.verdict_id) if report.verdict_id else None
        if verdict is None or verdict.corrected_class is None:
            raise ReportError("the radiologist's verdict this correction states is gone")
        try:
            correction = Correction(
                corrected_class=verdict.corrected_class,
                observer_name=observer_name(session, verdict.username),
                login_name=verdict.username,
            )
        except ValueError as exc:
            raise ReportError(str(exc)) from exc
        return predecessor, correction


def _record_failure(
    node: Node, claim: tuple[datetime, int], transient: bool, error: str, notify: bool = True
) -> str:
    """Record a failed delivery: retrying while transient and inside ``report_retry_hours``
    of the first failure (then :class:`ReportRetry` is raised), else failed (and, with
    ``notify``, the ``report_failed`` notification in the same commit)."""
    settings = node.settings
    now = utcnow()
    report_id = claim[1]
    with node.session_factory() as session, session.begin():
        report = session.get(Report, report_id)
        retries = report.retries + 1
        failing_since = report.failing_since or now
        hours = settings.report_retry_hours
        delay = None
        if transient and now - failing_since < timedelta(hours=hours):
            delay = retry_delay(settings, retries)
            status, next_retry_at = ReportStatus.RETRYING, now + timedelta(seconds=delay)
        else:
            status, next_retry_at = ReportStatus.FAILED, None
            if transient:
                error = f"{error} (gave up after {retries} attempts over {hours:g} h)"
        recorded = _finish(
            session,
            claim,
            status=status,
            retries=retries,
            last_error=error[:1024],
            failing_since=failing_since,
            next_retry_at=next_retry_at,
        )
        if recorded and notify and status is ReportStatus.FAILED:
            study_id = session.scalar(
                select(Analysis.study_id).where(Analysis.id == report.analysis_id)
            )
            outbox.on_report_failed(
                session,
                settings,
                report_id,
                study_id,
                report.destination,
                report.sop_instance_uid,
                retries,
                error,
            )
    if not recorded:
        return ReportStatus.SENDING
    log.warning("SR delivery %d: %s (%s)", report_id, error, status)
    if delay is not None:
        raise ReportRetry(error, delay)
    return status
