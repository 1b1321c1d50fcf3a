"""Org policies, per-key policies, org rate limits, the guard, routes and routing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.base import new_id
from onetoken.db.session import bump_revision
from onetoken.keys import service as keys_service
from onetoken.keys.models import KeyPolicy
from onetoken.kit.errors import Conflict, NotFound, Unprocessable
from onetoken.providers.gateway_schemas import Guard, OrgLimits, Policy, Routing
from onetoken.providers.models import Model, OrgGatewaySettings, Route, RoutingSettings
from onetoken.providers.service import alias_owner, in_scope

log = logging.getLogger("onetoken.providers")

# -- org settings ------------------------------------------------------------------------


def _org_settings(session: Session, org_id: str, *, create: bool) -> OrgGatewaySettings | None:
    row = session.get(OrgGatewaySettings, org_id)
    if row is None and create:
        row = OrgGatewaySettings(org_id=org_id, guard_mode="off")
        session.add(row)
    return row


def get_policy(session: Session, org_id: str) -> Policy:
    row = _org_settings(session, org_id, create=False)
    return Policy.model_validate(row.policy) if row and row.policy else Policy()


def set_policy(session: Session, org_id: str, policy: Policy) -> Policy:
    row = _org_settings(session, org_id, create=True)
    assert row is not None
    row.policy = None if policy.is_permissive() else policy.model_dump()
    bump_revision(session)
    session.flush()
    log.info("org.policy_updated", extra={"org_id": org_id})
    return policy


def get_limits(session: Session, org_id: str) -> OrgLimits:
    row = _org_settings(session, org_id, create=False)
    if row is None:
        return OrgLimits()
    return OrgLimits(rpm=row.rpm, tpm=row.tpm, concurrency=row.concurrency)


def set_limits(session: Session, org_id: str, limits: OrgLimits) -> OrgLimits:
    row = _org_settings(session, org_id, create=True)
    assert row is not None
    row.rpm, row.tpm, row.concurrency = limits.rpm, limits.tpm, limits.concurrency
    bump_revision(session)
    session.flush()
    log.info("org.limits_updated", extra={"org_id": org_id})
    return limits


def get_guard(session: Session, org_id: str) -> Guard:
    row = _org_settings(session, org_id, create=False)
    if row is None:
        return Guard()
    return Guard.model_validate({"mode": row.guard_mode, "categories": row.guard_categories})


def set_guard(session: Session, org_id: str, guard: Guard) -> Guard:
    row = _org_settings(session, org_id, create=True)
    assert row is not None
    row.guard_mode = guard.mode
    row.guard_categories = (
        None if guard.categories is None else list(dict.fromkeys(guard.categories))
    )
    bump_revision(session)
    session.flush()
    log.info("org.guard_updated", extra={"org_id": org_id, "kind": guard.mode})
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
    if policy.is_permissive():
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(KeyPolicy(key_id=key_id, policy=policy.model_dump()))
    else:
        row.policy = policy.model_dump()
    bump_revision(session)
    session.flush()
    log.info("key.policy_updated", extra={"org_id": org_id, "key_id": key_id})
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
    strategy: str = "priority",
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
    bump_revision(session)
    session.flush()
    log.info("route.created", extra={"org_id": owner, "kind": strategy})
    return route


def list_routes(session: Session, org_id: str | None) -> Sequence[Route]:
    """The platform's routes and, for an org, its own."""
    q = select(Route)
    if org_id is not None:
        q = q.where((Route.org_id == org_id) | Route.org_id.is_(None))
    else:
        q = q.where(Route.org_id.is_(None))
    return session.scalars(q.order_by(Route.name)).all()


def get_route(session: Session, owner: str | None, route_id: str) -> Route:
    route = session.get(Route, route_id)
    if route is None or route.org_id != owner:
        raise NotFound("Route not found.")
    return route


def get_visible_route(session: Session, org_id: str, route_id: str) -> Route:
    route = session.get(Route, route_id)
    if route is None or route.org_id not in (org_id, None):
        raise NotFound("Route not found.")
    return route


def update_route(
    session: Session, owner: str | None, route_id: str, changes: dict[str, Any]
) -> Route:
    route = get_route(session, owner, route_id)
    if changes.get("aliases") is not None:
        _check_route_names(session, owner, route.name, changes["aliases"], exclude_id=route.id)
        route.aliases = list(changes["aliases"])
    if changes.get("strategy") is not None:
        route.strategy = changes["strategy"]
    bump_revision(session)
    session.flush()
    log.info("route.updated", extra={"org_id": owner})
    return route


def delete_route(session: Session, owner: str | None, route_id: str) -> None:
    session.delete(get_route(session, owner, route_id))
    bump_revision(session)
    session.flush()
    log.info("route.deleted", extra={"org_id": owner})


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
    bump_revision(session)
    session.flush()
    log.info("routing.updated")
    return routing
