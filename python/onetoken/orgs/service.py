"""Orgs, accounts and the first-run bootstrap."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.db.session import bump_revision
from onetoken.kit.crypto import Secrets, hash_password
from onetoken.kit.errors import Conflict, NotFound, Unprocessable
from onetoken.orgs.models import Account, Org

log = logging.getLogger("onetoken.orgs")

INVITE_TTL = timedelta(days=7)

_LOGIN_NAME_RE = re.compile(r"^[a-z0-9+][a-z0-9._@+-]{1,63}$")
_MOBILE_RE = re.compile(r"^\+?[0-9]{6,20}$")


def normalize_email(email: str) -> str:
    return email.strip().lower()


def normalize_login(identifier: str) -> str:
    return identifier.strip().lower()


def normalize_mobile(mobile: str) -> str:
    return re.sub(r"[\s()-]", "", mobile.strip())


def create_org(session: Session, name: str) -> Org:
    org = Org(id=new_id("org"), name=name, status="active")
    session.add(org)
    bump_revision(session)
    session.flush()
    return org


def list_orgs(session: Session) -> list[Org]:
    return list(session.scalars(select(Org).order_by(Org.created_at, Org.id)))


def _check_unique(
    session: Session, login_name: str, email: str | None, mobile: str | None, exclude: str = ""
) -> None:
    # One message per field, and never the value: a conflict must not echo what was sent.
    checks: list[tuple[str, Any, str]] = [("login_name", Account.login_name, login_name)]
    if email is not None:
        checks.append(("email", Account.email, email))
    if mobile is not None:
        checks.append(("mobile", Account.mobile, mobile))
    for param, column, value in checks:
        found = session.scalar(select(Account.id).where(column == value, Account.id != exclude))
        if found is not None:
            raise Conflict(f"An account with this {param.replace('_', ' ')} already exists.",
                           param=param)
    # An identifier of one kind must not equal another account's identifier of another
    # kind either: sign-in accepts any of them.
    for value in {v for v in (login_name, email, mobile) if v}:
        clash = session.scalar(
            select(Account.id).where(
                or_(Account.login_name == value, Account.email == value, Account.mobile == value),
                Account.id != exclude,
            )
        )
        if clash is not None:
            raise Conflict("This sign-in identifier is already in use.", param="login_name")


def validate_identifiers(
    login_name: str | None, email: str | None, mobile: str | None
) -> tuple[str, str | None, str | None]:
    email = normalize_email(email) if email else None
    mobile = normalize_mobile(mobile) if mobile else None
    if email is not None and ("@" not in email or len(email) > 254 or " " in email):
        raise Unprocessable("Not an email address.", param="email")
    if mobile is not None and not _MOBILE_RE.match(mobile):
        raise Unprocessable("Not a mobile number (digits, optionally with a leading +).",
                            param="mobile")
    login = normalize_login(login_name) if login_name else (email or mobile)
    if login is None:
        raise Unprocessable("A login name, email or mobile number is required.",
                            param="login_name")
    if not _LOGIN_NAME_RE.match(login):
        raise Unprocessable(
            "Login names are 2-64 characters: lowercase letters, digits and . _ @ + -",
            param="login_name",
        )
    return login, email, mobile


def create_account(
    session: Session,
    org_id: str,
    email: str | None,
    password: str | None,
    role: str,
    *,
    login_name: str | None = None,
    mobile: str | None = None,
    display_name: str = "",
    is_operator: bool = False,
) -> Account:
    """An active account with a password, or an invited one (`password=None`) that sets
    its password with the invite token from `issue_invite`."""
    login, email_n, mobile_n = validate_identifiers(login_name, email, mobile)
    _check_unique(session, login, email_n, mobile_n)
    account = Account(
        id=new_id("acc"),
        org_id=org_id,
        login_name=login,
        email=email_n,
        mobile=mobile_n,
        display_name=display_name,
        password_hash=hash_password(password) if password is not None else None,
        role=role,
        status="active",
        auth_status="password" if password is not None else "invited",
        is_operator=is_operator,
    )
    session.add(account)
    session.flush()
    return account


def issue_invite(session: Session, secrets: Secrets, account: Account) -> tuple[str, datetime]:
    """A one-time invite token (returned once, stored as a keyed hash)."""
    from onetoken.kit.crypto import generate_session_token

    token = "oti_" + generate_session_token().removeprefix("ots_")
    account.invite_token_hash = secrets.hash_session_token(token)
    account.invite_expires_at = utcnow() + INVITE_TTL
    session.flush()
    return token, account.invite_expires_at


def get_org(session: Session, org_id: str) -> Org:
    org = session.get(Org, org_id)
    if org is None:
        raise NotFound("Organization not found.")
    return org


def target_org(session: Session, actor: Any, org_id: str | None) -> str:
    """The org a request names with `org_id`: the actor's own by default; another one only
    for operators (to anyone else it answers exactly like an unknown org)."""
    if org_id is None or org_id == actor.org_id:
        return str(actor.org_id)
    if actor.is_operator:
        return get_org(session, org_id).id
    raise NotFound("Organization not found.")


def find_org(session: Session, id_or_name: str) -> Org | None:
    org = session.get(Org, id_or_name)
    if org is not None:
        return org
    return session.scalars(
        select(Org).where(Org.name == id_or_name).order_by(Org.created_at)
    ).first()


def org_owner(session: Session, org_id: str) -> Account | None:
    return session.scalars(
        select(Account)
        .where(Account.org_id == org_id, Account.role == "owner", Account.status == "active")
        .order_by(Account.created_at)
    ).first()


def find_account(session: Session, identifier: str) -> Account | None:
    """The account signing in with `identifier`: its login name, email or mobile number."""
    value = normalize_login(identifier)
    if not value or len(value) > 254:
        return None
    mobile = normalize_mobile(identifier)
    return session.scalars(
        select(Account).where(
            or_(Account.login_name == value, Account.email == value, Account.mobile == mobile)
        )
    ).first()
