"""API keys: created once, shown once, stored as a keyed hash (under a versioned secret)
and a display id; scopes, limits, rotation with overlap, revocation; every change audited."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.db.session import bump_revision, config_changed, get_scoped, list_in_org
from onetoken.keys.models import ApiKey, KeyPolicy
from onetoken.kit.crypto import Secrets, display_id, generate_api_key
from onetoken.kit.errors import Conflict, Forbidden, Unprocessable
from onetoken.orgs.models import Account
from onetoken.security import audit

log = logging.getLogger("onetoken.keys")

LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "budget_day", "budget_month")
# What a key may be used for, when and from where; None = unrestricted.
SCOPE_FIELDS = ("expires_at", "not_before", "allowed_models", "allowed_ips")
# What the audit trail shows before/after for; never the hash.
AUDITED_FIELDS = (
    "name", "status", "owner_id", "expires_at", "not_before", "allowed_models", "allowed_ips",
    *LIMIT_FIELDS,
)


def _dedupe(values: Sequence[str] | None) -> list[str] | None:
    return None if values is None else list(dict.fromkeys(values))


def _check_expiry(expires_at: datetime | None) -> None:
    if expires_at is not None and expires_at <= utcnow():
        raise Unprocessable("Expiry must be in the future.", param="expires_at")


def _check_window(not_before: datetime | None, expires_at: datetime | None) -> None:
    if not_before is not None and expires_at is not None and not_before >= expires_at:
        raise Unprocessable("not_before must be earlier than expires_at.", param="not_before")


def audit_view(key: ApiKey) -> dict[str, Any]:
    return {f: getattr(key, f) for f in AUDITED_FIELDS}


def _check_owner(session: Session, org_id: str, owner_id: str) -> None:
    owner = session.get(Account, owner_id)
    if owner is None or owner.org_id != org_id or owner.status != "active":
        raise Unprocessable("The owner must be an active account of this organization.",
                            param="owner_id")


def _is_developer(actor: Any) -> bool:
    return getattr(actor, "role", "owner") == "developer"


def may_manage(actor: Any, key: ApiKey) -> None:
    """Developers manage only the keys they own; owners and admins any key of the org."""
    if _is_developer(actor) and key.owner_id != actor.account_id:
        raise Forbidden("Developers can only manage their own keys.", code="not_key_owner")


def _loosened(key: ApiKey, limits: dict[str, int | None]) -> list[str]:
    """The limits `limits` would lift or raise on `key` (None is no limit)."""
    out = []
    for f in LIMIT_FIELDS:
        old, new = getattr(key, f), limits.get(f)
        if old is not None and (new is None or new > old):
            out.append(f)
    return out


def _within(inner: str, outer: str) -> bool:
    a, b = ipaddress.ip_network(inner), ipaddress.ip_network(outer)
    # `in` is False across families: an IPv4-mapped IPv6 range is not inside an IPv4 one.
    return a.prefixlen >= b.prefixlen and a.network_address in b


# For each scope, whether `new` admits only what `old` admits (both set).
_NARROWS: dict[str, Callable[[Any, Any], bool]] = {
    "expires_at": lambda old, new: new <= old,
    "not_before": lambda old, new: new >= old,
    "allowed_models": lambda old, new: set(new) <= set(old),
    "allowed_ips": lambda old, new: all(any(_within(n, o) for o in old) for n in new),
}


def _widened(key: ApiKey, scopes: dict[str, Any]) -> list[str]:
    """The scopes `scopes` would widen or remove on `key` (None is unrestricted)."""
    out = []
    for f, new in scopes.items():
        old = getattr(key, f)
        if old is not None and (new is None or not _NARROWS[f](old, new)):
            out.append(f)
    return out


def _claim(
    key: ApiKey, actor: Any, fields: Sequence[str], setter: str, widened: list[str], code: str
) -> None:
    """A developer may only narrow restrictions (`fields`) another account set on their
    key, which then stay that account's; anyone else sets them outright and becomes their
    setter. Restrictions of unknown origin (set before this was recorded) count as another
    account's."""
    by = getattr(actor, "account_id", None)
    restricted = any(getattr(key, f) is not None for f in fields)
    if _is_developer(actor) and restricted and getattr(key, setter) != by:
        if widened:
            raise Forbidden(
                f"{widened[0]} was set on this key by an administrator; developers can "
                "only narrow it.",
                param=widened[0],
                code=code,
            )
    else:
        setattr(key, setter, by)


def _set_limits(key: ApiKey, limits: dict[str, int | None], actor: Any) -> None:
    loosened = [f"limits.{f}" for f in _loosened(key, limits)]
    _claim(key, actor, LIMIT_FIELDS, "limits_set_by", loosened, "limits_set_by_admin")
    for f in LIMIT_FIELDS:
        setattr(key, f, limits.get(f))


