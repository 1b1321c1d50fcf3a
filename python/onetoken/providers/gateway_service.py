"""Org policies, per-key policies, org rate limits, the guard, routes and routing."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.base import new_id
from onetoken.db.session import config_changed, scoped_loader
from onetoken.keys import service as keys_service
from onetoken.keys.models import KeyPolicy
from onetoken.kit.errors import Conflict, Forbidden, Unprocessable
from onetoken.providers.gateway_schemas import (
    DEFAULT_STRATEGY,
    Guard,
    OrgLimits,
    OrgPolicy,
    Policy,
    Routing,
)
from onetoken.providers.models import Model, OrgGatewaySettings, Route, RoutingSettings
from onetoken.providers.service import alias_owner, in_scope, visible_to
from onetoken.security.principal import Principal

log = logging.getLogger("onetoken.providers")

# -- org settings ------------------------------------------------------------------------


def _org_settings(session: Session, org_id: str) -> OrgGatewaySettings | None:
    return session.get(OrgGatewaySettings, org_id)


@contextmanager
def _changing_org_settings(
    session: Session, org_id: str, event: str, **extra: str
) -> Iterator[OrgGatewaySettings]:
    """The org's settings row (created on first change) to change in the `with` body;
    then the new revision the gateways pick up, and the log line `event`."""
    row = _org_settings(session, org_id)
    if row is None:
        row = OrgGatewaySettings(org_id=org_id, guard_mode="off")
        session.add(row)
    yield row
    config_changed(session, log, event, org_id=org_id, **extra)


def get_policy(session: Session, org_id: str) -> OrgPolicy:
    row = _org_settings(session, org_id)
    return OrgPolicy.model_validate(row.policy) if row and row.policy else OrgPolicy()


#: The refusal when someone other than the org's owner would let providers that train on
#: submitted data serve the org.
TRAINING_OWNER_ONLY = "Only the organization's owner can allow providers that train on data."


def set_policy(
    session: Session, principal: Principal, org_id: str, policy: OrgPolicy
) -> OrgPolicy:
    """Replace the org's policy; returns the one it replaced. Lifting `no_training` is the
    org owner's own choice (not an admin's, not an operator's on the org's behalf); the
    caller records the change in the security log once it is committed."""
    before = get_policy(session, org_id)
    if before.no_training and not policy.no_training and not (
        principal.role == "owner" and principal.org_id == org_id
    ):
        raise Forbidden(TRAINING_OWNER_ONLY, code="owner_only", param="no_training")
    with _changing_org_settings(session, org_id, "org.policy_updated") as row:
        row.policy = None if policy.is_default() else policy.model_dump()
    return before


def get_limits(session: Session, org_id: str) -> OrgLimits:
    row = _org_settings(session, org_id)
    if row is None:
        return OrgLimits()
    return OrgLimits(rpm=row.rpm, tpm=row.tpm, concurrency=row.concurrency)


def set_limits(session: Session, org_id: str, limits: OrgLimits) -> OrgLimits:
    with _changing_org_settings(session, org_id, "org.limits_updated") as row:
        row.rpm, row.tpm, row.concurrency = limits.rpm, limits.tpm, limits.concurrency
    return limits


def get_guard(session: Session, org_id: str) -> Guard:
    row = _org_settings(session, org_id)
    if row is None:
        return Guard()
    return Guard.model_validate({"mode": row.guard_mode, "categories": row.guard_categories})


def set_guard(session: Session, org_id: str, guard: Guard) -> Guard:
    with _changing_org_settings(session, org_id, "org.guard_updated", kind=guard.mode) as row:
        row.guard_mode = guard.mode
        row.guard_categories = (
            None if guard.categories is None else list(dict.fromkeys(guard.categories))
        )
    return get_guard(session, org_id)


# -- key policies ------------------------------------------------------------------------

_LISTS = (("vendors", "vendor"), ("regions", "region"), ("models", "model"))


def check_narrows(org: Policy, key: Policy) -> None:
    """A key policy may only narrow: its allow-lists stay inside the org's. (Deny lists
    and flags only ever narrow, since the engine applies both policies.)"""
    for plural, singular in _LISTS:
        key_allow = getattr(key, f"allow_{plural}")
        if key_allow is None:
            continue
        org_allow = getattr(org, f"allow_{plural}")
        org_deny = set(getattr(org, f"deny_{plural}"))
        if (org_allow is not None and not set(key_allow) <= set(org_allow)) or (
            org_deny & set(key_allow)
        ):
            raise Unprocessable(
                f"A key policy can only narrow the org policy: allow_{plural} lists a "
                f"{singular} the org policy does not allow.",
                param=f"allow_{plural}",
                code="policy_widens",
            )


def get_key_policy(session: Session, org_id: str, key_id: str) -> Policy:
    keys_service.get_key(session, org_id, key_id)
    row = session.get(KeyPolicy, key_id)
    return Policy.model_validate(row.policy) if row else Policy()


def set_key_policy(session: Session, org_id: str, key_id: str, policy: Policy) -> Policy:
    keys_service.get_key(session, org_id, key_id)
    check_narrows(get_policy(session, org_id), policy)
    row = session.get(KeyPolicy, key_id)
    if policy.is_default():
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(KeyPolicy(key_id=key_id, policy=policy.model_dump()))
    else:
        row.policy = policy.model_dump()
    config_changed(session, log, "key.policy_updated", org_id=org_id, key_id=key_id)
    return policy


# -- routes ------------------------------------------------------------------------------


def _check_route_names(
    session: Session,
    owner: str | None,
    name: str,
    aliases: Sequence[str],
    exclude_id: str | None = None,
) -> None:
    owners = set(session.scalars(select(Model.org_id).where(Model.name == name)).all())
    if owner is None and owners and None not in owners:
        raise Conflict("An org's private model has this name.", param="name")
    if owner is not None and any(o != owner for o in owners):
        # A platform name's route is the operator's: it applies to every org.
        raise Conflict("Only the owner of a model name can route it.", param="name")
    owning = alias_owner(session, name)
    if owning is not None and owning.id != exclude_id:
        raise Conflict("This name is a route alias.", param="name")
    if len(set(aliases)) != len(aliases) or name in aliases:
        raise Unprocessable(
            "Aliases must be distinct from each other and the name.", param="aliases"
        )
    for alias in aliases:
        taken_by_model = session.scalar(select(Model.id).where(Model.name == alias).limit(1))
        taken_by_route = session.scalar(
            select(Route.id).where(Route.name == alias, Route.id != (exclude_id or ""))
        )
        other = alias_owner(session, alias)
        if taken_by_model or taken_by_route or (other is not None and other.id != exclude_id):
            raise Conflict("An alias is already a model or route name.", param="aliases")


def create_route(
    session: Session,
    owner: str | None,
    *,
    name: str,
    strategy: str = DEFAULT_STRATEGY,
    aliases: Sequence[str] = (),
    managed_by: str = "api",
) -> Route:
    if session.scalar(select(Route.id).where(Route.name == name)):
        raise Conflict("A route for this name already exists.", param="name")
    _check_route_names(session, owner, name, list(aliases))
    route = Route(
        id=new_id("rte"),
        org_id=owner,
        name=name,
        strategy=strategy,
        aliases=list(aliases),
        managed_by=managed_by,
    )
    session.add(route)
    config_changed(session, log, "route.created", org_id=owner, kind=strategy)
    return route


def list_routes(session: Session, org_id: str | None) -> Sequence[Route]:
    """The platform's routes and, for an org, its own."""
    q = select(Route).where(visible_to(Route.org_id, org_id))
    return session.scalars(q.order_by(Route.name)).all()


