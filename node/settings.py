"""The node's one settings object: environment (``AINODE_*``), an optional TOML file, defaults."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.analysis.bundle_format import RUNTIMES

AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash

DEMO_MODEL_DIR = Path(__file__).parent / "models" / "demo"  # the bundle shipped with the node
# What the node can tell people about (``notify_events``), see node.records.outbox.
NOTIFY_EVENTS = ("covid_19_above_threshold", "analysis_failed", "report_failed", "disk_low")
# ``ainode demo``: the stand-in PACS's AE title and its peer entry's name (``demo = true``)
DEMO_AE_TITLE = "AINODE_DEMO"
DEMO_PEER_NAME = "ainode-demo"


def default_data_dir() -> Path:
    """Where the embedded database and the instance store live unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "ainode"


def check_ae_title(value: str, field: str) -> str:
    """Return the AE title stripped, or raise naming the field."""
    stripped = value.strip()
    if not AE_TITLE_PATTERN.match(stripped):
        raise ValueError(f"{field} must be 1-16 printable characters without '\\', got {value!r}")
    return stripped


class Peer(BaseModel):
    """A PACS the node talks to: DIMSE address and, optionally, its DICOMweb root."""

    name: str
    ae_title: str
    host: str = "127.0.0.1"
    port: int = Field(104, ge=1, le=65535)
    dicomweb_url: str | None = None
    tls: bool = False  # DICOM TLS (PS3.15 B.1/B.2) to this peer's DIMSE port
    tls_ca_bundle: Path | None = None  # CA certificates that sign the peer's (else the node's)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "peer ae_title")


