"""Providers, deployments, routes and routing from a file (GitOps).

`onetoken providers apply FILE` and `ONETOKEN_PROVIDERS_FILE` (applied at serve start)
read YAML (.yaml/.yml), TOML (.toml) or JSON (.json):

    org: null                 # null/absent: the platform catalog; else an org id or name
    prune: false              # true: delete file-managed entries the file no longer lists
    providers:
      - name: openai
        preset: openai        # fills base_url, protocol and data-processing attributes
        api_key_env: OPENAI_API_KEY   # credentials only by environment variable
        models:
          - {name: gpt-4o, upstream_model: gpt-4o, input_price: "2.50", output_price: "10"}
    routes:
      - {name: gpt-4o, strategy: priority, aliases: [chat-default]}
    routing: {max_attempts: 3}

The file is the desired state of what it lists: applying it twice changes nothing the
second time, and an entry's fields not given take the preset's or the default values.
Files hold no secrets: a literal `api_key` is refused, the credential is read from the
named environment variable at apply time and stored encrypted like one set through the
API. Everything is applied in one transaction, or nothing is.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.keys.schemas import ModelName
from onetoken.kit.crypto import DecryptionError, Secrets
from onetoken.kit.errors import OnetokenError, _validation_message
from onetoken.orgs import service as orgs_service
from onetoken.providers import gateway_service as gw
from onetoken.providers import service
from onetoken.providers.engine_rules import engine_rules
from onetoken.providers.gateway_schemas import DEFAULT_STRATEGY, Aliases, Routing, Strategy
from onetoken.providers.models import Model, Provider, Route
from onetoken.providers.presets import apply_preset
from onetoken.providers.schemas import (
    BaseUrl,
    ModelDeployment,
    ModelHead,
    PresetName,
    Protocol,
    ProviderAttributes,
    ProviderName,
    Timeout,
)

log = logging.getLogger("onetoken.providers")

EnvName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
]


class FileModel(ModelDeployment, ModelHead):
    model_config = ConfigDict(extra="forbid")


class _FileProviderHead(BaseModel):
    name: ProviderName
    preset: PresetName | None = None
    protocol: Protocol | None = None
    base_url: BaseUrl | None = None
    api_key_env: EnvName | None = None
    connect_timeout_ms: Timeout = 2000
    first_byte_timeout_ms: Timeout = 60000
    idle_timeout_ms: Timeout = 60000


class FileProvider(ProviderAttributes, _FileProviderHead):
    model_config = ConfigDict(extra="forbid")

    models: Annotated[list[FileModel], Field(max_length=1000)] = Field(default_factory=list)


class FileRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ModelName
    strategy: Strategy = DEFAULT_STRATEGY
    aliases: Aliases = Field(default_factory=list)


class ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    org: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    prune: bool = False
    providers: Annotated[list[FileProvider], Field(max_length=1000)] = Field(default_factory=list)
    routes: Annotated[list[FileRoute], Field(max_length=1000)] = Field(default_factory=list)
    routing: Routing | None = None


class ProvidersFileError(Exception):
    """The file cannot be read or applied; the message names fields, never values."""


@dataclass
class ApplyResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "updated": self.updated,
            "deleted": self.deleted,
            "unchanged": self.unchanged,
        }


def load_file(path: Path) -> ProvidersFile:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ProvidersFileError(f"{path}: use a .yaml, .yml, .toml or .json file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProvidersFileError(f"cannot read {path}: {exc.strerror or 'error'}") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(raw.decode())
        elif suffix == ".json":
            data = json.loads(raw)
        else:
            data = yaml.safe_load(raw)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError):
        # Parser messages quote the offending text, which may be anything.
        raise ProvidersFileError(f"{path}: not valid {suffix.lstrip('.').upper()}") from None
    if data is None:
        data = {}
    try:
        return ProvidersFile.model_validate(data)
    except ValidationError as exc:
        raise ProvidersFileError(f"{path}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_input=False)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            # The last element is a name the file made up; a literal api_key lands here.
            loc = ".".join(str(p) for p in err.get("loc", ())[:-1]) or "(top level)"
            problems.append(f"{loc}: unknown field (credentials go in api_key_env)")
            continue
        problems.append(f"{loc}: {_validation_message(dict(err))}")
    return "; ".join(problems)


def apply_file(
    session: Session, secrets: Secrets, doc: ProvidersFile, *, prune: bool = False
) -> ApplyResult:
    """Apply `doc` in the caller's transaction (the caller commits)."""
    owner: str | None = None
    if doc.org is not None:
        org = orgs_service.find_org(session, doc.org)
        if org is None:
            raise ProvidersFileError("org: no such organization")
        owner = org.id
    prune = prune or doc.prune
    result = ApplyResult()
    names = [p.name for p in doc.providers]
    if len(set(names)) != len(names):
        raise ProvidersFileError("providers: a provider name is listed twice")
    try:
        with engine_rules(session, secrets):
            for item in doc.providers:
                _apply_provider(session, secrets, owner, item, result, prune)
            _apply_routes(session, owner, doc.routes, result, prune)
            if prune:
                _prune_providers(session, owner, set(names), result)
            if doc.routing is not None:
                if gw.get_routing(session) != doc.routing:
                    gw.set_routing(session, doc.routing)
                    result.updated.append("routing")
                else:
                    result.unchanged += 1
    except OnetokenError as exc:
        raise ProvidersFileError(exc.message) from None
    log.info(
        "providers.file_applied",
        extra={"org_id": owner, "count": len(result.created) + len(result.updated)},
    )
    return result


