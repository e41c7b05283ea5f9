"""Database: typed SQLAlchemy models for studies, series and instances, and the engine factory."""

from __future__ import annotations

import enum
import os
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    """Timezone-aware now in UTC (every stored time is UTC)."""
    return datetime.now(UTC)


class StudyStatus(enum.StrEnum):
    """The study lifecycle (ARCHITECTURE.md); only ``node.records.lifecycle`` moves it."""

    RECEIVING = "receiving"
    STABLE = "stable"
    QUEUED = "queued"
    ANALYZING = "analyzing"
    ANALYZED = "analyzed"
    REPORTED = "reported"
    FAILED = "failed"
    IGNORED = "ignored"  # stable, but no routing rule sends it to the model (forceable)
    SUSPENDED = "suspended"  # a person paused it; resumed to ``suspended_from``


class UTCDateTime(TypeDecorator):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use node.db.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Study(Base):
    """One DICOM study as received, with its lifecycle status."""

    __tablename__ = "study"
    __table_args__ = (
        CheckConstraint(
            "status IN ('receiving','stable','queued','analyzing','analyzed','reported','failed',"
            "'ignored','suspended')",
            name="ck_study_status",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # Received values are Text: a PACS sends over-long and non-conforming values (UUID
    # UIDs, 40-character accession numbers) and each must be stored, never refused.
    study_instance_uid: Mapped[str] = mapped_column(Text, unique=True, index=True)
    patient_id: Mapped[str | None] = mapped_column(Text)
    patient_name: Mapped[str | None] = mapped_column(Text)
    study_date: Mapped[str | None] = mapped_column(Text, index=True)
    study_time: Mapped[str | None] = mapped_column(Text)
    accession_number: Mapped[str | None] = mapped_column(Text)
    study_description: Mapped[str | None] = mapped_column(Text)
    modalities: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.RECEIVING, index=True)
    status_reason: Mapped[str | None] = mapped_column(String(1024))
    suspended_from: Mapped[str | None] = mapped_column(String(16))  # the status to resume to
    retries: Mapped[int] = mapped_column(Integer, default=0)
    # analysis runs abandoned since the study was last queued afresh (lifecycle.abandon_run)
    analysis_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # retention (node.workflow.retention): when its pixel data was removed, and the bytes freed
    pixels_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pixels_removed_bytes: Mapped[int | None] = mapped_column(BigInteger)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    """One series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(Text, unique=True, index=True)
    modality: Mapped[str | None] = mapped_column(Text)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(Text)
    # as the series' first instance sent them: what the routing rules look at
    body_part_examined: Mapped[str | None] = mapped_column(Text)
    slice_thickness: Mapped[float | None] = mapped_column(Float)  # mm
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance; its file is in the instance store under ``store_key``."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(Text, unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(Text)
    transfer_syntax_uid: Mapped[str] = mapped_column(Text)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    store_key: Mapped[str] = mapped_column(String(255))  # InstanceStore.key_for: short
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source_ae: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # retention removed its pixel data (the file keeps the header only: SRs can be rebuilt)
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="instances")


class RoutingRule(Base):
    """One routing rule (``node.records.routing``): a study rule decides whether a stable
    study is analysed, a series rule which of its series; each kind is tried in ``position``
    order and the first that matches decides."""

    __tablename__ = "routing_rule"
    __table_args__ = (CheckConstraint("kind IN ('study','series')", name="ck_routing_rule_kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(16))  # study: analyze/ignore; series: prefer
    conditions: Mapped[dict] = mapped_column(JSON, default=dict)
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AnalysisStatus(enum.StrEnum):
    """One analysis attempt: running, done, failed, or abandoned by a worker that died."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ABANDONED = "abandoned"


class Analysis(Base):
    """One run of the model over a study: who, when, how long each stage took, the answer."""

    __tablename__ = "analysis"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default=AnalysisStatus.RUNNING, index=True)
    error: Mapped[str | None] = mapped_column(String(2048))
    worker: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the worker is alive
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    rule: Mapped[str | None] = mapped_column(String(32))
    predicted_class: Mapped[str | None] = mapped_column(String(32))
    probabilities: Mapped[dict | None] = mapped_column(JSON)
    slices_evaluated: Mapped[int] = mapped_column(Integer, default=0)
    instances_skipped: Mapped[dict] = mapped_column(JSON, default=dict)
    # StudyResult.assessment(): raw (uncalibrated) study probabilities, how the class was
    # decided (operating point), the out-of-distribution assessment, the key slices
    assessment: Mapped[dict] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    # the study is unlike the model's training data (assessment["ood"]["flagged"])
    outside_experience: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false"), index=True
    )

    slices: Mapped[list[SlicePrediction]] = relationship(
        back_populates="analysis", order_by="SlicePrediction.position"
    )


