from __future__ import annotations

from fastapi import APIRouter

from onetoken.deps import PrincipalDep, SessionDep, StateDep, WriterDep
from onetoken.keys import service
from onetoken.keys.schemas import KeyCreate, KeyCreated, KeyList, KeyResponse, KeyUpdate

router = APIRouter(prefix="/keys", tags=["keys"])


@router.post("", response_model=KeyCreated, status_code=201)
def create_key(
    body: KeyCreate, principal: WriterDep, session: SessionDep, state: StateDep
) -> KeyCreated:
    key, plaintext = service.create_key(
        session,
        state.secrets,
        org_id=principal.org_id,
        created_by=principal.account_id,
        name=body.name,
        expires_at=body.expires_at,
        allowed_models=body.allowed_models,
    )
    session.commit()
    state.config_changed()
    return KeyCreated.model_validate(
        {**KeyResponse.model_validate(key).model_dump(), "key": plaintext}
    )


@router.get("", response_model=KeyList)
def list_keys(principal: PrincipalDep, session: SessionDep) -> KeyList:
    keys = service.list_keys(session, principal.org_id)
    return KeyList(data=[KeyResponse.model_validate(k) for k in keys])


@router.get("/{key_id}", response_model=KeyResponse)
def get_key(key_id: str, principal: PrincipalDep, session: SessionDep) -> KeyResponse:
    return KeyResponse.model_validate(service.get_key(session, principal.org_id, key_id))


@router.patch("/{key_id}", response_model=KeyResponse)
def update_key(
    key_id: str, body: KeyUpdate, principal: WriterDep, session: SessionDep, state: StateDep
) -> KeyResponse:
    changes = body.model_dump(include=body.model_fields_set)
    key = service.update_key(session, principal.org_id, key_id, changes)
    session.commit()
    state.config_changed()
    return KeyResponse.model_validate(key)


@router.post("/{key_id}/revoke", response_model=KeyResponse)
def revoke_key(
    key_id: str, principal: WriterDep, session: SessionDep, state: StateDep
) -> KeyResponse:
    key = service.revoke_key(session, principal.org_id, key_id)
    session.commit()
    state.config_changed()
    return KeyResponse.model_validate(key)
