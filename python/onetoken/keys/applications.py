"""Applications: an org's keys grouped under a name and an owner, with limits and budgets
the engine enforces across all of the application's keys together (docs/applications.md).

Who may do what (the permission matrix admits; this module refines):
- owners and admins of the org (and operators) create, change, delete any application and
  move any key;
- an application's owner changes its description and limits, within what the org allows
  (never above the org's own limits, and only narrowing limits an administrator set), and
  moves the keys they manage into and out of the applications they own;
- every member reads them (applications.read).

A key belongs to at most one application. Moving it is audited; spend follows the key
from the move on (the ledger's usage entries name the application the key was in).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.db.session import config_changed, get_scoped, list_in_org
from onetoken.keys.models import ApiKey, Application
from onetoken.keys.service import LIMIT_FIELDS, get_key, may_manage
from onetoken.kit.errors import Conflict, Forbidden, Unprocessable
from onetoken.orgs.models import Account
from onetoken.security import audit

log = logging.getLogger("onetoken.keys")

AUDITED_FIELDS = ("name", "description", "owner_id", *LIMIT_FIELDS)


def is_admin(actor: Any) -> bool:
    """Owners and admins of the org, and operators (actor None: the CLI or a fixture)."""
    if actor is None:
        return True
    return bool(getattr(actor, "is_operator", False)) or getattr(actor, "role", "") in (
        "owner",
        "admin",
    )


def _audit_view(app: Application) -> dict[str, Any]:
    return {f: getattr(app, f) for f in AUDITED_FIELDS}


def _check_owner(session: Session, org_id: str, owner_id: str) -> None:
    owner = session.get(Account, owner_id)
    if owner is None or owner.org_id != org_id or owner.status != "active":
        raise Unprocessable(
            "The owner must be an active account of this organization.", param="owner_id"
        )


def _check_name_free(session: Session, org_id: str, name: str, app_id: str | None) -> None:
    taken = session.scalar(
        select(Application.id).where(Application.org_id == org_id, Application.name == name)
    )
    if taken is not None and taken != app_id:
        raise Conflict(
            "An application of this name already exists.",
            param="name",
            code="application_name_taken",
        )


def _check_within_org(limits: Mapping[str, int | None], org_caps: Mapping[str, int | None]) -> None:
    """An application's owner may not set a limit above the org's own of the same kind."""
    for f in LIMIT_FIELDS:
        cap, value = org_caps.get(f), limits.get(f)
        if cap is not None and value is not None and value > cap:
            raise Forbidden(
                f"limits.{f} may not exceed the organization's own limit.",
                param=f"limits.{f}",
                code="above_org_limit",
            )


def _set_limits(
    app: Application,
    limits: Mapping[str, int | None],
    actor: Any,
    org_caps: Mapping[str, int | None],
) -> None:
    by = getattr(actor, "account_id", None)
    if not is_admin(actor):
        _check_within_org(limits, org_caps)
        if app.limits_set_by is not None and app.limits_set_by != by:
            # An administrator's limit: the owner may keep or narrow it, not lift or raise it.
            for f in LIMIT_FIELDS:
                old, new = getattr(app, f), limits.get(f)
                if old is not None and (new is None or new > old):
                    raise Forbidden(
                        f"limits.{f} was set on this application by an administrator; its "
                        "owner can only narrow it.",
                        param=f"limits.{f}",
                        code="limits_set_by_admin",
                    )
            for f in LIMIT_FIELDS:
                setattr(app, f, limits.get(f))
            return
    for f in LIMIT_FIELDS:
        setattr(app, f, limits.get(f))
    app.limits_set_by = by


def _require_admin(actor: Any, what: str) -> None:
    if not is_admin(actor):
        raise Forbidden(
            f"Only the organization's owners and admins can {what}.",
            code="not_org_admin",
        )


def _may_manage_app(actor: Any, app: Application) -> None:
    if not is_admin(actor) and app.owner_id != getattr(actor, "account_id", None):
        raise Forbidden(
            "Only the application's owner or an admin can change it.",
            code="not_application_owner",
        )


def create_application(
    session: Session,
    *,
    org_id: str,
    name: str,
    owner_id: str,
    description: str = "",
    limits: Mapping[str, int | None] | None = None,
    actor: Any = None,
) -> Application:
    _require_admin(actor, "create applications")
    _check_owner(session, org_id, owner_id)
    _check_name_free(session, org_id, name, None)
    by = getattr(actor, "account_id", None)
    app = Application(
        id=new_id("app"),
        org_id=org_id,
        name=name,
        description=description,
        owner_id=owner_id,
        created_by=by,
        limits_set_by=by if any(v is not None for v in (limits or {}).values()) else None,
        created_at=utcnow(),
        **{f: (limits or {}).get(f) for f in LIMIT_FIELDS},
    )
    session.add(app)
    config_changed(session, log, "application.created", org_id=org_id, application_id=app.id)
    if actor is not None:
        audit.change(
            actor,
            "admin.application_created",
            subject_id=app.id,
            org_id=org_id,
            before={f: None for f in AUDITED_FIELDS},
            after=_audit_view(app),
            severity="info",
        )
    return app


def list_applications(session: Session, org_id: str) -> Sequence[Application]:
    return list_in_org(session, Application, org_id)


def get_application(session: Session, org_id: str, app_id: str) -> Application:
    return get_scoped(session, Application, app_id, (org_id,), "Application not found.")


def keys_of(session: Session, org_id: str) -> dict[str, list[ApiKey]]:
    """application id -> its keys (revoked ones included), oldest first."""
    out: dict[str, list[ApiKey]] = {}
    for k in session.scalars(
        select(ApiKey)
        .where(ApiKey.org_id == org_id, ApiKey.application_id.is_not(None))
        .order_by(ApiKey.created_at, ApiKey.id)
    ):
        out.setdefault(str(k.application_id), []).append(k)
    return out


def update_application(
    session: Session,
    org_id: str,
    app_id: str,
    changes: Mapping[str, Any],
    *,
    actor: Any = None,
    org_caps: Mapping[str, int | None] | None = None,
) -> Application:
    """`changes`: name, description, owner_id, limits (all limits at once). Name and owner
    are the admins' to change; description and limits also the owner's."""
    app = get_application(session, org_id, app_id)
    _may_manage_app(actor, app)
    before = _audit_view(app)
    if changes.get("name") is not None and changes["name"] != app.name:
        _require_admin(actor, "rename applications")
        _check_name_free(session, org_id, changes["name"], app.id)
        app.name = changes["name"]
    if changes.get("owner_id") is not None and changes["owner_id"] != app.owner_id:
        _require_admin(actor, "hand applications to another account")
        _check_owner(session, org_id, changes["owner_id"])
        app.owner_id = changes["owner_id"]
    if changes.get("description") is not None:
        app.description = changes["description"]
    if "limits" in changes:
        _set_limits(app, changes["limits"] or {}, actor, org_caps or {})
    app.updated_at = utcnow()
    config_changed(session, log, "application.updated", org_id=org_id, application_id=app.id)
    if actor is not None:
        after = _audit_view(app)
        limits_moved = any(before[f] != after[f] for f in LIMIT_FIELDS)
        audit.change(
            actor,
            "admin.application_changed",
            subject_id=app.id,
            org_id=org_id,
            before=before,
            after=after,
            severity="medium" if limits_moved else "info",
        )
    return app


def delete_application(session: Session, org_id: str, app_id: str, *, actor: Any = None) -> None:
    """409 while a key that is not revoked belongs to it: move or revoke those first.
    Revoked keys let go of it (their past spend keeps its name in the ledger)."""
    app = get_application(session, org_id, app_id)
    _require_admin(actor, "delete applications")
    live = session.scalar(
        select(func.count())
        .select_from(ApiKey)
        .where(ApiKey.application_id == app.id, ApiKey.status != "revoked")
    )
    if live:
        raise Conflict(
            f"The application still has {live} key(s); move or revoke them first.",
            code="application_has_keys",
        )
    session.execute(
        update(ApiKey).where(ApiKey.application_id == app.id).values(application_id=None)
    )
    before = _audit_view(app)
    session.delete(app)
    config_changed(session, log, "application.deleted", org_id=org_id, application_id=app_id)
    if actor is not None:
        audit.change(
            actor,
            "admin.application_deleted",
            subject_id=app_id,
            org_id=org_id,
            before=before,
            after={f: None for f in AUDITED_FIELDS},
        )


def check_assignable(
    session: Session, org_id: str, app_id: str | None, actor: Any
) -> Application | None:
    """The application a key of `org_id` may be put into by `actor` (None: none)."""
    if app_id is None:
        return None
    app = get_scoped(session, Application, app_id, (org_id,), "Application not found.")
    if not is_admin(actor) and app.owner_id != getattr(actor, "account_id", None):
        raise Forbidden(
            "Keys go into an application only by its owner or an admin.",
            param="application_id",
            code="not_application_owner",
        )
    return app


def move_key(
    session: Session, org_id: str, key_id: str, app_id: str | None, *, actor: Any = None
) -> ApiKey:
    """Put a key into `app_id` (None: out of any). Its spend counts for the new application
    from the move on; what it spent before stays with the old one."""
    key = get_key(session, org_id, key_id)
    if actor is not None:
        may_manage(actor, key)
    if key.status == "revoked":
        raise Conflict("A revoked key cannot be changed.", code="key_revoked")
    if key.application_id == app_id:
        return key
    if key.application_id is not None and not is_admin(actor):
        check_assignable(session, org_id, key.application_id, actor)
    check_assignable(session, org_id, app_id, actor)
    before = {"application_id": key.application_id}
    key.application_id = app_id
    key.updated_at = utcnow()
    config_changed(session, log, "key.application_changed", org_id=org_id, key_id=key.id)
    if actor is not None:
        audit.change(
            actor,
            "admin.key_application_changed",
            subject_id=key.id,
            org_id=org_id,
            before=before,
            after={"application_id": app_id},
        )
    return key


# -- the engine's view ------------------------------------------------------------------------


def snapshot_entries(session: Session, org_ids: set[str]) -> list[dict[str, Any]]:
    """applications[] of docs/snapshot.md for the served orgs: id, org and limits (the
    spend windows of budgets are billing's to add)."""
    out = []
    for app in session.scalars(select(Application).order_by(Application.id)):
        if app.org_id not in org_ids:
            continue
        entry: dict[str, Any] = {"id": app.id, "org_id": app.org_id}
        limits = {f: getattr(app, f) for f in LIMIT_FIELDS}
        if any(v is not None for v in limits.values()):
            entry["limits"] = limits
        out.append(entry)
    return out