get_route = scoped_loader(Route, "Route not found.")
get_visible_route = scoped_loader(Route, "Route not found.", with_platform=True)


def update_route(
    session: Session, owner: str | None, route_id: str, changes: dict[str, Any]
) -> Route:
    route = get_route(session, owner, route_id)
    if changes.get("aliases") is not None:
        _check_route_names(session, owner, route.name, changes["aliases"], exclude_id=route.id)
        route.aliases = list(changes["aliases"])
    if changes.get("strategy") is not None:
        route.strategy = changes["strategy"]
    config_changed(session, log, "route.updated", org_id=owner)
    return route


def delete_route(session: Session, owner: str | None, route_id: str) -> None:
    session.delete(get_route(session, owner, route_id))
    config_changed(session, log, "route.deleted", org_id=owner)


def find_route(session: Session, owner: str | None, name: str) -> Route | None:
    return session.scalars(
        select(Route).where(in_scope(Route.org_id, owner), Route.name == name)
    ).one_or_none()


# -- routing settings --------------------------------------------------------------------


def get_routing(session: Session) -> Routing:
    row = session.get(RoutingSettings, 1)
    return Routing() if row is None else Routing.model_validate(row)


def set_routing(session: Session, routing: Routing) -> Routing:
    row = session.get(RoutingSettings, 1)
    if row is None:
        row = RoutingSettings(id=1)
        session.add(row)
    for field, value in routing.model_dump().items():
        setattr(row, field, value)
    config_changed(session, log, "routing.updated")
    return routing
