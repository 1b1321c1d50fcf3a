"""Tables of the providers domain: upstream providers and their priced models, org gateway
settings (policy, rate limits, guard), routes and the platform routing settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow
from onetoken.orgs.models import Org
from onetoken.providers.gateway_schemas import DEFAULT_STRATEGY

MODEL_KINDS = (
    "chat", "embedding", "image", "moderation", "rerank", "speech", "transcription"
)
PROTOCOLS = ("openai", "azure", "anthropic", "gemini")


class Provider(Base):
    __tablename__ = "providers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # None: the platform catalog, usable by every org; else private to that org.
    org_id: Mapped[str | None] = mapped_column(ForeignKey(Org.id), index=True, nullable=True)
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
    org_id: Mapped[str | None] = mapped_column(ForeignKey(Org.id), index=True, nullable=True)
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
    # Unit prices, nano-units (docs/gateway-spec.md, "Unit prices"): per image by
    # "<size>/<quality>", "<size>" or "default"; per second of audio in; per million
    # characters of speech; per rerank search unit.
    image_prices: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    audio_second_price: Mapped[int] = mapped_column(BigInteger, default=0)
    character_price: Mapped[int] = mapped_column(BigInteger, default=0)
    search_unit_price: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        CheckConstraint(
            "kind IN ('chat','embedding','image','moderation','rerank','speech','transcription')",
            name="kind",
        ),
        UniqueConstraint("provider_id", "name", name="uq_models_provider_name"),
    )


class OrgGatewaySettings(Base):
    """Per-org settings the gateway enforces; absent row = the default policy (no provider
    that trains on data), no limits, guard off."""

    __tablename__ = "org_gateway_settings"

    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), primary_key=True)
    # Policy fields as in docs/snapshot.md; None = the default (gateway_schemas.OrgPolicy).
    policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    guard_mode: Mapped[str] = mapped_column(String(8), default="off")
    # None = every category.
    guard_categories: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Route(Base):
    """How a public model name picks among its deployments, and the aliases it answers to.

    Routes are global in the engine, so a name's route belongs to whoever owns the name:
    the platform (org_id NULL) for catalog names, else the org whose private name it is."""

    __tablename__ = "routes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(ForeignKey(Org.id), index=True, nullable=True)
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
