"""Tables of the keys domain: API keys, their per-key policy overrides, and the
applications keys are grouped into."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow
from onetoken.orgs.models import Account, Org

KEY_STATUSES = ("active", "disabled", "revoked")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), index=True)
    created_by: Mapped[str] = mapped_column(ForeignKey(Account.id))
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
    # The application the key belongs to (at most one); checked by the service to be one
    # of the key's org.
    application_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)

    __table_args__ = (CheckConstraint("status IN ('active','disabled','revoked')", name="status"),)


class KeyPolicy(Base):
    """A key's policy override; it only narrows the org policy (the engine applies both)."""

    __tablename__ = "key_policies"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Application(Base):
    """A group of one org's keys with an owner and limits and budgets of their own, which
    the engine enforces across all of its keys together (docs/applications.md)."""

    __tablename__ = "applications"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(String(500), default="", server_default="")
    owner_id: Mapped[str] = mapped_column(ForeignKey(Account.id))
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_month: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Who last set the limits: the owner may narrow what an administrator set, not lift it.
    limits_set_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_applications_org_id_name"),)
