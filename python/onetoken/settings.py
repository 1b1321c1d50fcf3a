"""Every ONETOKEN_* setting and its default, in one place."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from onetoken import _core
from onetoken.kit.files import PRIVATE_FILE_MODE, private_dir
from onetoken.kit.net import networks

log = logging.getLogger("onetoken.settings")

# The bounds most settings share: counts, sizes and days of at least one; durations and
# intervals above zero.
AtLeastOne = Annotated[int, Field(ge=1)]
AboveZero = Annotated[float, Field(gt=0)]

SECRET_KEY_FILE = "secret.key"  # noqa: S105 (a file name)
# Anything shorter is too weak to derive the key-hash and encryption secrets from.
MIN_SECRET_KEY_LEN = 32
# Values copied from examples instead of generated; refused outside demo/development.
_PLACEHOLDER_SECRETS = frozenset({"changeme", "change-me", "secret", "default", "password"})
_PLACEHOLDER_PREFIXES = ("changeme", "change-me", "replace-me", "your-secret", "example")
_MIN_DISTINCT_SECRET_CHARS = 10
# The engine declares its own defaults (rust/gateway/src/config.rs); the engine knobs
# below take theirs from it.
_ENGINE: Final[dict[str, Any]] = json.loads(_core.engine_config_defaults())


class Settings(BaseSettings):
    """Deployment settings read from the environment (prefix ONETOKEN_).

    `database_url` and `clickhouse_dsn` are filled in from `data_dir` when unset, so
    every consumer reads a resolved value.
    """

    model_config = SettingsConfigDict(env_prefix="ONETOKEN_", extra="ignore", validate_default=True)

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("./.onetoken")
    gateway_listen: str = _ENGINE["listen"]
    control_listen: str = "127.0.0.1:8081"
    database_url: str = ""
    clickhouse_dsn: str = ""
    secret_key: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    demo_upstream: str | None = None
    # Declarative providers/models/routes file (YAML, TOML or JSON) applied at serve start.
    providers_file: Path | None = None
    currency: str = "USD"

    # Ingestion rounds. Every round that finds records makes one call_log insert, and each
    # insert is a new ClickHouse part (files created, merged later): at 200 ms the control
    # process spent about twice the CPU per request it does at 1 s (bench/RESULTS.md).
    # Balances do not wait for it: the gateway counts spend in memory.
    flush_interval_ms: int = Field(default=1000, ge=10, le=60_000)
    flush_max_rows: int = Field(default=50_000, ge=1, le=1_000_000)
    call_log_ttl_days: AtLeastOne = 180
    # Read-only SQL (docs/sql.md): the engine's limits on each query. Rows beyond
    # sql_max_result_rows are cut (the answer says so); the other limits fail the query.
    sql_max_execution_time_s: int = Field(default=30, ge=1, le=3600)
    sql_max_memory_bytes: int = Field(default=2 * 1024**3, ge=1024**2)
    sql_max_result_rows: int = Field(default=10_000, ge=1, le=1_000_000)
    sql_max_result_bytes: int = Field(default=64 * 1024**2, ge=1024)
    sql_max_rows_to_read: int = Field(default=2_000_000_000, ge=1)
    # Prefix of every Redis key gateways and the cap publisher share (docs/scale-out.md).
    redis_prefix: str = "ot:"
    # Full republish of every org's cap: heals a Redis restart (which lost the caps) and a
    # change another process committed. Money moved through this process goes at once.
    cap_publish_interval_seconds: AboveZero = 5.0

    # Engine knobs (tests/contract/engine_config.json), defaults from the engine.
    worker_threads: int = Field(default=_ENGINE["worker_threads"], ge=1, le=256)
    max_body_bytes: int = Field(default=_ENGINE["max_body_bytes"], ge=1024)
    # An audio upload is streamed through, not held: its cap is its own.
    max_upload_bytes: int = Field(default=_ENGINE["max_upload_bytes"], ge=1024)
    shutdown_grace_seconds: float = Field(default=_ENGINE["shutdown_grace_ms"] / 1000, ge=0)
    # Transport edge (docs/gateway-spec.md, "Transport limits and addresses").
    # Comma-separated CIDRs that platform providers (never an org's own) may reach although
    # they are loopback, private or link-local (an in-house model server); checked when a
    # provider is saved and by the engine at every connect. Empty allows no such address.
    upstream_private_cidrs: str = ""
    # Comma-separated CIDRs of load balancers whose X-Forwarded-For (and PROXY header) is
    # believed; empty trusts none, so the client is the TCP peer.
    gateway_trusted_proxies: str = ""
    # Every gateway connection starts with a PROXY protocol v2 header.
    gateway_proxy_protocol: bool = _ENGINE["proxy_protocol"]
    # host:port serving the gateway's /metrics (and /healthz); unset serves them nowhere.
    metrics_listen: str | None = _ENGINE["metrics_listen"]
    # host:port serving the control process's /metrics (journal depth, ingestion, the
    # ClickHouse and security-log spools, the cap publisher, control API requests), and
    # that of `onetoken ingest` (`--metrics-listen`); unset serves them nowhere. Their own
    # listeners, never the control API's port: tenants reach that one (docs/dashboards.md).
    control_metrics_listen: str | None = None
    ingest_metrics_listen: str | None = None
    gateway_max_connections: AtLeastOne = _ENGINE["max_connections"]
    gateway_header_read_timeout_ms: int = Field(default=_ENGINE["header_read_timeout_ms"], ge=100)
    gateway_idle_timeout_ms: int = Field(default=_ENGINE["idle_timeout_ms"], ge=100)
    gateway_max_header_bytes: int = Field(
        default=_ENGINE["max_header_bytes"], ge=1024, le=1024 * 1024
    )
    upstream_max_event_bytes: int = Field(default=_ENGINE["max_upstream_event_bytes"], ge=1024)
    upstream_max_body_bytes: int = Field(default=_ENGINE["max_upstream_body_bytes"], ge=1024)
    upstream_deadline_seconds: AboveZero = _ENGINE["upstream_deadline_ms"] / 1000
    # Thread CPU time per request phase in the gateway's /metrics (a profile without perf).
    gateway_phase_timing: bool = _ENGINE["phase_timing"]
    # Redis shared by every gateway for rpm/tpm, concurrency, budgets and money leases
    # (docs/scale-out.md), e.g.
    # redis://host:6379/0 or unix:///run/redis.sock; unset, each gateway keeps limits and
    # money in its own memory, as one machine always has. The control plane publishes each
    # org's money cap there. Secret: the URL may carry a password.
    redis_url: SecretStr | None = None
    # Traces and metrics over OTLP/HTTP, from the gateway and the control process
    # (docs/observability.md): the collector's base URL (e.g. http://collector:4318);
    # unset, nothing is traced.
    otel_endpoint: str | None = Field(default=None, pattern=r"^https?://")
    # Head sampling: the share of requests traced (a continued client traceparent decides
    # by its own sampled flag).
    otel_ratio: float = Field(default=1.0, ge=0, le=1)
    # service.name: the gateway exports as <name>-gateway, the control process as
    # <name>-control.
    otel_service_name: str = Field(default="onetoken", min_length=1, max_length=64)
    otel_export_interval_ms: int = Field(default=1000, ge=50)

    session_ttl_hours: int = Field(default=12, ge=1, le=24 * 30)

    # The terms of service every person signing in accepts on behalf of their organization
    # (policy section XII, docs/terms.md). Changing the version asks every account again:
    # its sessions answer 403 `terms_not_accepted` until it accepts the new one.
    terms_version: str = Field(default="2026-12-01", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
    # Where the terms' text is published, shown with the version to accept.
    terms_url: str | None = Field(default=None, max_length=2048)

    # Key-hash secret rotation: ONETOKEN_SECRET_KEY is version `secret_key_version`;
    # ONETOKEN_PREVIOUS_SECRET_KEYS ("N:secret,M:secret") keeps older versions valid for
    # the keys hashed under them, and decrypts what they encrypted.
    secret_key_version: int = Field(default=1, ge=1, le=1_000_000)
    previous_secret_keys: SecretStr | None = None
    security_log_ttl_days: AtLeastOne = 365
    # Login protection (defaults documented in docs/control-plane-spec.md).
    login_max_failures_account: int = Field(default=5, ge=1, le=1000)
    login_max_failures_ip: int = Field(default=20, ge=1, le=100_000)
    login_lockout_base_seconds: AtLeastOne = 30
    login_lockout_max_seconds: AtLeastOne = 3600
    login_failure_window_seconds: AtLeastOne = 900
    login_burst_max_attempts: int = Field(default=5, ge=2)
    login_burst_window_seconds: AboveZero = 2.0
    # Lets an org's owners credit, confirm, refund and invoice their own org (operators
    # only by default): for a private deployment whose owners are the platform's staff.
    tenant_money_admin: bool = False
    key_rotation_overlap_hours: int = Field(default=24, ge=0, le=24 * 90)
    # Comma-separated CIDRs of reverse proxies whose X-Forwarded-For is believed.
    trusted_proxies: str = ""
    # Webhooks, anomaly detection and retention (defaults documented in docs/webhooks.md,
    # docs/security.md and docs/retention.md).
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_base_seconds: AboveZero = 10.0
    webhook_backoff_max_seconds: AboveZero = 3600.0
    # The whole of one delivery attempt (resolve, connect, send, response status).
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    webhook_poll_interval_seconds: AboveZero = 2.0
    # Attempts running at once; each endpoint has at most one.
    webhook_workers: int = Field(default=8, ge=1, le=256)
    # Comma-separated CIDRs webhook targets may be in besides public addresses
    # (on-premises receivers); every org's endpoints may then reach them.
    webhook_private_cidrs: str = ""
    # Comma-separated CIDRs an org's identity provider may be in besides public addresses
    # (an on-premises provider; a test's or demo's local one). Empty allows none, and then
    # only https issuers are accepted (docs/sso.md).
    sso_private_cidrs: str = ""
    # The whole of one request to an identity provider (discovery, token, keys).
    sso_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Sign-ins started from one address in ten minutes (each costs a request to the
    # provider); generous, since an office signs in from one address in the morning.
    sso_start_max_per_address: int = Field(default=60, ge=1, le=100_000)
    anomaly_bucket_seconds: AboveZero = 60.0
    anomaly_ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    anomaly_warmup_buckets: AtLeastOne = 5
    anomaly_rate_factor: float = Field(default=10.0, gt=1)
    anomaly_min_requests: AtLeastOne = 100
    anomaly_error_factor: float = Field(default=10.0, gt=1)
    anomaly_min_errors: AtLeastOne = 50
    anomaly_ip_window_seconds: AboveZero = 600.0
    anomaly_ip_threshold: int = Field(default=20, ge=2)
    attack_401_window_seconds: AboveZero = 60.0
    attack_401_threshold: int = Field(default=100, ge=2)
    attack_block_seconds: AtLeastOne = 900
    # Comma-separated CIDRs never blocked automatically (e.g. a load balancer the gateway
    # sees as the peer of every request).
    attack_block_exempt: str = ""
    upstream_alarm_failures: AtLeastOne = 20
    alert_cooldown_seconds: float = Field(default=900.0, ge=0)
    login_records_ttl_days: AtLeastOne = 180
    delivery_log_ttl_days: AtLeastOne = 30
    retention_purge_interval_seconds: AboveZero = 3600.0
    # Work orders (docs/tickets.md): a closed ticket and its attachments are purged this
    # many days after closing; attachments are capped in size and count per ticket.
    ticket_retention_days: AtLeastOne = 180
    ticket_attachment_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=1 << 30)
    ticket_attachments_max: int = Field(default=10, ge=1, le=1000)
    config_watch_interval_ms: int = Field(default=500, ge=50)
    # E-mail (docs/operations.md, "E-mail"): smtp://host:port (STARTTLS with
    # smtp_starttls) or smtps://host:port, optionally user:password@ before the host.
    # Unset, nothing is sent and invite tokens are only shown to the inviter, as before.
    # Secret: the URL may carry a password.
    smtp_url: SecretStr | None = None
    smtp_starttls: bool = False
    mail_from: str = Field(default="onetoken@localhost", max_length=320)
    # The console's address as people reach it: the start of the links in invitations
    # and password resets.
    public_url: str = Field(default="http://127.0.0.1:8081", max_length=2048)
    mail_max_attempts: int = Field(default=8, ge=1, le=50)
    mail_backoff_base_seconds: AboveZero = 30.0
    mail_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    mail_poll_interval_seconds: AboveZero = 2.0
    # Self-service password reset: how long a reset link works, and how many reset mails
    # one account is sent per hour (requests beyond answer the same and send nothing).
    password_reset_ttl_minutes: int = Field(default=30, ge=1, le=24 * 60)
    password_reset_max_per_hour: int = Field(default=3, ge=1, le=100)
    # Security events to a SIEM over syslog (docs/siem.md): RFC 5424 messages over TLS
    # (RFC 5425). The operator's receiver (every org's events) as host:port; unset, only
    # the orgs' own destinations are served.
    siem_syslog_address: str | None = Field(default=None, max_length=300)
    # CA bundle verifying the operator's receiver (the system's CAs when unset), and the
    # client certificate and key it is shown when the receiver asks for one.
    siem_ca_file: Path | None = None
    siem_client_cert: Path | None = None
    siem_client_key: Path | None = None
    # Comma-separated CIDRs orgs' receivers may be in besides public addresses.
    siem_private_cidrs: str = ""
    # How far behind now the cursor stays, so that an event flushed late by another
    # process (within this many seconds) is not passed over.
    siem_settle_seconds: float = Field(default=10.0, ge=0, le=3600)
    siem_batch_events: int = Field(default=500, ge=1, le=10_000)
    siem_poll_interval_seconds: AboveZero = 2.0
    siem_backoff_max_seconds: AboveZero = 300.0
    # The whole of one send: connect, handshake, write and the receiver's close.
    siem_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Destinations sent to at once; each destination has at most one send in flight.
    siem_workers: int = Field(default=4, ge=1, le=64)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Swagger UI at /api/docs (assets served from the package); /api/openapi.json stays.
    api_docs: bool = True

    @model_validator(mode="after")
    def _resolve(self) -> Self:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'control.db').resolve()}"
        if not self.clickhouse_dsn:
            self.clickhouse_dsn = f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("ONETOKEN_TLS_CERT and ONETOKEN_TLS_KEY must be set together")
        if self.secret_key is not None:
            if len(self.secret_key.get_secret_value()) < MIN_SECRET_KEY_LEN:
                raise ValueError(
                    f"ONETOKEN_SECRET_KEY must be at least {MIN_SECRET_KEY_LEN} characters"
                )
        elif self.environment == "production":
            raise ValueError("ONETOKEN_SECRET_KEY is required when ONETOKEN_ENVIRONMENT=production")
        if self.environment == "production" and self.secret_key_problem() is not None:
            raise ValueError("ONETOKEN_SECRET_KEY is a placeholder or too weak for production")
        self.previous_secret_key_bytes()  # malformed entries fail at startup, not at use
        if self.smtp_url is not None and not self.smtp_url.get_secret_value().startswith(
            ("smtp://", "smtps://")
        ):
            raise ValueError("ONETOKEN_SMTP_URL must start with smtp:// or smtps://")
        for name in (
            "trusted_proxies",
            "gateway_trusted_proxies",
            "webhook_private_cidrs",
            "upstream_private_cidrs",
            "sso_private_cidrs",
            "siem_private_cidrs",
        ):
            try:
                networks(getattr(self, name))
            except ValueError:
                raise ValueError(f"ONETOKEN_{name.upper()} must be comma-separated CIDRs") from None
        if self.siem_syslog_address and not re.fullmatch(
            r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}", self.siem_syslog_address
        ):
            raise ValueError("ONETOKEN_SIEM_SYSLOG_ADDRESS must be host:port")
        if (self.siem_client_cert is None) != (self.siem_client_key is None):
            raise ValueError(
                "ONETOKEN_SIEM_CLIENT_CERT and ONETOKEN_SIEM_CLIENT_KEY must be set together"
            )
        return self

    def secret_key_problem(self) -> str | None:
        """Why ONETOKEN_SECRET_KEY cannot protect a real deployment, or None.

        Never includes the value itself."""
        if self.secret_key is None:
            return "ONETOKEN_SECRET_KEY is not set"
        value = self.secret_key.get_secret_value()
        if value.strip().lower() in _PLACEHOLDER_SECRETS or any(
            value.lower().startswith(p) for p in _PLACEHOLDER_PREFIXES
        ):
            return "ONETOKEN_SECRET_KEY is a placeholder value"
        if len(set(value)) < _MIN_DISTINCT_SECRET_CHARS:
            return "ONETOKEN_SECRET_KEY has too little variety to be a random secret"
        return None

    def previous_secret_key_bytes(self) -> dict[int, bytes]:
        """ONETOKEN_PREVIOUS_SECRET_KEYS as {version: secret}."""
        if self.previous_secret_keys is None:
            return {}
        out: dict[int, bytes] = {}
        for part in self.previous_secret_keys.get_secret_value().split(","):
            part = part.strip()
            if not part:
                continue
            version, sep, secret = part.partition(":")
            if not sep or not version.isdigit():
                raise ValueError("ONETOKEN_PREVIOUS_SECRET_KEYS entries must be VERSION:SECRET")
            v = int(version)
            if v == self.secret_key_version or v in out or not 1 <= v <= 1_000_000:
                raise ValueError(
                    "ONETOKEN_PREVIOUS_SECRET_KEYS versions must be unique and differ from "
                    "ONETOKEN_SECRET_KEY_VERSION"
                )
            if len(secret) < MIN_SECRET_KEY_LEN:
                raise ValueError(
                    f"ONETOKEN_PREVIOUS_SECRET_KEYS secrets must be at least "
                    f"{MIN_SECRET_KEY_LEN} characters"
                )
            out[v] = secret.encode()
        return out

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def ticket_store_dir(self) -> Path:
        """Where ticket attachments live (tickets.store.FileStore)."""
        return self.data_dir / "tickets"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.spool_dir, self.log_dir):
            private_dir(path)

    def secret_key_bytes(self) -> bytes:
        """The master secret: ONETOKEN_SECRET_KEY, else one generated once per data dir.

        The generated file is created with O_EXCL so two processes starting together
        (CLI and server) end up with the same secret.
        """
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.data_dir / SECRET_KEY_FILE
        try:
            return _read_secret_file(path)
        except FileNotFoundError:
            pass
        private_dir(self.data_dir)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        except FileExistsError:
            return _read_secret_file(path)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        log.warning("secret_key.generated", extra={"path": str(path)})
        return _read_secret_file(path)


def _read_secret_file(path: Path) -> bytes:
    value = path.read_text().strip().encode()
    if len(value) < MIN_SECRET_KEY_LEN:
        raise RuntimeError(f"{path} holds a secret shorter than {MIN_SECRET_KEY_LEN} characters")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
