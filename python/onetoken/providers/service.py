"""Providers and their deployments (models), in two scopes.

The platform catalog (org_id NULL) is managed by operators (`accounts.is_operator`, the
platform's staff) and usable by every org; an org may add private
providers and deployments that only its own keys reach. Functions taking `owner` act
within one scope: an org id, or None for the platform catalog.

Public model names: one row is one deployment, several rows may serve one name. A name
belongs to the platform when the catalog serves it, else to the one org whose private
deployments serve it; an org may add private deployments under a platform name (its own
credentials for a catalog model), never under another org's name. Route aliases are names
too and never collide with model names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from onetoken.db.base import new_id
from onetoken.db.session import config_changed, scoped_loader
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Conflict, Unprocessable
from onetoken.providers.models import Model, Provider, Route
from onetoken.providers.presets import PRESETS, apply_preset

log = logging.getLogger("onetoken.providers")

DEFAULT_CHAT_MAX_OUTPUT = 4096
_ATTRIBUTES = (
    "protocol",
    "base_url",
    "connect_timeout_ms",
    "first_byte_timeout_ms",
    "idle_timeout_ms",
    "api_version",
    "vendor",
    "region",
    "retains_content",
    "trains_on_data",
    "zero_retention",
    "tags",
    "max_concurrency",
)
# Attributes that `null` clears in an update (the others ignore null).
_CLEARABLE = frozenset({"api_version", "max_concurrency"})
_MODEL_FIELDS = (
    "kind",
    "upstream_model",
    "input_price",
    "output_price",
    "cached_input_price",
    "max_output_tokens",
    "request_price",
    "priority",
    "weight",
    "image_prices",
    "audio_second_price",
    "character_price",
    "search_unit_price",
)


# -- scopes ------------------------------------------------------------------------------


def scope_of(org_id: str | None) -> str:
    return "platform" if org_id is None else "org"


def in_scope(column: Any, owner: str | None) -> Any:
    """`column IS NULL` for the platform scope, `column = owner` for an org."""
    return column.is_(None) if owner is None else column == owner


def visible_to(column: Any, org_id: str | None, *, include_platform: bool = True) -> Any:
    """What `org_id` sees: its own rows and, unless told not to, the platform's (None:
    the platform's only)."""
    if org_id is None or not include_platform:
        return in_scope(column, org_id)
    return or_(column == org_id, column.is_(None))


# -- providers ---------------------------------------------------------------------------


def _name_taken(
    session: Session, owner: str | None, name: str, exclude_id: str | None = None
) -> bool:
    q = select(Provider.id).where(in_scope(Provider.org_id, owner), Provider.name == name)
    if exclude_id:
        q = q.where(Provider.id != exclude_id)
    return session.scalar(q) is not None


def create_provider(
    session: Session,
    secrets: Secrets,
    owner: str | None,
    *,
    name: str,
    protocol: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    preset: str | None = None,
    connect_timeout_ms: int = 2000,
    first_byte_timeout_ms: int = 60000,
    idle_timeout_ms: int = 60000,
    credential_env: str | None = None,
    managed_by: str = "api",
    **attributes: Any,
) -> Provider:
    """`attributes`: api_version, vendor, region, retains_content, trains_on_data,
    zero_retention, tags, max_concurrency; a `preset` fills in what is not given."""
    unknown = set(attributes) - set(_ATTRIBUTES)
    if unknown:
        raise TypeError(f"unknown provider attributes: {sorted(unknown)}")
    if preset is not None and preset not in PRESETS:
        raise Unprocessable("Unknown preset.", param="preset")
    if _name_taken(session, owner, name):
        raise Conflict("A provider with this name already exists.", param="name")
    given = apply_preset(preset, {"protocol": protocol, "base_url": base_url, **attributes})
    if not given.get("base_url"):
        raise Unprocessable("base_url is required (this preset has none).", param="base_url")
    provider = Provider(
        id=new_id("prov"),
        org_id=owner,
        name=name,
        preset=preset,
        protocol=given.get("protocol") or "openai",
        base_url=given["base_url"],
        api_key_encrypted=secrets.encrypt(api_key) if api_key else None,
        credential_env=credential_env,
        connect_timeout_ms=connect_timeout_ms,
        first_byte_timeout_ms=first_byte_timeout_ms,
        idle_timeout_ms=idle_timeout_ms,
        api_version=given.get("api_version"),
        vendor=given.get("vendor") or "",
        region=given.get("region") or "",
        retains_content=bool(given.get("retains_content")),
        trains_on_data=bool(given.get("trains_on_data")),
        zero_retention=bool(given.get("zero_retention")),
        tags=list(given.get("tags") or []),
        max_concurrency=given.get("max_concurrency"),
        managed_by=managed_by,
    )
    session.add(provider)
    ids = {"org_id": owner, "provider_id": provider.id, "kind": scope_of(owner)}
    config_changed(session, log, "provider.created", **ids)
    return provider


