"""An org's accounts as its admins manage them: invite, create, change, disable.

Rules beyond the permission matrix: only owners grant, change or remove the owner role
and act on owner accounts; an org always keeps at least one active owner. Every change is
audited with the before and after values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onetoken.db.base import utcnow
from onetoken.db.session import get_scoped, list_in_org
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Conflict, Forbidden
from onetoken.orgs import service
from onetoken.orgs.auth import check_password_strength, end_sessions
from onetoken.orgs.models import Account
from onetoken.security import audit
from onetoken.security.principal import Principal

AUDITED_FIELDS = ("role", "status", "display_name", "email", "mobile")


def snapshot(account: Account) -> dict[str, Any]:
    return {f: getattr(account, f) for f in AUDITED_FIELDS}


def list_accounts(session: Session, org_id: str) -> Sequence[Account]:
    return list_in_org(session, Account, org_id)


def get_account(session: Session, org_id: str, account_id: str) -> Account:
    return get_scoped(session, Account, account_id, (org_id,), "Account not found.")


def _active_owners(session: Session, org_id: str) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(Account).where(
                Account.org_id == org_id, Account.role == "owner", Account.status == "active"
            )
        )
        or 0
    )


def _check_owner_rules(actor: Principal, target_role: str | None, new_role: str | None) -> None:
    if actor.role != "owner" and not actor.is_operator and "owner" in (target_role, new_role):
        raise Forbidden("Only owners manage owner accounts.", code="owner_required")


def create(
    session: Session,
    secrets: Secrets,
    actor: Principal,
    org_id: str,
    *,
    role: str,
    login_name: str | None,
    email: str | None,
    mobile: str | None,
    display_name: str,
    password: str | None,
) -> tuple[Account, str | None]:
    """Create (with a password) or invite (without). Returns the account and, for an
    invite, the one-time token."""
    _check_owner_rules(actor, None, role)
    if password is not None:
        check_password_strength(password)
    account = service.create_account(
        session, org_id, email, password, role,
        login_name=login_name, mobile=mobile, display_name=display_name,
    )
    token = None
    if password is None:
        token, _ = service.issue_invite(session, secrets, account)
    audit.change(
        actor,
        "admin.account_created" if password is not None else "admin.account_invited",
        subject_id=account.id,
        org_id=org_id,
        before={"role": None, "status": None},
        after={"role": role, "status": "active"},
        extra={"auth_status": account.auth_status},
    )
    return account, token


def update(
    session: Session, actor: Principal, org_id: str, account_id: str, changes: dict[str, Any]
) -> Account:
    account = get_account(session, org_id, account_id)
    before = snapshot(account)
    new_role = changes.get("role")
    if new_role is not None and new_role != account.role:
        _check_owner_rules(actor, account.role, new_role)
        if account.role == "owner" and _active_owners(session, org_id) <= 1:
            raise Conflict("An organization needs at least one owner.", code="last_owner")
        account.role = new_role
    elif account.role == "owner":
        _check_owner_rules(actor, account.role, None)
    if changes.get("display_name") is not None:
        account.display_name = changes["display_name"]
    if "email" in changes or "mobile" in changes:
        login, email, mobile = service.validate_identifiers(
            account.login_name,
            changes["email"] if "email" in changes else account.email,
            changes["mobile"] if "mobile" in changes else account.mobile,
        )
        service._check_unique(session, login, email, mobile, exclude=account.id)
        account.email, account.mobile = email, mobile
    account.updated_at = utcnow()
    session.flush()
    after = snapshot(account)
    kind = "admin.role_changed" if before["role"] != after["role"] else "admin.account_changed"
    audit.change(actor, kind, subject_id=account.id, org_id=org_id, before=before, after=after,
                 severity="high" if kind == "admin.role_changed" else "medium")
    return account


def set_status(
    session: Session, actor: Principal, org_id: str, account_id: str, status: str
) -> Account:
    account = get_account(session, org_id, account_id)
    if account.status == status:
        return account
    _check_owner_rules(actor, account.role, None)
    if status == "disabled":
        if account.id == actor.account_id:
            raise Conflict("You cannot disable your own account.", code="self_disable")
        if account.role == "owner" and _active_owners(session, org_id) <= 1:
            raise Conflict("An organization needs at least one owner.", code="last_owner")
    before = snapshot(account)
    account.status = status
    account.updated_at = utcnow()
    if status == "disabled":
        end_sessions(session, account.id)
    session.flush()
    audit.change(actor, f"admin.account_{'disabled' if status == 'disabled' else 'enabled'}",
                 subject_id=account.id, org_id=org_id, before=before, after=snapshot(account),
                 severity="high" if status == "disabled" else "medium")
    return account


def reset_second_factor(
    session: Session, actor: Principal, org_id: str, account_id: str
) -> Account:
    """For a member who lost their authenticator: they sign in with the password again."""
    account = get_account(session, org_id, account_id)
    _check_owner_rules(actor, account.role, None)
    before = {"auth_status": account.auth_status}
    if account.auth_status == "totp":
        account.auth_status = "password"
    account.totp_secret_encrypted = None
    account.totp_last_step = None
    account.updated_at = utcnow()
    session.flush()
    audit.change(actor, "admin.totp_reset", subject_id=account.id, org_id=org_id, before=before,
                 after={"auth_status": account.auth_status}, severity="high")
    return account
