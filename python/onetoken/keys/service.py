from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.models import ApiKey, new_id, utcnow
from onetoken.db.session import bump_revision
from onetoken.kit.crypto import Secrets, display_id, generate_api_key
from onetoken.kit.errors import Conflict, NotFound, Unprocessable

log = logging.getLogger("onetoken.keys")


def _dedupe(models: Sequence[str] | None) -> list[str] | None:
    return None if models is None else list(dict.fromkeys(models))


def _check_expiry(expires_at: datetime | None) -> None:
    if expires_at is not None and expires_at <= utcnow():
        raise Unprocessable("Expiry must be in the future.", param="expires_at")


def create_key(
    session: Session,
    secrets: Secrets,
    *,
    org_id: str,
    created_by: str,
    name: str,
    expires_at: datetime | None = None,
    allowed_models: Sequence[str] | None = None,
) -> tuple[ApiKey, str]:
    """Returns the row and the plaintext key; the plaintext is never stored."""
    _check_expiry(expires_at)
    plaintext = generate_api_key()
    key = ApiKey(
        id=new_id("key"),
        org_id=org_id,
        created_by=created_by,
        hash=secrets.hash_api_key(plaintext),
        display=display_id(plaintext),
        name=name,
        status="active",
        expires_at=expires_at,
        allowed_models=_dedupe(allowed_models),
    )
    session.add(key)
    bump_revision(session)
    session.flush()
    log.info("key.created", extra={"org_id": org_id, "key_id": key.id, "account_id": created_by})
    return key, plaintext


def list_keys(session: Session, org_id: str) -> Sequence[ApiKey]:
    return session.scalars(
        select(ApiKey).where(ApiKey.org_id == org_id).order_by(ApiKey.created_at, ApiKey.id)
    ).all()


def get_key(session: Session, org_id: str, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    # Keys of other orgs are indistinguishable from keys that do not exist.
    if key is None or key.org_id != org_id:
        raise NotFound("API key not found.")
    return key


def update_key(session: Session, org_id: str, key_id: str, changes: dict[str, Any]) -> ApiKey:
    key = get_key(session, org_id, key_id)
    if key.status == "revoked":
        raise Conflict("A revoked key cannot be changed.", code="key_revoked")
    if "name" in changes and changes["name"] is not None:
        key.name = changes["name"]
    if "status" in changes and changes["status"] is not None:
        key.status = changes["status"]
    if "expires_at" in changes:
        _check_expiry(changes["expires_at"])
        key.expires_at = changes["expires_at"]
    if "allowed_models" in changes:
        key.allowed_models = _dedupe(changes["allowed_models"])
    bump_revision(session)
    session.flush()
    log.info("key.updated", extra={"org_id": org_id, "key_id": key.id})
    return key


def revoke_key(session: Session, org_id: str, key_id: str) -> ApiKey:
    key = get_key(session, org_id, key_id)
    if key.status != "revoked":
        key.status = "revoked"
        key.revoked_at = utcnow()
        bump_revision(session)
        session.flush()
        log.info("key.revoked", extra={"org_id": org_id, "key_id": key.id})
    return key


def revoke_keys_named(session: Session, org_id: str, name: str) -> int:
    keys = session.scalars(
        select(ApiKey).where(
            ApiKey.org_id == org_id, ApiKey.name == name, ApiKey.status != "revoked"
        )
    ).all()
    for key in keys:
        revoke_key(session, org_id, key.id)
    return len(keys)
