"""Providers, deployments, presets, routes, routing, org policies, rate limits and guard.

Who may do what (permissions of onetoken.security.permissions): an org reads its private
entries and the platform catalog, and its writers change its private entries, its policy,
its guard and its keys' policies. Operators (`accounts.is_operator`) also manage the
platform catalog, platform routes, the routing settings and every org's rate limits,
and may read and set any org's settings. Another org's private entries and settings
answer 404, exactly like missing ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from onetoken.kit.errors import Forbidden, NotFound
from onetoken.orgs import service as orgs_service
from onetoken.providers import gateway_service as gw
from onetoken.providers import service
from onetoken.providers.engine_rules import engine_rules
from onetoken.providers.gateway_schemas import (
    Guard,
    OrgLimits,
    OrgPolicy,
    Policy,
    RouteCreate,
    RouteList,
    RouteResponse,
    RouteUpdate,
    Routing,
)
from onetoken.providers.models import Model, Provider, Route
from onetoken.providers.presets import PRESETS
from onetoken.providers.schemas import (
    ModelCreate,
    ModelList,
    ModelResponse,
    ModelUpdate,
    PresetList,
    PresetResponse,
    Processor,
    ProviderCreate,
    ProviderList,
    ProviderResponse,
    ProviderUpdate,
    check_base_url_target,
)
from onetoken.security import audit
from onetoken.security.principal import Principal
from onetoken.state import AppState
from onetoken.web.deps import (
    ModelsReadDep,
    ModelsWriteDep,
    OrgReadDep,
    OrgsManageDep,
    OrgWriteDep,
    ProvidersReadDep,
    ProvidersWriteDep,
    SessionDep,
    StateDep,
)

router = APIRouter(tags=["providers"])



def _provider_out(p: Provider) -> ProviderResponse:
    # Built field by field so the encrypted credential cannot leak into a response.
    return ProviderResponse(
        id=p.id,
        org_id=p.org_id,
        scope=service.scope_of(p.org_id),  # type: ignore[arg-type]
        name=p.name,
        preset=p.preset,
        protocol=p.protocol,  # type: ignore[arg-type]
        base_url=p.base_url,
        has_api_key=p.api_key_encrypted is not None,
        credential_env=p.credential_env,
        connect_timeout_ms=p.connect_timeout_ms,
        first_byte_timeout_ms=p.first_byte_timeout_ms,
        idle_timeout_ms=p.idle_timeout_ms,
        api_version=p.api_version,
        vendor=p.vendor,
        region=p.region,
        retains_content=p.retains_content,
        trains_on_data=p.trains_on_data,
        zero_retention=p.zero_retention,
        tags=list(p.tags or []),
        max_concurrency=p.max_concurrency,
        managed_by=p.managed_by,  # type: ignore[arg-type]
        created_at=p.created_at,
    )


def _model_out(m: Model, provider: Provider) -> ModelResponse:
    return ModelResponse.model_validate(
        {
            **{
                c: getattr(m, c)
                for c in ModelResponse.model_fields
                if c not in ("scope", "processor")
            },
            "scope": service.scope_of(m.org_id),
            "processor": Processor.model_validate(provider),
        }
    )


def _models_out(session: Session, models: Sequence[Model]) -> list[ModelResponse]:
    providers = service.providers_by_id(session, {m.provider_id for m in models})
    return [_model_out(m, providers[m.provider_id]) for m in models]


def _route_out(r: Route) -> RouteResponse:
    return RouteResponse(
        id=r.id,
        org_id=r.org_id,
        scope=service.scope_of(r.org_id),  # type: ignore[arg-type]
        name=r.name,
        strategy=r.strategy,  # type: ignore[arg-type]
        aliases=list(r.aliases or []),
        managed_by=r.managed_by,  # type: ignore[arg-type]
    )


def require_operator(principal: Principal) -> None:
    if not principal.is_operator:
        raise Forbidden("Only operators manage the platform catalog.")


def _owner_for_write(principal: Principal, owner: str | None) -> str | None:
    """The scope a writer acts in; the platform scope needs an operator."""
    if owner is None:
        require_operator(principal)
    return owner


def _scope_owner(principal: Principal, scope: str) -> str | None:
    return _owner_for_write(principal, None if scope == "platform" else principal.org_id)


@contextmanager
def _catalog_change(session: Session, state: AppState) -> Iterator[None]:
    """A change to the catalog: refused (422) before its commit when the engine would
    leave an entry out, and answered to the waiting gateways after it."""
    with engine_rules(session, state.secrets):
        yield
    state.commit_change(session)


# -- providers ---------------------------------------------------------------------------


@router.get("/provider-presets", response_model=PresetList)
def list_presets(_: ProvidersReadDep) -> PresetList:
    return PresetList(data=[PresetResponse(**p.as_dict()) for p in PRESETS.values()])


@router.post("/providers", response_model=ProviderResponse, status_code=201)
def create_provider(
    body: ProviderCreate, principal: ProvidersWriteDep, session: SessionDep, state: StateDep
) -> ProviderResponse:
    owner = _scope_owner(principal, body.scope)
    check_base_url_target(body.base_url, org_scoped=owner is not None,
                          private_cidrs=state.settings.upstream_private_cidrs)
    fields = body.model_dump(exclude={"scope", "api_key", "name", "preset"}, exclude_none=True)
    with _catalog_change(session, state):
        provider = service.create_provider(
            session,
            state.secrets,
            owner,
            name=body.name,
            preset=body.preset,
            api_key=body.api_key.get_secret_value() if body.api_key else None,
            **fields,
        )
    return _provider_out(provider)


@router.get("/providers", response_model=ProviderList)
def list_providers(principal: ProvidersReadDep, session: SessionDep) -> ProviderList:
    return ProviderList(
        data=[_provider_out(p) for p in service.list_providers(session, principal.org_id)]
    )


@router.get("/providers/{provider_id}", response_model=ProviderResponse)
def get_provider(
    provider_id: str, principal: ProvidersReadDep, session: SessionDep
) -> ProviderResponse:
    return _provider_out(service.get_visible_provider(session, principal.org_id, provider_id))


@router.patch("/providers/{provider_id}", response_model=ProviderResponse)
def update_provider(
    provider_id: str,
    body: ProviderUpdate,
    principal: ProvidersWriteDep,
    session: SessionDep,
    state: StateDep,
) -> ProviderResponse:
    owner = _owner_for_write(
        principal, service.get_visible_provider(session, principal.org_id, provider_id).org_id
    )
    check_base_url_target(body.base_url, org_scoped=owner is not None,
                          private_cidrs=state.settings.upstream_private_cidrs)
    changes = {f: getattr(body, f) for f in body.model_fields_set}
    if "api_key" in changes and changes["api_key"] is not None:
        changes["api_key"] = changes["api_key"].get_secret_value()
    with _catalog_change(session, state):
        provider = service.update_provider(session, state.secrets, owner, provider_id, changes)
    return _provider_out(provider)


@router.delete("/providers/{provider_id}", status_code=204)
def delete_provider(
    provider_id: str, principal: ProvidersWriteDep, session: SessionDep, state: StateDep
) -> Response:
    owner = _owner_for_write(
        principal, service.get_visible_provider(session, principal.org_id, provider_id).org_id
    )
    with _catalog_change(session, state):
        service.delete_provider(session, owner, provider_id)
    return Response(status_code=204)


# -- deployments -------------------------------------------------------------------------


@router.post("/models", response_model=ModelResponse, status_code=201)
def create_model(
    body: ModelCreate, principal: ModelsWriteDep, session: SessionDep, state: StateDep
) -> ModelResponse:
    provider = service.get_visible_provider(session, principal.org_id, body.provider_id)
    owner = _owner_for_write(principal, provider.org_id)
    with _catalog_change(session, state):
        model = service.create_model(session, owner, **body.model_dump())
    return _models_out(session, [model])[0]


@router.get("/models", response_model=ModelList)
def list_models(principal: ModelsReadDep, session: SessionDep) -> ModelList:
    return ModelList(data=_models_out(session, service.list_models(session, principal.org_id)))


@router.get("/models/{model_id}", response_model=ModelResponse)
def get_model(model_id: str, principal: ModelsReadDep, session: SessionDep) -> ModelResponse:
    model = service.get_visible_model(session, principal.org_id, model_id)
    return _models_out(session, [model])[0]


@router.patch("/models/{model_id}", response_model=ModelResponse)
def update_model(
    model_id: str,
    body: ModelUpdate,
    principal: ModelsWriteDep,
    session: SessionDep,
    state: StateDep,
) -> ModelResponse:
    owner = _owner_for_write(
        principal, service.get_visible_model(session, principal.org_id, model_id).org_id
    )
    changes = body.model_dump(include=body.model_fields_set)
    with _catalog_change(session, state):
        model = service.update_model(session, owner, model_id, changes)
    return _models_out(session, [model])[0]


@router.delete("/models/{model_id}", status_code=204)
def delete_model(
    model_id: str, principal: ModelsWriteDep, session: SessionDep, state: StateDep
) -> Response:
    owner = _owner_for_write(
        principal, service.get_visible_model(session, principal.org_id, model_id).org_id
    )
    with _catalog_change(session, state):
        service.delete_model(session, owner, model_id)
    return Response(status_code=204)


# -- routes and routing ------------------------------------------------------------------


@router.post("/routes", response_model=RouteResponse, status_code=201)
def create_route(
    body: RouteCreate, principal: ModelsWriteDep, session: SessionDep, state: StateDep
) -> RouteResponse:
    owner = _scope_owner(principal, body.scope)
    with _catalog_change(session, state):
        route = gw.create_route(
            session, owner, name=body.name, strategy=body.strategy, aliases=body.aliases
        )
    return _route_out(route)


@router.get("/routes", response_model=RouteList)
def list_routes(principal: ModelsReadDep, session: SessionDep) -> RouteList:
    return RouteList(data=[_route_out(r) for r in gw.list_routes(session, principal.org_id)])


@router.get("/routes/{route_id}", response_model=RouteResponse)
def get_route(route_id: str, principal: ModelsReadDep, session: SessionDep) -> RouteResponse:
    return _route_out(gw.get_visible_route(session, principal.org_id, route_id))


@router.patch("/routes/{route_id}", response_model=RouteResponse)
def update_route(
    route_id: str,
    body: RouteUpdate,
    principal: ModelsWriteDep,
    session: SessionDep,
    state: StateDep,
) -> RouteResponse:
    owner = _owner_for_write(
        principal, gw.get_visible_route(session, principal.org_id, route_id).org_id
    )
    changes = body.model_dump(include=body.model_fields_set)
    with _catalog_change(session, state):
        route = gw.update_route(session, owner, route_id, changes)
    return _route_out(route)


@router.delete("/routes/{route_id}", status_code=204)
def delete_route(
    route_id: str, principal: ModelsWriteDep, session: SessionDep, state: StateDep
) -> Response:
    owner = _owner_for_write(
        principal, gw.get_visible_route(session, principal.org_id, route_id).org_id
    )
    with _catalog_change(session, state):
        gw.delete_route(session, owner, route_id)
    return Response(status_code=204)


@router.get("/routing", response_model=Routing)
def get_routing(_: ModelsReadDep, session: SessionDep) -> Routing:
    return gw.get_routing(session)


@router.put("/routing", response_model=Routing)
def set_routing(
    body: Routing, principal: ModelsWriteDep, session: SessionDep, state: StateDep
) -> Routing:
    require_operator(principal)
    with _catalog_change(session, state):
        routing = gw.set_routing(session, body)
    return routing


# -- per-org settings --------------------------------------------------------------------


def _readable_org(session: Session, principal: Principal, org_id: str) -> str:
    """The org itself or, for an operator, any org (writes also need a write permission)."""
    if org_id != principal.org_id and not principal.is_operator:
        raise NotFound("Organization not found.")
    return orgs_service.get_org(session, org_id).id


@router.get("/orgs/{org_id}/policy", response_model=OrgPolicy)
def get_org_policy(org_id: str, principal: OrgReadDep, session: SessionDep) -> OrgPolicy:
    return gw.get_policy(session, _readable_org(session, principal, org_id))


@router.put("/orgs/{org_id}/policy", response_model=OrgPolicy)
def set_org_policy(
    org_id: str, body: OrgPolicy, principal: OrgWriteDep, session: SessionDep, state: StateDep
) -> OrgPolicy:
    """Replace the org's policy. `no_training` (default true) keeps providers that may
    train on submitted data away from the org; only its owner can set it to false
    (403 owner_only otherwise), and the change is in the security log."""
    target = _readable_org(session, principal, org_id)
    with _catalog_change(session, state):
        before = gw.set_policy(session, principal, target, body)
    if before.no_training != body.no_training:
        kind = "org.training_refused" if body.no_training else "org.training_allowed"
        audit.change(principal, kind, subject_id=target, org_id=target,
                     before={"no_training": before.no_training},
                     after={"no_training": body.no_training}, severity="high")
    return body


@router.get("/orgs/{org_id}/guard", response_model=Guard)
def get_org_guard(org_id: str, principal: OrgReadDep, session: SessionDep) -> Guard:
    return gw.get_guard(session, _readable_org(session, principal, org_id))


@router.put("/orgs/{org_id}/guard", response_model=Guard)
def set_org_guard(
    org_id: str, body: Guard, principal: OrgWriteDep, session: SessionDep, state: StateDep
) -> Guard:
    with _catalog_change(session, state):
        guard = gw.set_guard(session, _readable_org(session, principal, org_id), body)
    return guard


@router.get("/orgs/{org_id}/limits", response_model=OrgLimits)
def get_org_limits(org_id: str, principal: OrgReadDep, session: SessionDep) -> OrgLimits:
    return gw.get_limits(session, _readable_org(session, principal, org_id))


# Org-wide rate limits are the operator's commercial terms (orgs narrow per key instead).
@router.put("/orgs/{org_id}/limits", response_model=OrgLimits)
def set_org_limits(
    org_id: str, body: OrgLimits, principal: OrgsManageDep, session: SessionDep, state: StateDep
) -> OrgLimits:
    target = _readable_org(session, principal, org_id)
    limits = gw.set_limits(session, target, body)
    state.commit_change(session)
    return limits


@router.get("/keys/{key_id}/policy", response_model=Policy)
def get_key_policy(key_id: str, principal: OrgReadDep, session: SessionDep) -> Policy:
    return gw.get_key_policy(session, principal.org_id, key_id)


@router.put("/keys/{key_id}/policy", response_model=Policy)
def set_key_policy(
    key_id: str, body: Policy, principal: OrgWriteDep, session: SessionDep, state: StateDep
) -> Policy:
    policy = gw.set_key_policy(session, principal.org_id, key_id, body)
    state.commit_change(session)
    return policy
