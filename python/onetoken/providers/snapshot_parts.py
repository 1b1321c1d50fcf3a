"""The snapshot sections this domain owns (docs/snapshot.md): providers[], models[],
routes[], routing, orgs[].policy/limits/guard and keys[].policy.

Optional fields are written only when they differ from the documented default, so a
deployment that uses none of them produces the minimal snapshot
(tests/contract/snapshot.json) and every field written has a meaning.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.keys.models import KeyPolicy
from onetoken.kit.crypto import Secrets
from onetoken.providers.gateway_schemas import OrgPolicy, Policy, Routing
from onetoken.providers.models import Model, OrgGatewaySettings, Provider, Route, RoutingSettings

# Limits as the engine reads them; budgets are filled in by billing when it sets them.
EMPTY_LIMITS: dict[str, int | None] = {
    "rpm": None,
    "tpm": None,
    "concurrency": None,
    "budget_day": None,
    "budget_month": None,
}


def provider_entry(p: Provider, secrets: Secrets) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": p.id,
        "name": p.name,
        "protocol": p.protocol,
        "base_url": p.base_url,
        "api_key": secrets.decrypt(p.api_key_encrypted) if p.api_key_encrypted else None,
        "connect_timeout_ms": p.connect_timeout_ms,
        "first_byte_timeout_ms": p.first_byte_timeout_ms,
        "idle_timeout_ms": p.idle_timeout_ms,
    }
    optional: dict[str, Any] = {
        "api_version": p.api_version,
        "vendor": p.vendor or "",
        "region": p.region or "",
        "retains_content": bool(p.retains_content),
        "trains_on_data": bool(p.trains_on_data),
        "zero_retention": bool(p.zero_retention),
        "tags": list(p.tags or []),
        "max_concurrency": p.max_concurrency,
        # An org's own provider never gets the operator's private-address allow-list.
        "org_id": p.org_id,
    }
    entry.update({k: v for k, v in optional.items() if v not in (None, "", False, [])})
    return entry


def model_entry(m: Model) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": m.name,
        "kind": m.kind,
        "provider_id": m.provider_id,
        "upstream_model": m.upstream_model,
        "input_price": m.input_price,
        "output_price": m.output_price,
        "cached_input_price": m.cached_input_price,
        "max_output_tokens": m.max_output_tokens,
    }
    if m.org_id is not None:
        entry["org_id"] = m.org_id
    if m.request_price:
        entry["request_price"] = m.request_price
    if m.image_prices:
        entry["image_prices"] = {k: int(v) for k, v in m.image_prices.items()}
    for unit in ("audio_second_price", "character_price", "search_unit_price"):
        if getattr(m, unit):
            entry[unit] = getattr(m, unit)
    if m.priority:
        entry["priority"] = m.priority
    if m.weight != 1:
        entry["weight"] = m.weight
    return entry


@dataclass(frozen=True, slots=True)
class Catalog:
    providers: list[dict[str, Any]]
    models: list[dict[str, Any]]
    routes: list[dict[str, Any]]
    routing: dict[str, Any] | None
    # Names (models and route aliases) each org's keys can reach; platform names included.
    names_by_org: dict[str, set[str]]
    platform_names: set[str]


def catalog(
    session: Session, secrets: Secrets, orgs: Collection[str] | None = None
) -> Catalog:
    """The platform catalog and the private catalog of every org, or with `orgs` only of
    those (a dedicated pool's gateways carry no other org's providers or credentials)."""
    providers = session.scalars(select(Provider).order_by(Provider.id)).all()
    models = session.scalars(select(Model).order_by(Model.name, Model.priority, Model.id)).all()
    routes = session.scalars(select(Route).order_by(Route.name)).all()
    if orgs is not None:
        providers = [p for p in providers if p.org_id is None or p.org_id in orgs]
        models = [m for m in models if m.org_id is None or m.org_id in orgs]
        routes = [r for r in routes if r.org_id is None or r.org_id in orgs]

    platform: set[str] = set()
    private: dict[str, set[str]] = defaultdict(set)
    for m in models:
        (platform if m.org_id is None else private[m.org_id]).add(m.name)
    for r in routes:
        (platform if r.org_id is None else private[r.org_id]).update(r.aliases or [])
    names_by_org = {org: names | platform for org, names in private.items()}

    routing_row = session.get(RoutingSettings, 1)
    routing = None
    if routing_row is not None:
        values = Routing.model_validate(routing_row)
        if values != Routing():
            routing = values.model_dump()
    return Catalog(
        providers=[provider_entry(p, secrets) for p in providers],
        models=[model_entry(m) for m in models],
        routes=[
            {"name": r.name, "strategy": r.strategy, "aliases": list(r.aliases or [])}
            for r in routes
        ],
        routing=routing,
        names_by_org=names_by_org,
        platform_names=platform,
    )


def visible_names(cat: Catalog, org_id: str) -> set[str]:
    return cat.names_by_org.get(org_id, cat.platform_names)


def org_settings(session: Session) -> dict[str, dict[str, Any]]:
    """org_id -> the non-default `policy`, `limits` and `guard` entries of that org."""
    out: dict[str, dict[str, Any]] = {}
    for row in session.scalars(select(OrgGatewaySettings)).all():
        extra: dict[str, Any] = {}
        # The engine's default for an org without a policy is OrgPolicy()'s.
        if row.policy:
            policy = OrgPolicy.model_validate(row.policy)
            if not policy.is_default():
                extra["policy"] = policy.model_dump()
        if row.rpm is not None or row.tpm is not None or row.concurrency is not None:
            extra["limits"] = {
                **EMPTY_LIMITS,
                "rpm": row.rpm,
                "tpm": row.tpm,
                "concurrency": row.concurrency,
            }
        if row.guard_mode != "off":
            extra["guard"] = {"mode": row.guard_mode, "categories": row.guard_categories}
        if extra:
            out[row.org_id] = extra
    return out


def key_policies(session: Session) -> dict[str, dict[str, Any]]:
    return {
        row.key_id: Policy.model_validate(row.policy).model_dump()
        for row in session.scalars(select(KeyPolicy)).all()
    }


def merge_org_settings(entry: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """Add this domain's fields to an orgs[] entry, keeping limits others already set
    (budgets) and setting only the rate-limit fields."""
    if not extra:
        return entry
    for name, value in extra.items():
        if name == "limits":
            limits = dict(entry.get("limits") or EMPTY_LIMITS)
            limits.update({k: value[k] for k in ("rpm", "tpm", "concurrency")})
            entry["limits"] = limits
        else:
            entry[name] = value
    return entry
