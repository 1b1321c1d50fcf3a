"""Control-plane tables. Money columns are BIGINT nano-units; SQL stays portable
between SQLite (default) and PostgreSQL."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from onetoken.kit.crypto import BASE62

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLES = ("owner", "admin", "developer", "billing", "viewer")
KEY_STATUSES = ("active", "disabled", "revoked")
ORG_STATUSES = ("active", "disabled")
LEDGER_KINDS = (
    "recharge",
    "usage",
    "refund",
    "adjustment",
    "grant",
    "package_grant",
    "expiry",
)
MODEL_KINDS = ("chat", "embedding")
PROTOCOLS = ("openai", "azure", "anthropic", "gemini")


def new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(BASE62) for _ in range(20))


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    # Sign-in identifiers (any of the three): login_name always, email and mobile optional.
    login_name: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True, nullable=True)
    mobile: Mapped[str | None] = mapped_column(String(32), unique=True, nullable=True)
    display_name: Mapped[str] = mapped_column(String(100), default="")
    # None until an invited account sets its password.
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    # active | disabled
    status: Mapped[str] = mapped_column(String(16), default="active")
    # invited (no password yet) | password | totp (password and a second factor)
    auth_status: Mapped[str] = mapped_column(String(16), default="password")
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    # Fernet token under the key derived from ONETOKEN_SECRET_KEY; set from enrolment on.
    totp_secret_encrypted: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # Last accepted TOTP time step: a code is accepted once.
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    invite_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    invite_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        CheckConstraint("role IN ('owner','admin','developer','billing','viewer')", name="role"),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    created_by: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    display: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="active")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The account the key belongs to (records are attributed to it); the creator unless
    # reassigned. Checked by the service to be an account of the same org.
    owner_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    # Which ONETOKEN_SECRET_KEY version `hash` was made with.
    secret_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    allowed_ips: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_month: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Rotation: the key this one replaced.
    rotated_from: Mapped[str | None] = mapped_column(String(32), nullable=True)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Who last set the limits, the scopes (expiry, start, models, source addresses) and
    # the status: a developer may narrow limits and scopes another account set on their
    # key, not lift or widen them, and may not re-enable a key another account disabled.
    limits_set_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status_set_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    scopes_set_by: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (CheckConstraint("status IN ('active','disabled','revoked')", name="status"),)


class Provider(Base):
    __tablename__ = "providers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # None: the platform catalog, usable by every org; else private to that org.
    org_id: Mapped[str | None] = mapped_column(ForeignKey("orgs.id"), index=True, nullable=True)
    name: Mapped[str] = mapped_column(String(64))
    protocol: Mapped[str] = mapped_column(String(16))
    base_url: Mapped[str] = mapped_column(String(2048))
    # Fernet token under the key derived from ONETOKEN_SECRET_KEY; None = no credential.
    api_key_encrypted: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    connect_timeout_ms: Mapped[int] = mapped_column(Integer, default=2000)
    first_byte_timeout_ms: Mapped[int] = mapped_column(Integer, default=60000)
    idle_timeout_ms: Mapped[int] = mapped_column(Integer, default=60000)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Data-processing attributes that org policies select on (docs/snapshot.md).
    api_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    vendor: Mapped[str] = mapped_column(String(32), default="")
    region: Mapped[str] = mapped_column(String(32), default="")
    retains_content: Mapped[bool] = mapped_column(Boolean, default=False)
    trains_on_data: Mapped[bool] = mapped_column(Boolean, default=False)
    zero_retention: Mapped[bool] = mapped_column(Boolean, default=False)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    preset: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Name of the environment variable the credential was read from (declarative files).
    credential_env: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # "api" or "file": `providers apply --prune` only removes what a file created.
    managed_by: Mapped[str] = mapped_column(String(8), default="api")

    # Unique per org; platform providers (org_id NULL) are kept unique by the service.
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_providers_org_name"),)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Always the provider's org_id: None for the platform catalog.
    org_id: Mapped[str | None] = mapped_column(ForeignKey("orgs.id"), index=True, nullable=True)
    # One row is one deployment; several rows (providers) may serve the same public name.
    name: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id"), index=True)
    upstream_model: Mapped[str] = mapped_column(String(128))
    input_price: Mapped[int] = mapped_column(BigInteger, default=0)
    output_price: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_input_price: Mapped[int] = mapped_column(BigInteger, default=0)
    max_output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    request_price: Mapped[int] = mapped_column(BigInteger, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    managed_by: Mapped[str] = mapped_column(String(8), default="api")

    __table_args__ = (
        CheckConstraint("kind IN ('chat','embedding')", name="kind"),
        UniqueConstraint("provider_id", "name", name="uq_models_provider_name"),
    )


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    memo: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Usage entries only: which key and model spent it (per-key budgets, statements).
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Usage entries only: how many calls the entry covers (one entry per org, key, model and
    # UTC day of an ingested batch), so invoices sum calls instead of counting rows.
    calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        CheckConstraint(
            "kind IN ('recharge','usage','refund','adjustment','grant','package_grant','expiry')",
            name="kind",
        ),
        Index("ix_ledger_entries_org_id_id", "org_id", "id"),
        Index("ix_ledger_entries_org_id_kind_created_at", "org_id", "kind", "created_at"),
        Index("ix_ledger_entries_key_id_created_at", "key_id", "created_at"),
    )


class AdminSession(Base):
    __tablename__ = "admin_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ConfigRevision(Base):
    """One row; bumped in the same transaction as any change the engine must see."""

    __tablename__ = "config_revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)


import onetoken.billing.models  # noqa: E402  (billing tables join the metadata)
import onetoken.ingest.models  # noqa: E402  (journal cursors and spent marks)
import onetoken.providers.tables  # noqa: E402  (provider/routing tables join the metadata)
import onetoken.rights.models  # noqa: E402  (erasure requests)
import onetoken.security.blocking  # noqa: E402  (blocked sources)
import onetoken.security.models  # noqa: E402  (login protection tables)
import onetoken.webhooks.models  # noqa: E402,F401  (webhook endpoints and delivery log)
