"""Tables of the providers domain besides `providers` and `models` (which live in
db/models.py): org gateway settings (policy, rate limits, guard), per-key policies,
routes and the platform routing settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.models import Base, UTCDateTime, utcnow
from onetoken.providers.gateway_schemas import DEFAULT_STRATEGY


class OrgGatewaySettings(Base):
    """Per-org settings the gateway enforces; absent row = permissive policy, no limits,
    guard off."""

    __tablename__ = "org_gateway_settings"

    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), primary_key=True)
    # Policy fields as in docs/snapshot.md; None = permissive.
    policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    guard_mode: Mapped[str] = mapped_column(String(8), default="off")
    # None = every category.
    guard_categories: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class KeyPolicy(Base):
    """A key's policy override; it only narrows the org policy (the engine applies both)."""

    __tablename__ = "key_policies"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Route(Base):
    """How a public model name picks among its deployments, and the aliases it answers to.

    Routes are global in the engine, so a name's route belongs to whoever owns the name:
    the platform (org_id NULL) for catalog names, else the org whose private name it is."""

    __tablename__ = "routes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(ForeignKey("orgs.id"), index=True, nullable=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    strategy: Mapped[str] = mapped_column(String(16), default=DEFAULT_STRATEGY)
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list)
    managed_by: Mapped[str] = mapped_column(String(8), default="api")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RoutingSettings(Base):
    """One row (id 1) of platform-wide retry and circuit-breaker settings, every field
    written from a gateway_schemas.Routing (which holds the defaults)."""

    __tablename__ = "routing_settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    max_attempts: Mapped[int] = mapped_column(Integer)
    retry_deadline_ms: Mapped[int] = mapped_column(Integer)
    backoff_ms: Mapped[int] = mapped_column(Integer)
    breaker_failures: Mapped[int] = mapped_column(Integer)
    breaker_open_ms: Mapped[int] = mapped_column(Integer)
