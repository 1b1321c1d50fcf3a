"""API keys: created once, shown once, stored as a keyed hash and a display id."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

from fastapi import APIRouter

from onetoken.keys import applications, service
from onetoken.keys.models import ApiKey
from onetoken.keys.schemas import (
    KeyCreate,
    KeyCreated,
    KeyLimitsOut,
    KeyList,
    KeyResponse,
    KeyRotate,
    KeyRotated,
    KeyUpdate,
)
from onetoken.web.deps import KeysReadDep, KeysWriteDep, SessionDep, StateDep

router = APIRouter(prefix="/keys", tags=["keys"])
R = TypeVar("R", bound=KeyResponse)


def key_out(k: ApiKey, cls: type[R] = KeyResponse, **extra: Any) -> R:  # type: ignore[assignment]
    # Field by field: the hash never leaves the service.
    return cls(
        **extra,
        id=k.id,
        org_id=k.org_id,
        name=k.name,
        display=k.display,
        status=k.status,  # type: ignore[arg-type]
        owner_id=k.owner_id or k.created_by,
        expires_at=k.expires_at,
        not_before=k.not_before,
        allowed_models=k.allowed_models,
        allowed_ips=k.allowed_ips,
        limits=KeyLimitsOut(**{f: getattr(k, f) for f in service.LIMIT_FIELDS}),
        application_id=k.application_id,
        secret_version=k.secret_version,
        rotated_from=k.rotated_from,
        created_by=k.created_by,
        created_at=k.created_at,
        updated_at=k.updated_at,
        revoked_at=k.revoked_at,
    )


@router.post("", response_model=KeyCreated, status_code=201)
def create_key(
    body: KeyCreate, principal: KeysWriteDep, session: SessionDep, state: StateDep
) -> KeyCreated:
    # The request's fields are create_key's keyword arguments (limits as a dict).
    fields = body.model_dump()
    app_id = fields.pop("application_id")
    applications.check_assignable(session, principal.org_id, app_id, principal)
    key, plaintext = service.create_key(
        session,
        state.secrets,
        org_id=principal.org_id,
        created_by=principal.account_id,
        actor=principal,
        **fields,
    )
    if app_id is not None:
        applications.move_key(session, principal.org_id, key.id, app_id, actor=principal)
    state.commit_change(session)
    return key_out(key, KeyCreated, key=plaintext)


@router.get("", response_model=KeyList)
def list_keys(principal: KeysReadDep, session: SessionDep) -> KeyList:
    return KeyList(data=[key_out(k) for k in service.list_keys(session, principal.org_id)])


@router.get("/{key_id}", response_model=KeyResponse)
def get_key(key_id: str, principal: KeysReadDep, session: SessionDep) -> KeyResponse:
    return key_out(service.get_key(session, principal.org_id, key_id))


@router.patch("/{key_id}", response_model=KeyResponse)
def update_key(
    key_id: str, body: KeyUpdate, principal: KeysWriteDep, session: SessionDep, state: StateDep
) -> KeyResponse:
    changes = body.model_dump(include=body.model_fields_set)
    moved = "application_id" in changes
    app_id = changes.pop("application_id", None)
    key = service.update_key(session, principal.org_id, key_id, changes, actor=principal)
    if moved:
        key = applications.move_key(session, principal.org_id, key_id, app_id, actor=principal)
    state.commit_change(session)
    return key_out(key)


@router.post("/{key_id}/rotate", response_model=KeyRotated, status_code=201)
def rotate_key(
    key_id: str,
    principal: KeysWriteDep,
    session: SessionDep,
    state: StateDep,
    body: KeyRotate | None = None,
) -> KeyRotated:
    """A new key with the same name, owner, scopes and limits (shown once); the old one
    keeps working for the overlap period, then expires."""
    seconds = body.overlap_seconds if body is not None else None
    if seconds is None:
        seconds = state.settings.key_rotation_overlap_hours * 3600
    new, plaintext, old = service.rotate_key(
        session, state.secrets, principal.org_id, key_id,
        overlap=timedelta(seconds=seconds), actor=principal,
    )
    state.commit_change(session)
    return key_out(
        new,
        KeyRotated,
        key=plaintext,
        previous_key_id=old.id,
        previous_key_expires_at=old.expires_at,
    )


@router.post("/{key_id}/revoke", response_model=KeyResponse)
def revoke_key(
    key_id: str, principal: KeysWriteDep, session: SessionDep, state: StateDep
) -> KeyResponse:
    key = service.revoke_key(session, principal.org_id, key_id, actor=principal)
    state.commit_change(session)
    return key_out(key)