def list_providers(
    session: Session, org_id: str | None, *, include_platform: bool = True
) -> Sequence[Provider]:
    """The org's private providers, and the platform catalog unless told not to."""
    cond = visible_to(Provider.org_id, org_id, include_platform=include_platform)
    return session.scalars(
        select(Provider).where(cond).order_by(Provider.created_at, Provider.id)
    ).all()


get_provider = scoped_loader(Provider, "Provider not found.")
get_visible_provider = scoped_loader(Provider, "Provider not found.", with_platform=True)


def find_provider_by_name(session: Session, owner: str | None, name: str) -> Provider | None:
    return session.scalars(
        select(Provider).where(in_scope(Provider.org_id, owner), Provider.name == name)
    ).one_or_none()


def update_provider(
    session: Session, secrets: Secrets, owner: str | None, provider_id: str, changes: dict[str, Any]
) -> Provider:
    provider = get_provider(session, owner, provider_id)
    name = changes.get("name")
    if name is not None and name != provider.name:
        if _name_taken(session, owner, name, exclude_id=provider.id):
            raise Conflict("A provider with this name already exists.", param="name")
        provider.name = name
    for field in _ATTRIBUTES:
        if field not in changes:
            continue
        value = changes[field]
        if value is None and field not in _CLEARABLE:
            continue
        setattr(provider, field, list(value) if field == "tags" else value)
    if "api_key" in changes:
        api_key = changes["api_key"]
        provider.api_key_encrypted = secrets.encrypt(api_key) if api_key else None
        provider.credential_env = changes.get("credential_env")
    config_changed(session, log, "provider.updated", org_id=owner, provider_id=provider.id)
    return provider


def delete_provider(session: Session, owner: str | None, provider_id: str) -> None:
    provider = get_provider(session, owner, provider_id)
    in_use = session.scalar(
        select(func.count()).select_from(Model).where(Model.provider_id == provider.id)
    )
    if in_use:
        raise Conflict("Delete the provider's models first.", code="provider_in_use")
    session.delete(provider)
    config_changed(session, log, "provider.deleted", org_id=owner, provider_id=provider_id)


# -- names -------------------------------------------------------------------------------


def alias_owner(session: Session, name: str) -> Route | None:
    for route in session.scalars(select(Route)).all():
        if name in (route.aliases or []):
            return route
    return None


def check_model_name(
    session: Session, owner: str | None, name: str, kind: str, exclude_id: str | None = None
) -> None:
    """Raise unless `owner` may serve `name` (see the module docstring)."""
    if alias_owner(session, name) is not None:
        raise Conflict("This name is a route alias.", param="name")
    q = select(Model.org_id, Model.kind).where(Model.name == name)
    if exclude_id:
        q = q.where(Model.id != exclude_id)
    others = session.execute(q).all()
    route = session.scalars(select(Route).where(Route.name == name)).one_or_none()
    owners = {o for o, _ in others} | ({route.org_id} if route is not None else set())
    if owner is None:
        # Taken by an org unless the platform serves it already (then orgs' deployments
        # under it are their own credentials for a catalog name).
        foreign = bool(owners) and None not in owners
    else:
        foreign = any(o not in (None, owner) for o in owners)
    if foreign:
        raise Conflict("A model with this name already exists.", param="name")
    if any(k != kind for _, k in others):
        raise Conflict("Deployments of one model name must have the same kind.", param="kind")


