"""Notification delivery: the outbox's rows (:mod:`node.records.outbox`) sent by webhook or
e-mail, one delivery of a row at a time, retried with exponential back-off.

The sweeper hands due rows to the report queue (:func:`due_notifications`); a worker's task
calls :func:`deliver_notification`, which claims the row with a conditional UPDATE (a
repeated message, or a second process, finds it taken and sends nothing), makes one attempt
and records its outcome on the row: ``sent``, ``retrying`` at ``next_attempt_at``, or
``failed`` with the reason. A network failure, a timeout, HTTP 5xx/408/425/429 or an SMTP
4xx reply is retried up to ``notify_max_attempts``; any other refusal fails at once.

Webhook: a JSON POST whose body is signed with HMAC-SHA256 under ``notify_webhook_secret``
(header ``X-Ainode-Signature: sha256=<hex>``); ``X-Ainode-Delivery`` is the row's id, the
same on every attempt, so a receiver can drop a repeat. E-mail: plain text through
:mod:`smtplib`, with STARTTLS or implicit TLS and a login when configured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import ssl
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import requests
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.records.db import Notification, NotificationStatus, utcnow
from node.settings import Settings

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
N = NotificationStatus
SIGNATURE_HEADER = "X-Ainode-Signature"
EVENT_HEADER = "X-Ainode-Event"
DELIVERY_HEADER = "X-Ainode-Delivery"
MAX_RETRY_DELAY = 3600.0  # seconds: the back-off stops growing at an hour
TRANSIENT_HTTP = frozenset({408, 425, 429})  # 4xx answers that mean "later", not "never"


class DeliveryError(RuntimeError):
    """One attempt failed; ``transient`` when trying again later may succeed."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=`` and the HMAC-SHA256 in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay(settings: Settings, attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (doubling, capped)."""
    return min(settings.notify_retry_seconds * 2 ** max(attempts - 1, 0), MAX_RETRY_DELAY)


def lease_seconds(settings: Settings) -> float:
    """How long a claimed row may stay ``sending`` before its process is taken for lost:
    well beyond what one attempt can last (an SMTP dialogue is several timed reads)."""
    return 10 * max(settings.notify_webhook_timeout_seconds, settings.notify_smtp_timeout_seconds)


def due_notifications(session: Session, settings: Settings, now: datetime) -> list[int]:
    """Rows to hand to the queue now; their ``next_attempt_at`` moves on by
    ``requeue_after_seconds``, so a message the broker loses is handed out again then. A row
    claimed longer than :func:`lease_seconds` ago lost its process: it is due again now."""
    lost = now - timedelta(seconds=lease_seconds(settings))
    session.execute(
        update(Notification)
        .where(Notification.status == N.SENDING, Notification.claimed_at <= lost)
        .values(status=N.RETRYING, claimed_at=None, next_attempt_at=now)
    )
    due = [N.PENDING, N.RETRYING]
    ids = list(
        session.scalars(
            select(Notification.id)
            .where(Notification.status.in_(due), Notification.next_attempt_at <= now)
            .order_by(Notification.id)
        )
    )
    if ids:
        session.execute(
            update(Notification)
            .where(Notification.id.in_(ids))
            .values(next_attempt_at=now + timedelta(seconds=settings.requeue_after_seconds))
        )
    return ids


def deliver_notification(node: Node, notification_id: int) -> str:
    """Claim a row, make one attempt on its channel and record the outcome; returns the
    row's status (that of the row as it is when another delivery holds it or it is done)."""
    settings = node.settings
    row = _claim(node, notification_id)
    if row is None:
        with node.session_factory() as session:
            current = session.get(Notification, notification_id)
            return current.status if current else "unknown"
    try:
        if row.channel == "webhook":
            send_webhook(settings, row.id, row.payload)
        elif row.channel == "email":
            send_email(settings, row.id, row.payload)
        else:
            raise DeliveryError(f"unknown channel {row.channel!r}", transient=False)
    except DeliveryError as exc:
        return _record(node, row, exc.transient, str(exc))
    except Exception as exc:  # a bug must not leave the row claimed: retried, then failed
        log.exception("notification %d (%s) failed unexpectedly", row.id, row.channel)
        return _record(node, row, True, f"{type(exc).__name__}: {exc}")
    return _record(node, row, None, None)