def _set_scopes(key: ApiKey, changes: dict[str, Any], actor: Any) -> None:
    scopes = {f: changes[f] for f in SCOPE_FIELDS if f in changes}
    if not scopes:
        return
    for f in ("allowed_models", "allowed_ips"):
        if f in scopes:
            scopes[f] = _dedupe(scopes[f])
    _claim(key, actor, SCOPE_FIELDS, "scopes_set_by", _widened(key, scopes),
           "scope_set_by_admin")
    if "expires_at" in scopes:
        _check_expiry(scopes["expires_at"])
    for f, value in scopes.items():
        setattr(key, f, value)
    _check_window(key.not_before, key.expires_at)


def _set_status(key: ApiKey, status: str, actor: Any) -> None:
    by = getattr(actor, "account_id", None)
    if (
        _is_developer(actor)
        and status == "active"
        and key.status == "disabled"
        and key.status_set_by != by
    ):
        raise Forbidden("A key an administrator disabled is re-enabled by an administrator.",
                        code="disabled_by_admin")
    if status != key.status:
        key.status = status
        key.status_set_by = by


def create_key(
    session: Session,
    secrets: Secrets,
    *,
    org_id: str,
    created_by: str,
    name: str,
    owner_id: str | None = None,
    expires_at: datetime | None = None,
    not_before: datetime | None = None,
    allowed_models: Sequence[str] | None = None,
    allowed_ips: Sequence[str] | None = None,
    limits: dict[str, int | None] | None = None,
    actor: Any = None,
    rotated_from: str | None = None,
) -> tuple[ApiKey, str]:
    """Returns the row and the plaintext key; the plaintext is never stored. The creator
    is recorded as the setter of the limits and of the scopes it gives."""
    _check_expiry(expires_at)
    _check_window(not_before, expires_at)
    owner = owner_id or created_by
    if owner != created_by:
        if getattr(actor, "role", "owner") == "developer":
            raise Forbidden("Developers can only create keys they own.", code="not_key_owner")
        _check_owner(session, org_id, owner)
    plaintext = generate_api_key()
    key = ApiKey(
        id=new_id("key"),
        org_id=org_id,
        created_by=created_by,
        owner_id=owner,
        hash=secrets.hash_api_key(plaintext),
        secret_version=secrets.key_hash_version,
        display=display_id(plaintext),
        name=name,
        status="active",
        expires_at=expires_at,
        not_before=not_before,
        allowed_models=_dedupe(allowed_models),
        allowed_ips=_dedupe(allowed_ips),
        rotated_from=rotated_from,
        limits_set_by=(
            created_by if any(v is not None for v in (limits or {}).values()) else None
        ),
        scopes_set_by=(
            created_by
            if any(v is not None for v in (expires_at, not_before, allowed_models, allowed_ips))
            else None
        ),
        **{f: (limits or {}).get(f) for f in LIMIT_FIELDS},
    )
    session.add(key)
    config_changed(session, log, "key.created", org_id=org_id, key_id=key.id, account_id=created_by)
    if actor is not None:
        audit.change(
            actor,
            "admin.key_created",
            subject_id=key.id,
            org_id=org_id,
            before={f: None for f in AUDITED_FIELDS},
            after=audit_view(key),
            severity="info",
            extra={"rotated_from": rotated_from} if rotated_from else None,
        )
    return key, plaintext


def list_keys(session: Session, org_id: str) -> Sequence[ApiKey]:
    return list_in_org(session, ApiKey, org_id)


def get_key(session: Session, org_id: str, key_id: str) -> ApiKey:
    return get_scoped(session, ApiKey, key_id, (org_id,), "API key not found.")


def update_key(
    session: Session, org_id: str, key_id: str, changes: dict[str, Any], actor: Any = None
) -> ApiKey:
    key = get_key(session, org_id, key_id)
    if actor is not None:
        may_manage(actor, key)
    if key.status == "revoked":
        raise Conflict("A revoked key cannot be changed.", code="key_revoked")
    before = audit_view(key)
    if changes.get("name") is not None:
        key.name = changes["name"]
    if changes.get("status") is not None:
        _set_status(key, changes["status"], actor)
    if changes.get("owner_id") is not None and changes["owner_id"] != key.owner_id:
        if getattr(actor, "role", "owner") == "developer":
            raise Forbidden("Developers cannot hand keys to other accounts.",
                            code="not_key_owner")
        _check_owner(session, org_id, changes["owner_id"])
        key.owner_id = changes["owner_id"]
    _set_scopes(key, changes, actor)
    if "limits" in changes:
        _set_limits(key, changes["limits"] or {}, actor)
    key.updated_at = utcnow()
    config_changed(session, log, "key.updated", org_id=org_id, key_id=key.id)
    if actor is not None:
        after = audit_view(key)
        scope_or_limits = any(
            before[f] != after[f] for f in ("allowed_models", "allowed_ips", *LIMIT_FIELDS)
        )
        audit.change(
            actor,
            "admin.key_scope_changed" if scope_or_limits else "admin.key_changed",
            subject_id=key.id,
            org_id=org_id,
            before=before,
            after=after,
            severity="medium" if scope_or_limits else "info",
        )
    return key


