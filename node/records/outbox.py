"""The notification outbox: what the node tells people about, recorded with its cause.

An event (a study classified COVID-19 above ``notify_covid_threshold``, an analysis or an SR
delivery that failed, the disk guard refusing associations) becomes one
:class:`~node.records.db.Notification` row per configured channel, added by the caller in
the transaction of the state change that caused it: committed together, so an event is
neither lost (a crash after the change) nor doubled (a change made once is emitted once).
:mod:`node.workflow.notifications` delivers the rows.

A notification leaves the node. It carries the study's UID, status, result and a link to
its web UI page; patient name, patient ID, accession number, study date and description
only when ``notify_include_patient_data`` allows.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from node.records.db import Notification, NotificationStatus, Study, utcnow
from node.settings import NOTIFY_EVENTS, Settings

COVID_19 = "Covid_19"  # the class whose probability the threshold applies to
COVID_EVENT, ANALYSIS_FAILED, REPORT_FAILED, DISK_LOW = NOTIFY_EVENTS


def channels(settings: Settings) -> list[str]:
    """The channels configured: ``webhook`` and/or ``email``."""
    configured = []
    if settings.notify_webhook_url:
        configured.append("webhook")
    if settings.notify_smtp_host and settings.notify_email_to:
        configured.append("email")
    return configured


def wanted(settings: Settings, event: str) -> bool:
    """Whether ``event`` is switched on and has somewhere to go."""
    return event in settings.notify_events and bool(channels(settings))


def emit(
    session: Session,
    settings: Settings,
    event: str,
    summary: str,
    study_id: int | None = None,
    now: datetime | None = None,
    **detail,
) -> list[Notification]:
    """Add the rows of one event (one per channel; none when it is off); caller commits.

    ``summary`` is the one line people read first (the e-mail's subject); ``detail`` goes
    into the payload as it is (JSON values, no patient data).
    """
    if event not in NOTIFY_EVENTS:
        raise ValueError(f"unknown notification event {event!r}")
    if not wanted(settings, event):
        return []
    now = now or utcnow()
    payload = {
        "event": event,
        "summary": summary,
        "node": settings.ae_title,
        "occurred_at": now.isoformat(),
        "study": _study(session, settings, study_id) if study_id is not None else None,
        **detail,
    }
    rows = [
        Notification(
            event=event,
            channel=channel,
            study_id=study_id,
            payload=payload,
            status=NotificationStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        for channel in channels(settings)
    ]
    session.add_all(rows)
    return rows


def _study(session: Session, settings: Settings, study_id: int) -> dict:
    """What a notification says about a study, read in the caller's transaction (after its
    change, so the status is the new one)."""
    study = session.scalars(
        select(Study).where(Study.id == study_id).execution_options(populate_existing=True)
    ).one()
    block = {
        "study_instance_uid": study.study_instance_uid,
        "status": study.status,
        "status_reason": study.status_reason,
        "modalities": study.modalities,
        "url": (
            f"{settings.notify_web_url.rstrip('/')}/studies/{study.id}"
            if settings.notify_web_url
            else None
        ),
    }
    if settings.notify_include_patient_data:
        block |= {
            "patient_name": study.patient_name,
            "patient_id": study.patient_id,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "study_description": study.study_description,
        }
    return block


def on_result(
    session: Session,
    settings: Settings,
    study_id: int,
    analysis_id: int,
    predicted_class: str,
    probabilities: dict[str, float],
    model: tuple[str, str],
) -> list[Notification]:
    """A study's result was recorded: the COVID-19 event when the study is classified
    COVID-19 with a probability at or above ``notify_covid_threshold``."""
    probability = float(probabilities.get(COVID_19, 0.0))
    threshold = settings.notify_covid_threshold
    if predicted_class != COVID_19 or probability < threshold:
        return []
    return emit(
        session,
        settings,
        COVID_EVENT,
        f"COVID-19 probability {probability:.2f} (threshold {threshold:.2f})",
        study_id,
        analysis_id=analysis_id,
        predicted_class=predicted_class,
        probability=round(probability, 4),
        threshold=threshold,
        model={"name": model[0], "version": model[1]},
    )


def on_analysis_failed(
    session: Session, settings: Settings, study_id: int, analysis_id: int | None = None
) -> list[Notification]:
    """A study moved to ``failed`` (its reason is the study's ``status_reason``)."""
    return emit(
        session,
        settings,
        ANALYSIS_FAILED,
        "analysis failed",
        study_id,
        analysis_id=analysis_id,
    )


def on_report_failed(
    session: Session,
    settings: Settings,
    report_id: int,
    study_id: int,
    destination: str,
    sop_instance_uid: str,
    attempts: int,
    error: str,
) -> list[Notification]:
    """An SR delivery ended ``failed``: the PACS will not get it unless a person acts."""
    return emit(
        session,
        settings,
        REPORT_FAILED,
        f"SR delivery to {destination} failed",
        study_id,
        report_id=report_id,
        destination=destination,
        sr_sop_instance_uid=sop_instance_uid,
        attempts=attempts,
        error=error[:1024],
    )


def on_disk_low(
    session: Session, settings: Settings, free_mb: int, peer: str, now: datetime | None = None
) -> list[Notification]:
    """The disk guard refused an association: one event per ``notify_disk_low_every_minutes``
    however many the PACS tries meanwhile (caller serialises concurrent calls)."""
    now = now or utcnow()
    since = now - timedelta(minutes=settings.notify_disk_low_every_minutes)
    recent = session.scalar(
        select(exists().where(Notification.event == DISK_LOW, Notification.created_at > since))
    )
    if recent:
        return []
    threshold = settings.min_free_disk_mb
    return emit(
        session,
        settings,
        DISK_LOW,
        f"associations refused: {free_mb} MB free in the store, below {threshold} MB",
        now=now,
        free_mb=free_mb,
        min_free_disk_mb=threshold,
        refused_peer=peer,
    )