def _claim(node: Node, notification_id: int) -> Notification | None:
    """Move a pending or retrying row to ``sending`` (atomic); None when it is not."""
    with node.session_factory() as session, session.begin():
        claimed = session.execute(
            update(Notification)
            .where(
                Notification.id == notification_id, Notification.status.in_([N.PENDING, N.RETRYING])
            )
            .values(status=N.SENDING, claimed_at=utcnow())
        ).rowcount
        return session.get(Notification, notification_id) if claimed == 1 else None


def _record(node: Node, row: Notification, transient: bool | None, error: str | None) -> str:
    """Record one attempt's outcome (``transient`` None: sent), only while this delivery still
    holds the claim (the sweeper may have taken a stalled one back)."""
    settings = node.settings
    now = utcnow()
    attempts = row.attempts + 1
    values: dict = {"attempts": attempts, "claimed_at": None}
    if transient is None:
        values |= {"status": N.SENT, "sent_at": now, "next_attempt_at": None, "last_error": error}
    elif transient and attempts < settings.notify_max_attempts:
        delay = retry_delay(settings, attempts)
        values |= {
            "status": N.RETRYING,
            "next_attempt_at": now + timedelta(seconds=delay),
            "last_error": error[:1024],
        }
    else:
        if transient:
            error = f"{error} (gave up after {attempts} attempts)"
        values |= {"status": N.FAILED, "next_attempt_at": None, "last_error": error[:1024]}
    with node.session_factory() as session, session.begin():
        done = session.execute(
            update(Notification)
            .where(
                Notification.id == row.id,
                Notification.status == N.SENDING,
                Notification.claimed_at == row.claimed_at,
            )
            .values(**values)
        ).rowcount
    if done != 1:
        log.warning("notification %d: taken back meanwhile; outcome not recorded", row.id)
        return N.SENDING
    status = values["status"]
    if status is N.SENT:
        log.info("notification %d (%s, %s) sent", row.id, row.event, row.channel)
    else:
        log.warning(
            "notification %d (%s, %s): %s (%s)", row.id, row.event, row.channel, error, status
        )
    return status


# ------------------------------------------------------------------------------ webhook


def webhook_body(notification_id: int, payload: dict) -> bytes:
    """The JSON the webhook receives (the bytes that are signed)."""
    document = {"id": notification_id, **payload}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def send_webhook(settings: Settings, notification_id: int, payload: dict) -> None:
    """POST the payload, signed; raises :class:`DeliveryError` unless the receiver answers 2xx."""
    url = settings.notify_webhook_url
    if not url or settings.notify_webhook_secret is None:
        raise DeliveryError("no webhook configured (notify_webhook_url)", transient=False)
    where = "{0.scheme}://{0.netloc}".format(urlparse(url))  # never the path: it may hold a token
    body = webhook_body(notification_id, payload)
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "ainode-notifications",
        SIGNATURE_HEADER: sign(settings.notify_webhook_secret.get_secret_value(), body),
        EVENT_HEADER: payload.get("event", ""),
        DELIVERY_HEADER: str(notification_id),
    }
    timeout = settings.notify_webhook_timeout_seconds
    try:
        answer = requests.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        )
    except requests.Timeout as exc:
        raise DeliveryError(f"webhook {where}: no answer within {timeout:g} s", True) from exc
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as exc:
        raise DeliveryError(f"webhook {where}: {exc}", transient=False) from exc
    except requests.RequestException as exc:
        raise DeliveryError(f"webhook {where}: {type(exc).__name__}: {exc}", True) from exc
    code = answer.status_code
    if 200 <= code < 300:
        return
    said = " ".join(answer.text.split())[:200]
    message = f"webhook {where}: HTTP {code}" + (f" ({said})" if said else "")
    if 300 <= code < 400:
        message += "; redirects are not followed: configure the final URL"
    raise DeliveryError(message, transient=code >= 500 or code in TRANSIENT_HTTP)