class Settings(BaseSettings):
    """Everything the node can be told; built once per entry point and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="AINODE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    ae_title: str = "AINODE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aes: list[str] = Field(default_factory=list)
    accept_any_calling_ae: bool = False
    peers: list[Peer] = Field(default_factory=list)
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    store_url: str | None = None
    study_stable_seconds: float = Field(30.0, gt=0)
    study_description_patterns: list[str] = Field(default_factory=lambda: ["Tórax Simple"])
    min_free_disk_mb: int = Field(1024, ge=0)
    require_called_aet: bool = False
    max_pdu_size: int = Field(65536, ge=4096, le=2**24)
    max_dataset_mb: int = Field(2048, ge=1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    max_associations: int = Field(32, ge=1)
    max_pending_connections: int = Field(16, ge=1)
    # DICOM TLS on the storage SCP (PS3.15 B.1/B.2); off unless a certificate is given
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_bundle: Path | None = None
    tls_require_client_certificate: bool = False
    log_level: str = "INFO"
    # health and metrics: JSON log lines (one object a line) for a log shipper, or text
    log_format: str = Field("text", pattern="^(text|json)$")
    # who may read /healthz and /metrics (no sign-in): client addresses or CIDR networks
    metrics_allowed_addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1/8", "::1"])
    worker_heartbeat_seconds: float = Field(30.0, gt=0)  # each worker records it is alive
    worker_forget_hours: float = Field(24.0, gt=0)  # a worker silent this long is gone
    # /healthz fails when no worker with a model loaded has beaten for this long
    health_worker_silence_seconds: float = Field(120.0, gt=0)
    # analysis
    broker_url: str | None = None
    model_dir: Path | None = None
    # auto: Keras on a GPU; on a CPU the fastest of ONNX Runtime FP32/INT8 and OpenVINO
    # FP32/BF16 that passes the bundle's agreement gate (node.analysis.runtimes), Keras when
    # none does; one of RUNTIMES
    model_runtime: str = Field("auto", pattern=f"^({'|'.join(RUNTIMES)})$")
    # ONNX Runtime intra-op threads per worker; 0: the CPUs this process may use divided among
    # the host's model-serving `ainode worker` processes (node.analysis.threads)
    model_threads: int = Field(0, ge=0)
    mixed_precision: bool = False
    window_center: float = -600.0
    window_width: float = Field(1500.0, gt=0)
    slice_stride: int = Field(1, ge=1)
    min_lung_fraction: float = Field(0.05, ge=0, le=1)
    aggregation_rule: str = Field("top-mean", pattern="^(mean|top-mean)$")
    # Pixel data is refused before it is decoded when it declares more than these (a few
    # bytes can claim gigabytes; a codec allocates what is declared). CT is 512 pixels a
    # side (1024 at most); a chest Enhanced CT is under 1000 frames of 512×512 16-bit
    # (under 512 MB); decoding takes about 5× the decoded size (copy, float32 HU, mask).
    max_image_side: int = Field(4096, ge=1, le=65535)  # Rows and Columns
    max_frames: int = Field(2048, ge=1)  # Number of Frames of one instance
    max_decoded_mb: int = Field(512, ge=1)  # Rows × Columns × frames × samples × bytes
    requeue_after_seconds: float = Field(120.0, gt=0)
    analysis_timeout_seconds: float = Field(1800.0, gt=0)  # with no heartbeat: worker lost
    analysis_max_attempts: int = Field(3, ge=1)  # abandoned runs before the study fails
    # retention of received pixel data (node.workflow.retention); off unless the site sets it
    retention_days: float | None = Field(None, gt=0)  # after the study was reported
    retention_min_free_disk_mb: int | None = Field(None, ge=0)  # below: oldest reported first
    retention_review_days: float = Field(30.0, ge=0)  # a correction keeps its study this long
    retention_interval_seconds: float = Field(900.0, gt=0)  # how often the lifecycle runs it
    # labels, exports and the model registry
    keyword_classes: dict[str, str | None] = Field(
        default_factory=lambda: {
            "COVID": "Covid_19",
            "Normal": "Normal",
            "Pneumonia": "Pneumonia",
            "Exclude": None,
        }
    )
    models_dir: Path | None = None
    export_salt: str | None = Field(None, min_length=16)
    # web UI
    web_host: str = "127.0.0.1"
    web_port: int = Field(8080, ge=0, le=65535)  # 0: no web UI
    web_secret_key: str | None = Field(None, min_length=32)
    web_secure_cookies: bool = True
    web_threads: int = Field(8, ge=1, le=64)
    # the reverse proxy in front of the web UI, if any: only its X-Forwarded-For is believed
    web_trusted_proxy: str | None = None
    web_sign_in_free_failures: int = Field(5, ge=1)  # per client address, then delays
    web_sign_in_account_free_failures: int = Field(20, ge=1)  # per user name, then delays
    web_sign_in_max_delay_seconds: float = Field(900.0, gt=0)
    export_retention_days: float = Field(7.0, gt=0)  # finished export bundles, then deleted
    # reports
    report_peer: str | None = None
    report_method: str = Field("dimse", pattern="^(dimse|stow)$")
    report_max_retries: int | None = Field(None, ge=0)  # deprecated: report_retry_hours
    report_retry_seconds: float = Field(10.0, gt=0)
    # A PACS down over a weekend still gets its SRs without anyone pressing Re-send.
    report_retry_hours: float = Field(72.0, gt=0)
    # a send claimed this long ago lost its worker: longer than one send can last
    # (acse_timeout + dimse_timeout + network_timeout, 150 s by default)
    report_lease_seconds: float = Field(300.0, gt=0)
    # a radiologist's correction of a result is written back as a new SR that replaces the
    # model's (its Predecessor Documents Sequence): off unless the site wants the PACS to get it
    report_corrections: bool = False
    # a study the model flags as outside its experience (node.analysis.ood) gets no SR until a
    # radiologist sends it (off: its SR goes out as any other, with the warning in it)
    report_hold_outside_experience: bool = False
    # each key slice's Grad-CAM map goes with the SR as an RGB Secondary Capture (the slice with
    # the map overlaid) in a new series of the study (node.reporting.heatmap_sc)
    report_heatmaps: bool = False
    # notifications (webhook and e-mail); they leave the node: the study UID, status, result
    # and a link by default, patient name, ID, accession number and date only when allowed
    notify_events: list[str] = Field(default_factory=lambda: list(NOTIFY_EVENTS))
    notify_covid_threshold: float = Field(0.5, ge=0, le=1)  # COVID-19 probability
    notify_include_patient_data: bool = False
    notify_web_url: str | None = None  # the web UI as the receivers reach it, for links
    notify_webhook_url: str | None = None
    notify_webhook_secret: SecretStr | None = Field(None, min_length=16)  # HMAC-SHA256 key
    notify_webhook_timeout_seconds: float = Field(10.0, gt=0)
    notify_smtp_host: str | None = None
    notify_smtp_port: int = Field(25, ge=1, le=65535)
    notify_smtp_security: str = Field("none", pattern="^(none|starttls|tls)$")
    notify_smtp_username: str | None = None
    notify_smtp_password: SecretStr | None = None
    notify_smtp_timeout_seconds: float = Field(30.0, gt=0)
    notify_email_from: str | None = None
    notify_email_to: list[str] = Field(default_factory=list)
    notify_retry_seconds: float = Field(30.0, gt=0)  # doubled after each failure, at most 1 h
    notify_max_attempts: int = Field(10, ge=1)  # then the notification is failed
    notify_disk_low_every_minutes: float = Field(60.0, gt=0)  # one disk_low event at most
    # the demo (``ainode serve --demo``, ``ainode demo``): the node also knows a stand-in PACS,
    # AE ``AINODE_DEMO`` on this machine's demo_port, which sends phantom studies and, when no
    # other PACS is the report destination, receives their SRs
    demo: bool = False
    demo_port: int = Field(11113, ge=1, le=65535)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value, "ae_title")

    @field_validator("allowed_calling_aes")
    @classmethod
    def _allowed(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v, "allowed_calling_aes") for v in values]

    @field_validator("metrics_allowed_addresses")
    @classmethod
    def _metrics_allowed(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"metrics_allowed_addresses: {exc}") from exc
        return [value.strip() for value in values]

    @field_validator("keyword_classes")
    @classmethod
    def _keyword_classes(cls, values: dict[str, str | None]) -> dict[str, str | None]:
        from node.analysis.result import CLASSES

        seen: set[str] = set()
        # TOML has no null: an empty string also means "exclude from training".
        values = {keyword: class_name or None for keyword, class_name in values.items()}
        for keyword, class_name in values.items():
            if not keyword.strip() or keyword.casefold() in seen:
                raise ValueError(f"keyword_classes: empty or repeated keyword {keyword!r}")
            seen.add(keyword.casefold())
            if class_name is not None and class_name not in CLASSES:
                raise ValueError(
                    f"keyword_classes: {keyword!r} maps to {class_name!r}, "
                    f"not one of {', '.join(CLASSES)} (or null to exclude)"
                )
        return values

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is not None and urlparse(value).scheme not in ("file", ""):
            raise ValueError(f"store_url must be a file:// URL or a path, got {value!r}")
        return value

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together: set both or neither")
        if self.tls_require_client_certificate and self.tls_ca_bundle is None:
            raise ValueError(
                "tls_require_client_certificate needs tls_ca_bundle (the CAs that sign the "
                "PACS's certificates)"
            )
        return self

    @model_validator(mode="after")
    def _deprecated(self) -> Settings:
        if self.report_max_retries is not None:
            logging.getLogger(__name__).warning(
                "report_max_retries is deprecated and ignored: a failed SR delivery is retried "
                "for report_retry_hours (%g h)",
                self.report_retry_hours,
            )
        return self

    @model_validator(mode="after")
    def _notifications(self) -> Settings:
        unknown = sorted(set(self.notify_events) - set(NOTIFY_EVENTS))
        if unknown:
            raise ValueError(f"notify_events: unknown {unknown}; known: {', '.join(NOTIFY_EVENTS)}")
        for name in ("notify_webhook_url", "notify_web_url"):
            url = getattr(self, name)
            parsed = urlparse(url) if url is not None else None
            if parsed is not None and (parsed.scheme not in ("http", "https") or not parsed.netloc):
                raise ValueError(f"{name} must be an http:// or https:// URL, got {url!r}")
        if self.notify_webhook_url and self.notify_webhook_secret is None:
            raise ValueError("notify_webhook_url needs notify_webhook_secret (the HMAC key)")
        if (self.notify_smtp_host is None) != (not self.notify_email_to):
            raise ValueError("notify_smtp_host and notify_email_to go together: set both or none")
        if self.notify_email_to and not self.notify_email_from:
            raise ValueError("notify_email_to needs notify_email_from (the sender's address)")
        if (self.notify_smtp_username is None) != (self.notify_smtp_password is None):
            raise ValueError("notify_smtp_username and notify_smtp_password go together")
        if self.notify_smtp_username and self.notify_smtp_security == "none":
            raise ValueError(
                "notify_smtp_username needs notify_smtp_security starttls or tls: the password "
                "would cross the network in clear"
            )
        return self

    @model_validator(mode="after")
    def _retention(self) -> Settings:
        floor = self.retention_min_free_disk_mb
        if floor is not None and floor <= self.min_free_disk_mb:
            raise ValueError(
                f"retention_min_free_disk_mb ({floor}) must be above min_free_disk_mb "
                f"({self.min_free_disk_mb}), or associations are refused before retention acts"
            )
        return self

    @model_validator(mode="after")
    def _demo_peer(self) -> Settings:
        """With ``demo``, add the stand-in PACS as a peer; the site's own report destination
        (if it has one) stays the report destination."""
        if not self.demo or any(p.name == DEMO_PEER_NAME for p in self.peers):
            return self
        if self.report_peer is None and len(self.peers) == 1:
            self.report_peer = self.peers[0].name
        demo = Peer(name=DEMO_PEER_NAME, ae_title=DEMO_AE_TITLE, port=self.demo_port)
        self.peers = [*self.peers, demo]
        return self

    @model_validator(mode="after")
    def _unique_peers(self) -> Settings:
        names = [p.name for p in self.peers]
        if len(names) != len(set(names)):
            raise ValueError(f"peers must have unique names, got {names}")
        if self.report_peer is not None and not any(
            self.report_peer in (p.name, p.ae_title) for p in self.peers
        ):
            raise ValueError(f"report_peer {self.report_peer!r} is not one of the peers {names}")
        return self

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or SQLite in the data folder."""
        return self.database_url or f"sqlite:///{self.data_dir / 'ainode.db'}"

    @property
    def store_path(self) -> Path:
        """The folder of the instance store (``store_url`` is a ``file://`` URL or a path)."""
        if self.store_url is None:
            return self.data_dir / "store"
        parsed = urlparse(self.store_url)
        return Path(parsed.path if parsed.scheme == "file" else self.store_url)

    @property
    def resolved_broker_url(self) -> str:
        """The Celery broker: the configured one (Redis in production) or SQLite in the data
        folder, which needs no server."""
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def resolved_model_dir(self) -> Path:
        """The model bundle the workers serve: the configured one or the bundled demo."""
        if self.model_dir is not None:
            return self.model_dir
        return DEMO_MODEL_DIR

    @property
    def resolved_models_dir(self) -> Path:
        """The model registry: one ``NAME/VERSION/`` bundle folder per registered model."""
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def calling_ae_allow_list(self) -> set[str] | None:
        """Calling AEs allowed to associate; ``None`` means any (only when asked for)."""
        if self.accept_any_calling_ae:
            return None
        return set(self.allowed_calling_aes) | {p.ae_title for p in self.peers}

    @property
    def report_destination(self) -> Peer | None:
        """Where SRs go: ``report_peer``, else the only peer, else nowhere."""
        if self.report_peer is not None:
            return self.peer(self.report_peer)
        return self.peers[0] if len(self.peers) == 1 else None

    def peer(self, name: str | None) -> Peer:
        """The peer called ``name`` (or the only one when ``name`` is None)."""
        if name is None:
            if len(self.peers) != 1:
                raise ValueError(
                    f"name a peer with --peer; configured: {[p.name for p in self.peers]}"
                )
            return self.peers[0]
        for candidate in self.peers:
            if candidate.name == name or candidate.ae_title == name:
                return candidate
        raise ValueError(f"unknown peer {name!r}; configured: {[p.name for p in self.peers]}")


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: explicit overrides, then ``AINODE_*``, then the TOML file.

    The TOML file is ``config_file`` or, when that is None, ``$AINODE_CONFIG``.
    """
    if config_file is None and os.environ.get("AINODE_CONFIG"):
        config_file = Path(os.environ["AINODE_CONFIG"])
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})
    with_file = type("FileSettings", (Settings,), {"model_config": config})
    return with_file(**overrides)
