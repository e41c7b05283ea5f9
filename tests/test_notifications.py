"""Notifications against real receivers: a local HTTP server checking the HMAC signature and
a local SMTP server (aiosmtpd), each event made by the node's own code path."""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import json
import logging
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from node import phantom
from node.analysis.bundle import ModelBundle
from node.records import outbox
from node.records.db import Notification, Study, utcnow
from node.reporting import delivery
from node.runtime import build_node
from node.settings import DEMO_MODEL_DIR, Settings
from node.workflow import jobs, notifications, sweeper
from tests.peers import free_port
from tests.test_pipeline import ingest_files, stable
from tests.test_report import OBSERVER
from tests.test_report_delivery import ArchiveSCP

SECRET = "a-webhook-secret-of-the-site"
WEB_URL = "https://ainode.example.org/"


# ------------------------------------------------------------------ receivers the tests run


class WebhookReceiver:
    """An HTTP server that checks each POST's signature and answers the codes it is given in
    turn (then 200); with ``hold`` the first request waits until :meth:`release`."""

    def __init__(self, answers: list[int] | None = None, hold: bool = False) -> None:
        self.answers, self.requests = list(answers or []), []
        self.arrived, self.released = threading.Event(), threading.Event()
        if not hold:
            self.released.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                signed = hmac.compare_digest(self.headers.get("X-Ainode-Signature", ""), expected)
                receiver.requests.append((dict(self.headers), body, signed))
                first = len(receiver.requests) == 1
                receiver.arrived.set()
                if first:
                    receiver.released.wait(30)
                code = receiver.answers.pop(0) if receiver.answers else 200
                if not signed:
                    code = 401
                answer = f"answer {code}".encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/ainode"

    def documents(self) -> list[dict]:
        return [json.loads(body) for _, body, _ in self.requests]

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """An SMTP server (aiosmtpd) that answers each message with the replies it is given in
    turn (then 250) and keeps those it accepts."""

    def __init__(self, answers: list[str] | None = None) -> None:
        self.answers, self.messages = list(answers or []), []
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())
        self.controller.start()
        self.port = self.controller.port

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        answer = self.answers.pop(0) if self.answers else "250 Message accepted for delivery"
        if answer.startswith("250"):
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            self.messages.append((list(envelope.rcpt_tos), message))
        return answer

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def receiver(request):
    hook = WebhookReceiver(**getattr(request, "param", {}))
    yield hook
    hook.stop()


@pytest.fixture
def mailbox(request):
    box = Mailbox(**getattr(request, "param", {}))
    yield box
    box.stop()


