from __future__ import annotations

from fastapi import APIRouter, Response

from onetoken.db.models import Provider
from onetoken.deps import PrincipalDep, SessionDep, StateDep, WriterDep
from onetoken.providers import service
from onetoken.providers.schemas import (
    ModelCreate,
    ModelList,
    ModelResponse,
    ModelUpdate,
    ProviderCreate,
    ProviderList,
    ProviderResponse,
    ProviderUpdate,
)

router = APIRouter(tags=["providers"])


def _provider_out(p: Provider) -> ProviderResponse:
    # Built field by field so the encrypted credential cannot leak into a response.
    return ProviderResponse(
        id=p.id,
        org_id=p.org_id,
        name=p.name,
        protocol=p.protocol,  # type: ignore[arg-type]
        base_url=p.base_url,
        has_api_key=p.api_key_encrypted is not None,
        connect_timeout_ms=p.connect_timeout_ms,
        first_byte_timeout_ms=p.first_byte_timeout_ms,
        idle_timeout_ms=p.idle_timeout_ms,
        created_at=p.created_at,
    )


@router.post("/providers", response_model=ProviderResponse, status_code=201)
def create_provider(
    body: ProviderCreate, principal: WriterDep, session: SessionDep, state: StateDep
) -> ProviderResponse:
    provider = service.create_provider(
        session,
        state.secrets,
        principal.org_id,
        name=body.name,
        protocol=body.protocol,
        base_url=body.base_url,
        api_key=body.api_key.get_secret_value() if body.api_key else None,
        connect_timeout_ms=body.connect_timeout_ms,
        first_byte_timeout_ms=body.first_byte_timeout_ms,
        idle_timeout_ms=body.idle_timeout_ms,
    )
    session.commit()
    state.config_changed()
    return _provider_out(provider)


@router.get("/providers", response_model=ProviderList)
def list_providers(principal: PrincipalDep, session: SessionDep) -> ProviderList:
    return ProviderList(
        data=[_provider_out(p) for p in service.list_providers(session, principal.org_id)]
    )


@router.get("/providers/{provider_id}", response_model=ProviderResponse)
def get_provider(
    provider_id: str, principal: PrincipalDep, session: SessionDep
) -> ProviderResponse:
    return _provider_out(service.get_provider(session, principal.org_id, provider_id))


@router.patch("/providers/{provider_id}", response_model=ProviderResponse)
def update_provider(
    provider_id: str,
    body: ProviderUpdate,
    principal: WriterDep,
    session: SessionDep,
    state: StateDep,
) -> ProviderResponse:
    changes = {f: getattr(body, f) for f in body.model_fields_set}
    if "api_key" in changes and changes["api_key"] is not None:
        changes["api_key"] = changes["api_key"].get_secret_value()
    provider = service.update_provider(
        session, state.secrets, principal.org_id, provider_id, changes
    )
    session.commit()
    state.config_changed()
    return _provider_out(provider)


@router.delete("/providers/{provider_id}", status_code=204)
def delete_provider(
    provider_id: str, principal: WriterDep, session: SessionDep, state: StateDep
) -> Response:
    service.delete_provider(session, principal.org_id, provider_id)
    session.commit()
    state.config_changed()
    return Response(status_code=204)


@router.post("/models", response_model=ModelResponse, status_code=201)
def create_model(
    body: ModelCreate, principal: WriterDep, session: SessionDep, state: StateDep
) -> ModelResponse:
    model = service.create_model(session, principal.org_id, **body.model_dump())
    session.commit()
    state.config_changed()
    return ModelResponse.model_validate(model)


@router.get("/models", response_model=ModelList)
def list_models(principal: PrincipalDep, session: SessionDep) -> ModelList:
    return ModelList(
        data=[
            ModelResponse.model_validate(m) for m in service.list_models(session, principal.org_id)
        ]
    )


@router.get("/models/{model_id}", response_model=ModelResponse)
def get_model(model_id: str, principal: PrincipalDep, session: SessionDep) -> ModelResponse:
    return ModelResponse.model_validate(service.get_model(session, principal.org_id, model_id))


@router.patch("/models/{model_id}", response_model=ModelResponse)
def update_model(
    model_id: str, body: ModelUpdate, principal: WriterDep, session: SessionDep, state: StateDep
) -> ModelResponse:
    changes = body.model_dump(include=body.model_fields_set)
    model = service.update_model(session, principal.org_id, model_id, changes)
    session.commit()
    state.config_changed()
    return ModelResponse.model_validate(model)


@router.delete("/models/{model_id}", status_code=204)
def delete_model(
    model_id: str, principal: WriterDep, session: SessionDep, state: StateDep
) -> Response:
    service.delete_model(session, principal.org_id, model_id)
    session.commit()
    state.config_changed()
    return Response(status_code=204)