class SlicePrediction(Base):
    """The model's probabilities for one evaluated slice (one frame of one instance)."""

    __tablename__ = "slice_prediction"

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(
        ForeignKey("analysis.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(Text)  # as received, as Instance's
    frame: Mapped[int | None] = mapped_column(Integer)
    probabilities: Mapped[dict] = mapped_column(JSON)

    analysis: Mapped[Analysis] = relationship(back_populates="slices")


class ReportStatus(enum.StrEnum):
    """Delivery of one SR to the PACS."""

    PENDING = "pending"
    SENDING = "sending"  # claimed by one worker (Report.claimed_at) until it records the outcome
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"


class ReportKind(enum.StrEnum):
    """Why a report was made: its SR replaces the study's last sent SR unless it is the first."""

    MODEL = "model"  # the model's result, the study's first report
    REANALYSIS = "reanalysis"  # the model's result of a later analysis (new images, new model)
    CORRECTION = "correction"  # a radiologist's corrected finding, written back


class Report(Base):
    """One DICOM SR for an analysis and its delivery state (kept here, not only in the broker)."""

    __tablename__ = "report"

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(
        ForeignKey("analysis.id", ondelete="CASCADE"), index=True
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default=ReportStatus.PENDING, index=True)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a re-send asked for
    last_error: Mapped[str | None] = mapped_column(String(1024))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # while ``sending``
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)  # first failure of a run
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(
        String(16), default=ReportKind.MODEL, server_default=text("'model'")
    )
    # when the report was made (``created_at`` is re-stamped each time it is handed out)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow)
    # the sent report whose SR this one's Predecessor Documents Sequence references
    replaces_report_id: Mapped[int | None] = mapped_column(
        ForeignKey("report.id", ondelete="SET NULL"), index=True
    )
    # the radiologist's verdict a correction states
    verdict_id: Mapped[int | None] = mapped_column(ForeignKey("verdict.id", ondelete="SET NULL"))


class Label(Base):
    """A keyword a radiologist put on a study or on one of its series (the training labels).

    A series-level label overrides the study's labels for that series. Keywords map to
    classes through ``Settings.keyword_classes``; unmapped keywords are kept as plain tags.
    """

    __tablename__ = "label"
    __table_args__ = (UniqueConstraint("study_id", "series_id", "keyword", name="uq_label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int | None] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), index=True
    )
    keyword: Mapped[str] = mapped_column(String(64), index=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class ModelActivation(Base):
    """Which model bundle the workers serve: the newest row wins; older rows are the history."""

    __tablename__ = "model_activation"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    activated_by: Mapped[str] = mapped_column(String(128))
    activated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class UserRole(enum.StrEnum):
    """What a web UI user may do: radiologists review and label, admins also manage."""

    RADIOLOGIST = "radiologist"
    ADMIN = "admin"


class User(Base):
    """A person who signs in to the web UI (password stored only as a salted hash)."""

    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    full_name: Mapped[str] = mapped_column(String(128), default="")
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default=UserRole.RADIOLOGIST)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SignInThrottle(Base):
    """Failed sign-ins counted per client address or per user name (``node.records.sign_in``):
    past a free number, the next attempt must wait until ``blocked_until``."""

    __tablename__ = "sign_in_throttle"

    key: Mapped[str] = mapped_column(String(160), primary_key=True)  # address:… or user:…
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    blocked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Worker(Base):
    """A worker process as last seen (its heartbeat): what the dashboard and metrics show."""

    __tablename__ = "worker"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)  # host:pid
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str] = mapped_column(String(255))  # comma-separated
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class ScpStat(Base):
    """What the storage SCP counts that leaves no other row (``node.records.scp_stats``):
    instances refused and associations rejected by reason (counters), associations open and
    the SCP listening (gauges), so that whichever process serves /metrics reads them."""

    __tablename__ = "scp_stat"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64), primary_key=True, default="")
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEvent(Base):
    """Who did what, when and from which client address: sign-ins, reads of patient data,
    labels, verdicts, exports, uploads, re-sends and account changes (visible to admins)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("study.id", ondelete="SET NULL"), index=True
    )
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    client_address: Mapped[str | None] = mapped_column(String(64), index=True)  # None: CLI


class Verdict(Base):
    """A radiologist's agreement with, or correction of, an analysis result."""

    __tablename__ = "verdict"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    analysis_id: Mapped[int | None] = mapped_column(
        ForeignKey("analysis.id", ondelete="SET NULL"), index=True
    )
    username: Mapped[str] = mapped_column(String(64))
    agrees: Mapped[bool] = mapped_column(Boolean)
    corrected_class: Mapped[str | None] = mapped_column(String(32))
    comment: Mapped[str] = mapped_column(String(1024), default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class KeywordClass(Base):
    """An admin's keyword → training class mapping (overrides Settings.keyword_classes when
    any row exists); ``class_name`` None excludes the study from exports."""

    __tablename__ = "keyword_class"

    keyword: Mapped[str] = mapped_column(String(64), primary_key=True)
    class_name: Mapped[str | None] = mapped_column(String(32))
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExportStatus(enum.StrEnum):
    """An export job run from the web UI."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"  # done, then its files deleted after ``export_retention_days``


class ExportJob(Base):
    """One export of labelled studies, run in the background, with progress and counts."""

    __tablename__ = "export_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=ExportStatus.QUEUED, index=True)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    folder: Mapped[str | None] = mapped_column(String(1024))
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # handed out / heartbeat
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


def make_engine(url: str) -> Engine:
    """An engine for ``url`` whose errors never carry a stored value (patient names, IDs):
    the statement's parameters are hidden, and PostgreSQL's DETAIL (the failing row, the
    conflicting key) is dropped from the error text. SQLite gets WAL, a busy timeout and
    full durability, and its file is made private (0600; its -wal and -shm follow it)."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:" and not path.startswith("file:"):
            _private_database_file(Path(path))
        engine = create_engine(
            url, hide_parameters=True, connect_args={"timeout": 30, "check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(
            url, hide_parameters=True, pool_pre_ping=True, pool_size=10, max_overflow=20
        )
    event.listen(engine, "handle_error", _without_values)
    return engine


def describe(exc: DBAPIError) -> str:
    """One line on a database error for a log or a stored reason: the driver's error class
    and its first line (SQLSTATE message or connection failure), with no value in it."""
    orig = exc.orig if exc.orig is not None else exc
    first = (str(orig).strip().splitlines() or [""])[0]
    return f"{type(orig).__name__}: {first}" if first else type(orig).__name__


def _without_values(context) -> None:
    """``handle_error``: keep only the server's primary message in the driver's error and in
    SQLAlchemy's (PostgreSQL's DETAIL line lists the failing row: patient data)."""
    orig = context.original_exception
    primary = getattr(getattr(orig, "diag", None), "message_primary", None)
    if not primary or not orig.args or primary == str(orig):
        return
    orig.args = (primary,)
    wrapped = context.sqlalchemy_exception
    if wrapped is not None and wrapped.args:
        name = f"{type(orig).__module__}.{type(orig).__name__}"
        wrapped.args = (f"({name}) {primary}", *wrapped.args[1:])


def _private_database_file(path: Path) -> None:
    """Create the SQLite file 0600 in a 0700 folder before SQLite does (it would use the
    umask, typically 0644: the database holds patient data). An existing file is kept."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (CLI, web UI) run beside the SCP; FULL makes each commit durable,
    # because a C-STORE success is only sent after the commit.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


class UploadStatus(enum.StrEnum):
    """A classification of an uploaded file, run by a worker."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class UploadJob(Base):
    """One uploaded file to classify: its bytes wait in ``pending`` until a worker answers."""

    __tablename__ = "upload_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    requested_by: Mapped[str] = mapped_column(String(64), index=True)
    file_name: Mapped[str] = mapped_column(String(128))  # shown only, never a path
    kind: Mapped[str] = mapped_column(String(8))
    pending: Mapped[str | None] = mapped_column(String(1024))  # the bytes, until answered
    keep: Mapped[bool] = mapped_column(default=False)
    kept: Mapped[str | None] = mapped_column(String(128))  # name under data_dir/uploads
    status: Mapped[str] = mapped_column(String(16), default=UploadStatus.QUEUED, index=True)
    answer: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class NotificationStatus(enum.StrEnum):
    """Delivery of one notification over one channel."""

    PENDING = "pending"
    SENDING = "sending"  # claimed by one process (Notification.claimed_at) until it records
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"


class Notification(Base):
    """One event to tell people about over one channel (webhook or e-mail): the outbox row,
    written in the transaction of the change that caused it, and its delivery state."""

    __tablename__ = "notification"

    id: Mapped[int] = mapped_column(primary_key=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    channel: Mapped[str] = mapped_column(String(8))  # webhook | email
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("study.id", ondelete="SET NULL"), index=True
    )
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # when the sweeper hands it out next (pushed on when handed out: a lost message comes back)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # while ``sending``
    last_error: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