# ------------------------------------------------------------------------------- e-mail

_LABELS = {"study_instance_uid": "Study Instance UID", "url": "Web UI", "sr_sop_instance_uid": "SR"}


def email_message(settings: Settings, notification_id: int, payload: dict) -> EmailMessage:
    """The plain-text e-mail of a notification: the summary as its subject, then the facts."""
    message = EmailMessage()
    message["Subject"] = f"[{payload.get('node', settings.ae_title)}] {payload.get('summary', '')}"
    message["From"] = settings.notify_email_from
    message["To"] = ", ".join(settings.notify_email_to)
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = (settings.notify_email_from or "ainode").rpartition("@")[2] or "ainode"
    # the same on every attempt: a mail system that got it once may drop the repeat
    message["Message-ID"] = f"<ainode.notification.{notification_id}@{domain}>"
    lines = [payload.get("summary", ""), ""]
    facts = {k: v for k, v in payload.items() if k not in ("summary", "study")}
    facts |= payload.get("study") or {}
    for key, value in facts.items():
        if value is None or value == "":
            continue
        if isinstance(value, dict):
            value = " ".join(str(v) for v in value.values())
        label = _LABELS.get(key, key.replace("_", " ").capitalize())
        lines.append(f"{label}: {value}")
    lines += ["", f"Notification {notification_id}, sent by the node {settings.ae_title}."]
    message.set_content("\n".join(lines) + "\n")
    return message


def send_email(settings: Settings, notification_id: int, payload: dict) -> None:
    """Send the e-mail; raises :class:`DeliveryError` (transient on 4xx replies and network
    failures, else not) unless the server accepts it for at least one recipient."""
    host, port = settings.notify_smtp_host, settings.notify_smtp_port
    if not host or not settings.notify_email_to:
        raise DeliveryError("no e-mail configured (notify_smtp_host)", transient=False)
    where = f"SMTP {host}:{port}"
    message = email_message(settings, notification_id, payload)
    try:
        refused = _smtp_send(settings, message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        said = "; ".join(f"{who}: {code}" for who, (code, _) in exc.recipients.items())
        transient = all(400 <= code < 500 for code in codes)
        raise DeliveryError(f"{where}: every recipient refused ({said})", transient) from exc
    except smtplib.SMTPResponseException as exc:
        text = (
            exc.smtp_error.decode(errors="replace")
            if isinstance(exc.smtp_error, bytes)
            else exc.smtp_error
        )
        transient = not 500 <= exc.smtp_code < 600
        raise DeliveryError(f"{where}: {exc.smtp_code} {text}", transient) from exc
    except smtplib.SMTPNotSupportedError as exc:
        raise DeliveryError(f"{where}: {exc}", transient=False) from exc
    except ssl.SSLCertVerificationError as exc:
        raise DeliveryError(f"{where}: TLS certificate not trusted: {exc}", False) from exc
    except (smtplib.SMTPException, OSError) as exc:  # disconnected, refused, timed out
        raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}", transient=True) from exc
    if refused:
        log.warning(
            "notification %d: %s refused some recipients: %s",
            notification_id,
            where,
            ", ".join(f"{who} ({code})" for who, (code, _) in refused.items()),
        )


def _smtp_send(settings: Settings, message: EmailMessage) -> dict:
    """One SMTP dialogue: connect (implicit TLS or STARTTLS), log in, send; the recipients
    the server refused (the others got it)."""
    host, port = settings.notify_smtp_host, settings.notify_smtp_port
    timeout = settings.notify_smtp_timeout_seconds
    context = ssl.create_default_context()
    if settings.notify_smtp_security == "tls":
        client = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(host, port, timeout=timeout)
    with client:
        if settings.notify_smtp_security == "starttls":
            client.starttls(context=context)
        if settings.notify_smtp_username and settings.notify_smtp_password is not None:
            client.login(
                settings.notify_smtp_username, settings.notify_smtp_password.get_secret_value()
            )
        return client.send_message(message)
