from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onetoken.db.models import Model, Provider, new_id
from onetoken.db.session import bump_revision
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Conflict, NotFound

log = logging.getLogger("onetoken.providers")

DEFAULT_CHAT_MAX_OUTPUT = 4096


def _name_taken(session: Session, org_id: str, name: str, exclude_id: str | None = None) -> bool:
    q = select(Provider.id).where(Provider.org_id == org_id, Provider.name == name)
    if exclude_id:
        q = q.where(Provider.id != exclude_id)
    return session.scalar(q) is not None


def create_provider(
    session: Session,
    secrets: Secrets,
    org_id: str,
    *,
    name: str,
    protocol: str,
    base_url: str,
    api_key: str | None,
    connect_timeout_ms: int = 2000,
    first_byte_timeout_ms: int = 60000,
    idle_timeout_ms: int = 60000,
) -> Provider:
    if _name_taken(session, org_id, name):
        raise Conflict("A provider with this name already exists.", param="name")
    provider = Provider(
        id=new_id("prov"),
        org_id=org_id,
        name=name,
        protocol=protocol,
        base_url=base_url,
        api_key_encrypted=secrets.encrypt(api_key) if api_key else None,
        connect_timeout_ms=connect_timeout_ms,
        first_byte_timeout_ms=first_byte_timeout_ms,
        idle_timeout_ms=idle_timeout_ms,
    )
    session.add(provider)
    bump_revision(session)
    session.flush()
    log.info("provider.created", extra={"org_id": org_id, "provider_id": provider.id})
    return provider


def list_providers(session: Session, org_id: str) -> Sequence[Provider]:
    return session.scalars(
        select(Provider).where(Provider.org_id == org_id).order_by(Provider.created_at, Provider.id)
    ).all()


def get_provider(session: Session, org_id: str, provider_id: str) -> Provider:
    provider = session.get(Provider, provider_id)
    if provider is None or provider.org_id != org_id:
        raise NotFound("Provider not found.")
    return provider


def find_provider_by_name(session: Session, org_id: str, name: str) -> Provider | None:
    return session.scalars(
        select(Provider).where(Provider.org_id == org_id, Provider.name == name)
    ).one_or_none()


def update_provider(
    session: Session, secrets: Secrets, org_id: str, provider_id: str, changes: dict[str, Any]
) -> Provider:
    provider = get_provider(session, org_id, provider_id)
    name = changes.get("name")
    if name is not None and name != provider.name:
        if _name_taken(session, org_id, name, exclude_id=provider.id):
            raise Conflict("A provider with this name already exists.", param="name")
        provider.name = name
    for field in (
        "protocol",
        "base_url",
        "connect_timeout_ms",
        "first_byte_timeout_ms",
        "idle_timeout_ms",
    ):
        if changes.get(field) is not None:
            setattr(provider, field, changes[field])
    if "api_key" in changes:
        api_key = changes["api_key"]
        provider.api_key_encrypted = secrets.encrypt(api_key) if api_key else None
    bump_revision(session)
    session.flush()
    log.info("provider.updated", extra={"org_id": org_id, "provider_id": provider.id})
    return provider


def delete_provider(session: Session, org_id: str, provider_id: str) -> None:
    provider = get_provider(session, org_id, provider_id)
    in_use = session.scalar(
        select(func.count()).select_from(Model).where(Model.provider_id == provider.id)
    )
    if in_use:
        raise Conflict("Delete the provider's models first.", code="provider_in_use")
    session.delete(provider)
    bump_revision(session)
    session.flush()
    log.info("provider.deleted", extra={"org_id": org_id, "provider_id": provider_id})


def _model_name_taken(session: Session, name: str, exclude_id: str | None = None) -> bool:
    q = select(Model.id).where(Model.name == name)
    if exclude_id:
        q = q.where(Model.id != exclude_id)
    return session.scalar(q) is not None


def create_model(
    session: Session,
    org_id: str,
    *,
    name: str,
    kind: str,
    provider_id: str,
    upstream_model: str,
    input_price: int,
    output_price: int | None = None,
    cached_input_price: int | None = None,
    max_output_tokens: int | None = None,
) -> Model:
    get_provider(session, org_id, provider_id)
    if _model_name_taken(session, name):
        raise Conflict("A model with this name already exists.", param="name")
    if max_output_tokens is None:
        max_output_tokens = DEFAULT_CHAT_MAX_OUTPUT if kind == "chat" else 0
    model = Model(
        id=new_id("mdl"),
        org_id=org_id,
        name=name,
        kind=kind,
        provider_id=provider_id,
        upstream_model=upstream_model,
        input_price=input_price,
        output_price=output_price or 0,
        # Without a cache price, cached tokens cost the same as other input tokens.
        cached_input_price=input_price if cached_input_price is None else cached_input_price,
        max_output_tokens=max_output_tokens,
    )
    session.add(model)
    bump_revision(session)
    session.flush()
    log.info("model.created", extra={"org_id": org_id, "model_id": model.id})
    return model


def list_models(session: Session, org_id: str) -> Sequence[Model]:
    return session.scalars(select(Model).where(Model.org_id == org_id).order_by(Model.name)).all()


def get_model(session: Session, org_id: str, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.org_id != org_id:
        raise NotFound("Model not found.")
    return model


def update_model(session: Session, org_id: str, model_id: str, changes: dict[str, Any]) -> Model:
    model = get_model(session, org_id, model_id)
    name = changes.get("name")
    if name is not None and name != model.name:
        if _model_name_taken(session, name, exclude_id=model.id):
            raise Conflict("A model with this name already exists.", param="name")
        model.name = name
    if changes.get("provider_id") is not None:
        model.provider_id = get_provider(session, org_id, changes["provider_id"]).id
    for field in (
        "kind",
        "upstream_model",
        "input_price",
        "output_price",
        "cached_input_price",
        "max_output_tokens",
    ):
        if changes.get(field) is not None:
            setattr(model, field, changes[field])
    bump_revision(session)
    session.flush()
    log.info("model.updated", extra={"org_id": org_id, "model_id": model.id})
    return model


def delete_model(session: Session, org_id: str, model_id: str) -> None:
    model = get_model(session, org_id, model_id)
    session.delete(model)
    bump_revision(session)
    session.flush()
    log.info("model.deleted", extra={"org_id": org_id, "model_id": model_id})