# ------------------------------------------------------------------------------- the node


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return ModelBundle.load(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def covid_series(tmp_path_factory) -> list[Path]:
    spec = phantom.PhantomSpec(finding="covid", slices=16, seed=31)
    return phantom.write_series(spec, tmp_path_factory.mktemp("covid"))


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return phantom.write_series(
        phantom.PhantomSpec(slices=12, seed=33), tmp_path_factory.mktemp("s")
    )


def webhook(receiver: WebhookReceiver, **more) -> dict:
    return {"notify_webhook_url": receiver.url, "notify_webhook_secret": SECRET, **more}


def smtp(mailbox: Mailbox, **more) -> dict:
    return {
        "notify_smtp_host": "127.0.0.1",
        "notify_smtp_port": mailbox.port,
        "notify_email_from": "ainode@example.org",
        "notify_email_to": ["pacs-team@example.org", "radiology@example.org"],
        **more,
    }


def rows(node) -> list[Notification]:
    with node.session_factory() as session:
        return list(session.scalars(select(Notification).order_by(Notification.id)))


def row(node, notification_id: int) -> Notification:
    with node.session_factory() as session:
        return session.get(Notification, notification_id)


def failed_study(node, bundle, series) -> int:
    """A study whose every file is damaged on disk, analysed: it fails at once."""
    study_id = ingest_files(node, series)
    stable(node, study_id)
    with node.session_factory() as session:
        study = session.get(Study, study_id)
        keys = [i.store_key for s in study.series for i in s.instances]
    for key in keys:
        path = node.store.path(key)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert jobs.run_analysis(node, bundle, study_id) is None
    return study_id


# ----------------------------------------------------------------------------- the events


def test_a_covid_result_is_posted_signed_and_mailed(
    make_node, bundle, covid_series, receiver, mailbox
):
    node = make_node(
        **webhook(receiver), **smtp(mailbox), notify_covid_threshold=0.05, notify_web_url=WEB_URL
    )
    study_id = ingest_files(node, covid_series)
    stable(node, study_id)
    jobs.run_analysis(node, bundle, study_id)
    made = rows(node)
    assert [(n.event, n.channel, n.status) for n in made] == [
        ("covid_19_above_threshold", "webhook", "pending"),
        ("covid_19_above_threshold", "email", "pending"),
    ]
    # the sweeper hands them out; each is delivered once
    assert sweeper.due_work(node).notifications == [n.id for n in made]
    assert sweeper.due_work(node).notifications == []  # handed out: not again at once
    for n in made:
        assert notifications.deliver_notification(node, n.id) == "sent"
        assert notifications.deliver_notification(node, n.id) == "sent"  # a repeated message
    assert [(row(node, n.id).attempts, row(node, n.id).sent_at is not None) for n in made] == [
        (1, True),
        (1, True),
    ]

    ((headers, body, signed),) = receiver.requests
    assert signed
    assert headers["X-Ainode-Event"] == "covid_19_above_threshold"
    assert headers["X-Ainode-Delivery"] == str(made[0].id)
    document = json.loads(body)
    with node.session_factory() as session:
        study = session.get(Study, study_id)
    assert document["study"]["study_instance_uid"] == study.study_instance_uid
    assert document["study"]["status"] == "analyzed"
    assert document["study"]["url"] == f"https://ainode.example.org/studies/{study_id}"
    assert document["predicted_class"] == "Covid_19"
    assert document["probability"] >= 0.05 and document["threshold"] == 0.05
    # no patient data leaves the node unless a setting allows it
    for phi in ("PHANTOM^CHEST", "PH0001", "ACC0001", "patient_name"):
        assert phi not in body.decode()

    ((recipients, message),) = mailbox.messages
    assert recipients == ["pacs-team@example.org", "radiology@example.org"]
    assert message["Subject"].startswith("[AINODE] COVID-19 probability ")
    text = message.get_content()
    assert f"Study Instance UID: {study.study_instance_uid}" in text
    assert f"Web UI: https://ainode.example.org/studies/{study_id}" in text
    assert "PHANTOM" not in text and "PH0001" not in text


def test_a_result_below_the_threshold_or_switched_off_tells_no_one(
    make_node, bundle, covid_series, receiver
):
    node = make_node(**webhook(receiver), notify_events=["analysis_failed", "report_failed"])
    study_id = ingest_files(node, covid_series)
    stable(node, study_id)
    jobs.run_analysis(node, bundle, study_id)
    with node.session_factory() as session:
        # the same result against a threshold above it, with the event on
        on = node.settings.model_copy(update={"notify_events": ["covid_19_above_threshold"]})
        assert outbox.on_result(session, on, study_id, 1, "Covid_19", {"Covid_19": 0.7}, ("m", "1"))
        high = on.model_copy(update={"notify_covid_threshold": 0.9})
        assert not outbox.on_result(
            session, high, study_id, 1, "Covid_19", {"Covid_19": 0.7}, ("m", "1")
        )
        session.rollback()
    assert rows(node) == []


def test_a_failed_analysis_is_told_with_its_reason(make_node, bundle, series, receiver, mailbox):
    node = make_node(**webhook(receiver), **smtp(mailbox), notify_include_patient_data=True)
    study_id = failed_study(node, bundle, series)
    made = rows(node)
    assert [(n.event, n.study_id) for n in made] == [("analysis_failed", study_id)] * 2
    for n in made:
        assert notifications.deliver_notification(node, n.id) == "sent"
    (document,) = receiver.documents()
    assert document["study"]["status"] == "failed"
    assert document["study"]["status_reason"].startswith("no slice could be decoded")
    # the site allowed patient data: name, ID and accession number travel
    assert document["study"]["patient_name"] == "PHANTOM^CHEST"
    assert document["study"]["patient_id"] == "PH0001"
    assert document["study"]["accession_number"] == "ACC0001"
    ((_, message),) = mailbox.messages
    assert message["Subject"] == "[AINODE] analysis failed"
    assert "Status reason: no slice could be decoded" in message.get_content()


@pytest.mark.parametrize(
    ("status", "report_status", "events"),
    [(0xA900, "failed", ["report_failed"]), (0xA700, "retrying", [])],
)
def test_an_sr_delivery_that_fails_is_told_and_a_retrying_one_is_not(
    make_settings, bundle, series, receiver, status, report_status, events
):
    archive = ArchiveSCP(status=status)
    settings = make_settings(
        peers=[archive.peer],
        report_peer=archive.peer.name,
        notify_events=["report_failed"],
        **webhook(receiver),
    )
    node = build_node(settings, migrate=True)
    try:
        study_id = ingest_files(node, series)
        stable(node, study_id)
        report_id = jobs.run_analysis(node, bundle, study_id)
        try:
            outcome = delivery.deliver_report(node, report_id, OBSERVER)
        except delivery.ReportRetry:
            outcome = "retrying"
        assert outcome == report_status
        made = rows(node)
        assert [n.event for n in made] == events
        for n in made:
            assert notifications.deliver_notification(node, n.id) == "sent"
    finally:
        archive.stop()
        node.close()
    if events:
        (document,) = receiver.documents()
        assert document["summary"] == "SR delivery to archive failed"
        assert document["report_id"] == report_id and document["destination"] == "archive"
        assert "status 0xA900" in document["error"]
        assert document["study"]["status"] == "analyzed"  # the result stands, unreported


def test_an_sr_superseded_by_newer_images_is_not_told_as_a_failure(
    make_settings, bundle, series, receiver, tmp_path
):
    from tests.test_workflow_hardening import late_instance

    archive = ArchiveSCP()
    settings = make_settings(
        peers=[archive.peer],
        report_peer=archive.peer.name,
        notify_events=["report_failed"],
        **webhook(receiver),
    )
    node = build_node(settings, migrate=True)
    try:
        study_id = ingest_files(node, series)
        stable(node, study_id)
        report_id = jobs.run_analysis(node, bundle, study_id)
        node.ingestor.ingest_part10(late_instance(series, tmp_path), "TESTSCU")
        assert delivery.deliver_report(node, report_id, OBSERVER) == "failed"
        with node.session_factory() as session:
            assert session.get(delivery.Report, report_id).last_error.startswith("superseded")
        assert [n.event for n in rows(node)] == []
    finally:
        archive.stop()
        node.close()


def test_the_disk_guard_is_told_once_however_many_associations_it_refuses(
    make_node, receiver, caplog
):
    from node.dicom.scp import start_scp

    node = make_node(**webhook(receiver), min_free_disk_mb=10**12, notify_web_url=WEB_URL)
    server = start_scp(node.settings, node.ingestor)
    caplog.set_level(logging.ERROR, logger="node.dicom.scp")
    try:
        for _ in range(3):
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(CTImageStorage)
            ae.add_requested_context(Verification)
            association = ae.associate("127.0.0.1", node.settings.dicom_port)
            assert association.is_rejected
            deadline = time.monotonic() + 10  # the node's side has ended, handler and all
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not server.active_associations
    finally:
        server.shutdown()
    assert sum("MB threshold" in r.getMessage() for r in caplog.records) == 3
    (made,) = rows(node)
    assert (made.event, made.study_id) == ("disk_low", None)
    assert notifications.deliver_notification(node, made.id) == "sent"
    (document,) = receiver.documents()
    assert document["min_free_disk_mb"] == 10**12
    assert document["free_mb"] < 10**12
    assert document["refused_peer"].startswith("TESTSCU@127.0.0.1")
    assert document["summary"].startswith("associations refused: ")
    # after the quiet period, a refusal is told again
    later = utcnow() + timedelta(minutes=node.settings.notify_disk_low_every_minutes, seconds=1)
    with node.session_factory() as session, session.begin():
        assert outbox.on_disk_low(session, node.settings, 5, "TESTSCU@127.0.0.1", now=later)


# ------------------------------------------------------------------------- the deliveries


@pytest.mark.parametrize("receiver", [{"answers": [500]}], indirect=True)
def test_a_webhook_answering_500_is_retried_with_back_off_then_sent(
    make_node, bundle, series, receiver
):
    node = make_node(**webhook(receiver), notify_retry_seconds=30)
    failed_study(node, bundle, series)
    (made,) = rows(node)
    before = utcnow()
    assert notifications.deliver_notification(node, made.id) == "retrying"
    first = row(node, made.id)
    assert (first.attempts, first.last_error) == (
        1,
        f"webhook http://127.0.0.1:{receiver.server.server_port}: HTTP 500 (answer 500)",
    )
    assert timedelta(seconds=29) < first.next_attempt_at - before < timedelta(seconds=32)
    assert sweeper.due_work(node).notifications == []  # not due before its time
    assert sweeper.due_work(node, now=first.next_attempt_at).notifications == [made.id]
    assert notifications.deliver_notification(node, made.id) == "sent"
    second = row(node, made.id)
    assert (second.status, second.attempts, second.last_error) == ("sent", 2, None)
    (one, two) = receiver.requests
    assert one[2] and two[2]  # both signed
    assert one[1] == two[1]  # the same body, so the same signature
    assert one[0]["X-Ainode-Delivery"] == two[0]["X-Ainode-Delivery"] == str(made.id)


@pytest.mark.parametrize("receiver", [{"answers": [400]}], indirect=True)
def test_a_webhook_answering_400_fails_at_once(make_node, bundle, series, receiver):
    node = make_node(**webhook(receiver))
    failed_study(node, bundle, series)
    (made,) = rows(node)
    assert notifications.deliver_notification(node, made.id) == "failed"
    failed = row(node, made.id)
    assert (failed.attempts, failed.next_attempt_at) == (1, None)
    assert "HTTP 400 (answer 400)" in failed.last_error
    far = utcnow() + timedelta(days=30)
    assert sweeper.due_work(node, now=far).notifications == []
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("receiver", [{"answers": [503, 503]}], indirect=True)
def test_a_webhook_that_keeps_failing_is_given_up_after_its_attempts(
    make_node, bundle, series, receiver
):
    node = make_node(**webhook(receiver), notify_max_attempts=2)
    failed_study(node, bundle, series)
    (made,) = rows(node)
    assert notifications.deliver_notification(node, made.id) == "retrying"
    assert notifications.deliver_notification(node, made.id) == "failed"
    assert row(node, made.id).last_error.endswith(
        "HTTP 503 (answer 503) (gave up after 2 attempts)"
    )


@pytest.mark.parametrize("receiver", [{"hold": True}], indirect=True)
def test_a_webhook_that_does_not_answer_in_time_is_retried(make_node, bundle, series, receiver):
    node = make_node(**webhook(receiver), notify_webhook_timeout_seconds=0.5)
    failed_study(node, bundle, series)
    (made,) = rows(node)
    assert notifications.deliver_notification(node, made.id) == "retrying"
    assert row(node, made.id).last_error.endswith("no answer within 0.5 s")


def test_a_webhook_nobody_listens_on_is_retried(make_node, bundle, series):
    url = f"http://127.0.0.1:{free_port()}/hook"
    node = make_node(notify_webhook_url=url, notify_webhook_secret=SECRET)
    failed_study(node, bundle, series)
    (made,) = rows(node)
    assert notifications.deliver_notification(node, made.id) == "retrying"
    assert "ConnectionError" in row(node, made.id).last_error


@pytest.mark.parametrize("receiver", [{"hold": True}], indirect=True)
def test_two_deliveries_of_one_notification_at_once_send_it_once(
    make_node, bundle, series, receiver, database_url
):
    node = make_node(**webhook(receiver), database_url=database_url)
    failed_study(node, bundle, series)
    (made,) = rows(node)
    outcome = {}
    first = threading.Thread(
        target=lambda: outcome.update(first=notifications.deliver_notification(node, made.id))
    )
    first.start()
    assert receiver.arrived.wait(10)  # the first delivery is at the receiver, claim held
    assert notifications.deliver_notification(node, made.id) == "sending"  # the second: nothing
    receiver.release()
    first.join(10)
    assert outcome == {"first": "sent"}
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("mailbox", [{"answers": ["451 4.3.0 try again later"]}], indirect=True)
def test_a_mail_server_saying_later_is_retried_then_takes_the_mail(
    make_node, bundle, series, mailbox
):
    node = make_node(**smtp(mailbox))
    failed_study(node, bundle, series)
    (made,) = rows(node)
    assert notifications.deliver_notification(node, made.id) == "retrying"
    assert "451 4.3.0 try again later" in row(node, made.id).last_error
    assert mailbox.messages == []
    assert notifications.deliver_notification(node, made.id) == "sent"
    ((_, message),) = mailbox.messages
    assert message["Subject"] == "[AINODE] analysis failed"
    assert message["Message-ID"] == f"<ainode.notification.{made.id}@example.org>"


@pytest.mark.parametrize("mailbox", [{"answers": ["550 5.7.1 relaying denied"]}], indirect=True)
def test_a_mail_server_refusing_the_mail_fails_it_at_once(make_node, bundle, series, mailbox):
    node = make_node(**smtp(mailbox))
    failed_study(node, bundle, series)
    (made,) = rows(node)
    assert notifications.deliver_notification(node, made.id) == "failed"
    failed = row(node, made.id)
    assert failed.attempts == 1
    assert failed.last_error == f"SMTP 127.0.0.1:{mailbox.port}: 550 5.7.1 relaying denied"


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"notify_webhook_url": "https://hooks.example.org/x"}, "needs notify_webhook_secret"),
        (
            {"notify_webhook_url": "ftp://hooks.example.org/x", "notify_webhook_secret": SECRET},
            "notify_webhook_url must be an http:// or https:// URL",
        ),
        ({"notify_events": ["disk_full"]}, "notify_events: unknown ['disk_full']"),
        ({"notify_email_to": ["a@example.org"]}, "notify_smtp_host and notify_email_to go"),
        (
            {"notify_smtp_host": "mail", "notify_email_to": ["a@example.org"]},
            "notify_email_to needs notify_email_from",
        ),
        (
            {
                "notify_smtp_host": "mail",
                "notify_email_to": ["a@example.org"],
                "notify_email_from": "n@example.org",
                "notify_smtp_username": "node",
                "notify_smtp_password": "secret",
            },
            "needs notify_smtp_security starttls or tls",
        ),
        ({"notify_covid_threshold": 1.5}, "less than or equal to 1"),
    ],
)
def test_notification_settings_that_cannot_work_are_refused(tmp_path, values, message):
    with pytest.raises(ValueError) as info:
        Settings(data_dir=tmp_path, **values)
    assert message in str(info.value)