# -- deployments (models) ----------------------------------------------------------------


def create_model(
    session: Session,
    owner: str | None,
    *,
    name: str,
    kind: str,
    provider_id: str,
    upstream_model: str,
    input_price: int,
    output_price: int | None = None,
    cached_input_price: int | None = None,
    max_output_tokens: int | None = None,
    request_price: int | None = None,
    priority: int = 0,
    weight: int = 1,
    managed_by: str = "api",
    image_prices: dict[str, int] | None = None,
    audio_second_price: int | None = None,
    character_price: int | None = None,
    search_unit_price: int | None = None,
) -> Model:
    provider = get_provider(session, owner, provider_id)
    check_model_name(session, owner, name, kind)
    if session.scalar(select(Model.id).where(Model.provider_id == provider.id, Model.name == name)):
        raise Conflict("This provider already serves a model with this name.", param="name")
    if max_output_tokens is None:
        max_output_tokens = DEFAULT_CHAT_MAX_OUTPUT if kind == "chat" else 0
    model = Model(
        id=new_id("mdl"),
        org_id=owner,
        name=name,
        kind=kind,
        provider_id=provider.id,
        upstream_model=upstream_model,
        input_price=input_price,
        output_price=output_price or 0,
        # Without a cache price, cached tokens cost the same as other input tokens.
        cached_input_price=input_price if cached_input_price is None else cached_input_price,
        max_output_tokens=max_output_tokens,
        request_price=request_price or 0,
        priority=priority,
        weight=weight,
        managed_by=managed_by,
        image_prices=dict(image_prices or {}),
        audio_second_price=audio_second_price or 0,
        character_price=character_price or 0,
        search_unit_price=search_unit_price or 0,
    )
    session.add(model)
    config_changed(session, log, "model.created", org_id=owner, model_id=model.id)
    return model


def list_models(
    session: Session, org_id: str | None, *, include_platform: bool = True
) -> Sequence[Model]:
    cond = visible_to(Model.org_id, org_id, include_platform=include_platform)
    return session.scalars(
        select(Model).where(cond).order_by(Model.name, Model.priority, Model.id)
    ).all()


def providers_by_id(session: Session, ids: Iterable[str]) -> dict[str, Provider]:
    """The providers with these ids, whichever org they belong to (a model's provider is
    always in its scope)."""
    wanted = set(ids)
    if not wanted:
        return {}
    return {p.id: p for p in session.scalars(select(Provider).where(Provider.id.in_(wanted)))}


get_model = scoped_loader(Model, "Model not found.")
get_visible_model = scoped_loader(Model, "Model not found.", with_platform=True)


def update_model(
    session: Session, owner: str | None, model_id: str, changes: dict[str, Any]
) -> Model:
    model = get_model(session, owner, model_id)
    name = changes.get("name") or model.name
    kind = changes.get("kind") or model.kind
    if name != model.name or kind != model.kind:
        check_model_name(session, owner, name, kind, exclude_id=model.id)
    if changes.get("provider_id") is not None:
        model.provider_id = get_provider(session, owner, changes["provider_id"]).id
    if name != model.name or changes.get("provider_id") is not None:
        clash = session.scalar(
            select(Model.id).where(
                Model.provider_id == model.provider_id, Model.name == name, Model.id != model.id
            )
        )
        if clash:
            raise Conflict("This provider already serves a model with this name.", param="name")
    model.name = name
    for field in _MODEL_FIELDS:
        if changes.get(field) is not None:
            setattr(model, field, changes[field])
    config_changed(session, log, "model.updated", org_id=owner, model_id=model.id)
    return model


def delete_model(session: Session, owner: str | None, model_id: str) -> None:
    model = get_model(session, owner, model_id)
    session.delete(model)
    config_changed(session, log, "model.deleted", org_id=owner, model_id=model_id)