def _credential(item: FileProvider) -> str | None:
    if item.api_key_env is None:
        return None
    value = os.environ.get(item.api_key_env)
    if not value:
        raise ProvidersFileError(
            f"providers.{item.name}: environment variable {item.api_key_env} is not set"
        )
    return value


def _apply_provider(
    session: Session,
    secrets: Secrets,
    owner: str | None,
    item: FileProvider,
    result: ApplyResult,
    prune: bool,
) -> None:
    api_key = _credential(item)
    given = item.model_dump(exclude={"name", "preset", "api_key_env", "models"})
    desired = apply_preset(item.preset, given)
    if not desired.get("base_url"):
        raise ProvidersFileError(f"providers.{item.name}: base_url is required")
    desired = {
        **desired,
        "protocol": desired.get("protocol") or "openai",
        "vendor": desired.get("vendor") or "",
        "region": desired.get("region") or "",
        "retains_content": bool(desired.get("retains_content")),
        "trains_on_data": bool(desired.get("trains_on_data")),
        "zero_retention": bool(desired.get("zero_retention")),
        "tags": list(desired.get("tags") or []),
    }
    label = f"provider:{item.name}"
    provider = service.find_provider_by_name(session, owner, item.name)
    if provider is None:
        attrs = {k: v for k, v in desired.items() if k not in ("protocol", "base_url")}
        provider = service.create_provider(
            session,
            secrets,
            owner,
            name=item.name,
            preset=item.preset,
            protocol=desired["protocol"],
            base_url=desired["base_url"],
            api_key=api_key,
            credential_env=item.api_key_env,
            managed_by="file",
            **attrs,
        )
        result.created.append(label)
    else:
        changes = {k: v for k, v in desired.items() if getattr(provider, k) != v}
        if _stored_credential(secrets, provider) != api_key or (
            provider.credential_env != item.api_key_env
        ):
            changes["api_key"] = api_key
            changes["credential_env"] = item.api_key_env
        if provider.preset != item.preset or provider.managed_by != "file":
            provider.preset = item.preset
            provider.managed_by = "file"
            changes.setdefault("preset", item.preset)
        if changes:
            service.update_provider(session, secrets, owner, provider.id, changes)
            result.updated.append(label)
        else:
            result.unchanged += 1
    _apply_models(session, owner, provider, item.models, result, prune)