def test_secrets_do_not_show_in_the_settings(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        notify_webhook_url="https://hooks.example.org/x",
        notify_webhook_secret=SECRET,
    )
    assert SECRET not in repr(settings)


# -------------------------------------------------------------------------- end to end


def test_serve_hands_a_notification_to_its_worker_which_posts_it(make_settings, tmp_path):
    """`ainode serve` (its own workers, SQLite broker): the disk guard refuses an association,
    the sweeper hands the notification to the report queue, a worker posts it."""
    from tests.config import write_config
    from tests.peers import wait_for_port
    from tests.test_analysis_e2e import NodeProcesses, wait_until

    hook = WebhookReceiver()
    settings = make_settings(min_free_disk_mb=10**12)
    config = write_config(settings, tmp_path / "ainode.toml")
    with config.open("a") as out:  # the secret as an administrator writes it
        out.write(f'notify_webhook_url = "{hook.url}"\nnotify_webhook_secret = "{SECRET}"\n')
    procs = NodeProcesses(config, tmp_path)
    try:
        procs.start("serve", "serve")
        wait_for_port("127.0.0.1", settings.dicom_port, 60)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", settings.dicom_port).is_rejected
        wait_until(lambda: hook.requests, 120, "the webhook POST", procs.logs)
    finally:
        procs.stop_all()
        hook.stop()
    ((headers, body, signed),) = hook.requests
    assert signed and headers["X-Ainode-Event"] == "disk_low"
    assert json.loads(body)["refused_peer"].startswith("TESTSCU@")
