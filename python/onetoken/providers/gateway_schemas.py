"""API shapes of what the gateway enforces per org and key (policy, rate limits, guard)
and of routing (routes and the platform retry/breaker settings). Field names and
defaults match docs/snapshot.md, so a stored value goes into the snapshot unchanged."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from onetoken.keys.schemas import ModelName
from onetoken.kit.lists import ListOf
from onetoken.providers.schemas import CatalogEntry, Label

Labels = Annotated[list[Label], Field(max_length=64)]
Names = Annotated[list[ModelName], Field(max_length=256)]


class Policy(BaseModel):
    """Which deployments may serve: a deployment is permitted when its provider's vendor
    and region and the model name pass the allow (null = any) and deny lists, and, when
    asked, its provider does not train on data / is zero-retention.

    This is a key's policy, which only narrows its org's ([`OrgPolicy`]): by default it
    adds nothing."""

    model_config = ConfigDict(extra="forbid")

    allow_vendors: Labels | None = None
    deny_vendors: Labels = Field(default_factory=list)
    allow_regions: Labels | None = None
    deny_regions: Labels = Field(default_factory=list)
    allow_models: Names | None = None
    deny_models: Names = Field(default_factory=list)
    no_training: bool = False
    zero_retention_only: bool = False

    def is_default(self) -> bool:
        return self == type(self)()


class OrgPolicy(Policy):
    """An org's policy. `no_training` is on unless the org's owner lifted it (an audited
    choice): by default no provider that may train on submitted data serves the org, the
    engine's default for an org without a policy too (docs/snapshot.md)."""

    no_training: bool = True
    # A client's W3C traceparent is continued in the gateway's traces and the gateway's
    # own goes on to the upstream (docs/observability.md); off, trace context never
    # crosses the relay.
    trace_context: bool = False


# At most what a SQL INTEGER column holds on every engine (2^31 - 1), as for keys.
PerMinute = Annotated[int, Field(ge=1, le=2_000_000_000)]


class OrgLimits(BaseModel):
    """Org-wide rate limits; null = unlimited. Per-key limits are set on the key."""

    model_config = ConfigDict(extra="forbid")

    rpm: PerMinute | None = None
    tpm: PerMinute | None = None
    concurrency: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


GuardCategory = Literal[
    "secret_key", "private_key", "password_in_url", "bank_card", "cn_resident_id", "phone"
]
GUARD_CATEGORIES: tuple[str, ...] = GuardCategory.__args__  # type: ignore[attr-defined]


class Guard(BaseModel):
    """Sensitive-content guard: `flag` forwards and records category counts, `block`
    refuses with 400 naming the categories. `categories` null = every category."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "flag", "block"] = "off"
    categories: Annotated[list[GuardCategory], Field(min_length=1, max_length=16)] | None = None


Strategy = Literal["priority", "weighted", "lowest_price", "lowest_latency"]
# A route without a strategy, and a model name without a route (the engine's rule too).
DEFAULT_STRATEGY: Final[Strategy] = "priority"
Aliases = Annotated[list[ModelName], Field(max_length=32)]


class RouteCreate(BaseModel):
    """`name` is a public model name; `scope` platform (operators) or org (a name of
    the caller's org's private deployments)."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName
    scope: Literal["platform", "org"] = "org"
    strategy: Strategy = DEFAULT_STRATEGY
    aliases: Aliases = Field(default_factory=list)


class RouteUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Strategy | None = None
    aliases: Aliases | None = None


class RouteResponse(CatalogEntry):
    strategy: Strategy
    aliases: list[str]
    managed_by: Literal["api", "file"]


class RouteList(ListOf[RouteResponse]): ...


class Routing(BaseModel):
    """Retries (before any byte reached the client) and circuit breakers, platform-wide.
    These defaults are the Python side's only ones: the stored row takes every field from
    here, the snapshot leaves `routing` out while it equals them (the engine then applies
    its own, rust/gateway/src/routing.rs), and docs/snapshot.md is checked against them."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)

    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    retry_deadline_ms: Annotated[int, Field(ge=1, le=600_000)] = 15000
    backoff_ms: Annotated[int, Field(ge=0, le=60_000)] = 50
    breaker_failures: Annotated[int, Field(ge=1, le=10_000)] = 5
    breaker_open_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 30000