def _stored_credential(secrets: Secrets, provider: Provider) -> str | None:
    if provider.api_key_encrypted is None:
        return None
    try:
        return secrets.decrypt(provider.api_key_encrypted)
    except DecryptionError:
        # Encrypted under another secret: replace it with the file's.
        return None


def _apply_models(
    session: Session,
    owner: str | None,
    provider: Provider,
    items: list[FileModel],
    result: ApplyResult,
    prune: bool,
) -> None:
    names = [m.name for m in items]
    if len(set(names)) != len(names):
        raise ProvidersFileError(f"providers.{provider.name}.models: a model is listed twice")
    existing = {
        m.name: m
        for m in session.scalars(select(Model).where(Model.provider_id == provider.id)).all()
    }
    for item in items:
        label = f"model:{provider.name}/{item.name}"
        desired = item.model_dump()
        if desired["max_output_tokens"] is None:
            desired["max_output_tokens"] = (
                service.DEFAULT_CHAT_MAX_OUTPUT if item.kind == "chat" else 0
            )
        desired["output_price"] = desired["output_price"] or 0
        desired["request_price"] = desired["request_price"] or 0
        desired["image_prices"] = desired["image_prices"] or {}
        for unit in ("audio_second_price", "character_price", "search_unit_price"):
            desired[unit] = desired[unit] or 0
        if desired["cached_input_price"] is None:
            desired["cached_input_price"] = desired["input_price"]
        model = existing.get(item.name)
        if model is None:
            service.create_model(
                session, owner, provider_id=provider.id, managed_by="file", **desired
            )
            result.created.append(label)
            continue
        changes = {k: v for k, v in desired.items() if getattr(model, k) != v}
        if model.managed_by != "file":
            model.managed_by = "file"
            changes.setdefault("managed_by", "file")
        if changes:
            service.update_model(session, owner, model.id, changes)
            result.updated.append(label)
        else:
            result.unchanged += 1
    if prune:
        for name, model in existing.items():
            if name not in names and model.managed_by == "file":
                service.delete_model(session, owner, model.id)
                result.deleted.append(f"model:{provider.name}/{name}")


def _apply_routes(
    session: Session, owner: str | None, items: list[FileRoute], result: ApplyResult, prune: bool
) -> None:
    names = [r.name for r in items]
    if len(set(names)) != len(names):
        raise ProvidersFileError("routes: a route is listed twice")
    for item in items:
        label = f"route:{item.name}"
        route = gw.find_route(session, owner, item.name)
        if route is None:
            gw.create_route(
                session,
                owner,
                name=item.name,
                strategy=item.strategy,
                aliases=item.aliases,
                managed_by="file",
            )
            result.created.append(label)
        elif (route.strategy, list(route.aliases or []), route.managed_by) != (
            item.strategy,
            item.aliases,
            "file",
        ):
            route.managed_by = "file"
            gw.update_route(
                session, owner, route.id, {"strategy": item.strategy, "aliases": item.aliases}
            )
            result.updated.append(label)
        else:
            result.unchanged += 1
    if prune:
        cond = service.in_scope(Route.org_id, owner)
        for route in session.scalars(select(Route).where(cond, Route.managed_by == "file")):
            if route.name not in names:
                gw.delete_route(session, owner, route.id)
                result.deleted.append(f"route:{route.name}")


def _prune_providers(
    session: Session, owner: str | None, keep: set[str], result: ApplyResult
) -> None:
    cond = service.in_scope(Provider.org_id, owner)
    for provider in session.scalars(select(Provider).where(cond, Provider.managed_by == "file")):
        if provider.name in keep:
            continue
        for model in session.scalars(select(Model).where(Model.provider_id == provider.id)):
            service.delete_model(session, owner, model.id)
            result.deleted.append(f"model:{provider.name}/{model.name}")
        service.delete_provider(session, owner, provider.id)
        result.deleted.append(f"provider:{provider.name}")