def revoke_key(session: Session, org_id: str, key_id: str, actor: Any = None) -> ApiKey:
    key = get_key(session, org_id, key_id)
    if actor is not None:
        may_manage(actor, key)
    if key.status != "revoked":
        before = audit_view(key)
        key.status = "revoked"
        key.status_set_by = getattr(actor, "account_id", None)
        key.revoked_at = utcnow()
        key.updated_at = key.revoked_at
        config_changed(session, log, "key.revoked", org_id=org_id, key_id=key.id)
        if actor is not None:
            audit.change(actor, "admin.key_revoked", subject_id=key.id, org_id=org_id,
                         before=before, after=audit_view(key))
    return key


def rotate_key(
    session: Session,
    secrets: Secrets,
    org_id: str,
    key_id: str,
    *,
    overlap: timedelta,
    actor: Any,
) -> tuple[ApiKey, str, ApiKey]:
    """A new key with the old one's name, owner, scopes, limits and policy, and who set
    them (returned once), so rotating never sheds a restriction; the old key keeps working
    for `overlap` (never past its own expiry), then expires. Returns (new, plaintext, old)."""
    old = get_key(session, org_id, key_id)
    may_manage(actor, old)
    if old.status != "active":
        raise Conflict("Only an active key can be rotated.", code="key_not_active")
    now = utcnow()
    if old.expires_at is not None and old.expires_at <= now:
        raise Conflict("An expired key cannot be rotated.", code="key_expired")
    if old.not_before is not None and old.expires_at is not None \
            and old.not_before >= old.expires_at:
        # An earlier rotation ended it before its window opened: it never serves, and its
        # successor already holds its place (a copy of its window would be empty).
        raise Conflict("This key never becomes valid; rotate its successor.",
                       code="key_never_valid")
    before = audit_view(old)
    new, plaintext = create_key(
        session,
        secrets,
        org_id=org_id,
        created_by=actor.account_id,
        name=old.name,
        owner_id=old.owner_id,
        expires_at=old.expires_at,
        not_before=old.not_before,
        allowed_models=old.allowed_models,
        allowed_ips=old.allowed_ips,
        limits={f: getattr(old, f) for f in LIMIT_FIELDS},
        rotated_from=old.id,
    )
    # Whoever set them (or nobody known, for rows older than this record) stays their
    # setter: the rotating account does not become it.
    new.limits_set_by = old.limits_set_by
    new.scopes_set_by = old.scopes_set_by
    # The new key takes the old one's place in its application (and its limits).
    new.application_id = old.application_id
    policy = session.get(KeyPolicy, old.id)
    if policy is not None:
        session.add(KeyPolicy(key_id=new.id, policy=dict(policy.policy)))
    end = now + overlap
    if old.expires_at is None or old.expires_at > end:
        old.expires_at = end
    if overlap <= timedelta(0):
        old.status = "revoked"
        old.revoked_at = now
    old.updated_at = now
    bump_revision(session)
    session.flush()
    audit.change(
        actor,
        "admin.key_rotated",
        subject_id=old.id,
        org_id=org_id,
        before=before,
        after=audit_view(old),
        extra={"new_key_id": new.id, "overlap_s": int(overlap.total_seconds())},
    )
    return new, plaintext, old


def revoke_keys_named(session: Session, org_id: str, name: str) -> int:
    keys = session.scalars(
        select(ApiKey).where(
            ApiKey.org_id == org_id, ApiKey.name == name, ApiKey.status != "revoked"
        )
    ).all()
    for key in keys:
        revoke_key(session, org_id, key.id)
    return len(keys)


# -- the engine's view ------------------------------------------------------------------------


def snapshot_fields(key: ApiKey) -> dict[str, Any]:
    """keys[] fields of docs/snapshot.md owned by this package. Optional fields are sent
    only when they differ from their defaults, so an engine that predates them keeps
    accepting snapshots of deployments that do not use them."""
    out: dict[str, Any] = {}
    if key.secret_version != 1:
        out["secret_version"] = key.secret_version
    if key.not_before is not None:
        out["not_before"] = int(key.not_before.timestamp())
    if key.allowed_ips is not None:
        out["allowed_ips"] = list(key.allowed_ips)
    limits = {f: getattr(key, f) for f in LIMIT_FIELDS}
    if any(v is not None for v in limits.values()):
        out["limits"] = limits
    if key.application_id is not None:
        out["application_id"] = key.application_id
    return out
