"""Orgs, accounts, admin sessions and the first-run bootstrap."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from onetoken.db.models import Account, AdminSession, Org, new_id, utcnow
from onetoken.db.session import bump_revision
from onetoken.deps import Principal
from onetoken.kit.crypto import (
    Secrets,
    generate_password,
    generate_session_token,
    hash_password,
    verify_password,
)
from onetoken.kit.errors import Conflict, NotFound, Unauthorized

log = logging.getLogger("onetoken.orgs")

BOOTSTRAP_ORG_NAME = "Default"
BOOTSTRAP_EMAIL = "admin@onetoken.local"


def normalize_email(email: str) -> str:
    return email.strip().lower()


def create_org(session: Session, name: str) -> Org:
    org = Org(id=new_id("org"), name=name, status="active")
    session.add(org)
    bump_revision(session)
    session.flush()
    return org


def create_account(session: Session, org_id: str, email: str, password: str, role: str) -> Account:
    email = normalize_email(email)
    if session.scalar(select(Account.id).where(Account.email == email)) is not None:
        raise Conflict("An account with this email already exists.", param="email")
    account = Account(
        id=new_id("acc"),
        org_id=org_id,
        email=email,
        password_hash=hash_password(password),
        role=role,
        status="active",
    )
    session.add(account)
    session.flush()
    return account


def get_org(session: Session, org_id: str) -> Org:
    org = session.get(Org, org_id)
    if org is None:
        raise NotFound("Organization not found.")
    return org


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


def login(
    session: Session, secrets: Secrets, email: str, password: str, ttl: timedelta
) -> tuple[str, AdminSession]:
    account = session.scalars(
        select(Account).where(Account.email == normalize_email(email))
    ).one_or_none()
    ok = verify_password(account.password_hash if account else None, password)
    if account is None or not ok or account.status != "active":
        log.info("auth.login_failed")
        raise Unauthorized("Invalid email or password.", code="invalid_credentials")
    token = generate_session_token()
    now = utcnow()
    record = AdminSession(
        id=new_id("ses"),
        account_id=account.id,
        token_hash=secrets.hash_session_token(token),
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(record)
    # Expired sessions are swept here rather than by a scheduler.
    session.execute(delete(AdminSession).where(AdminSession.expires_at < now))
    session.commit()
    log.info("auth.login", extra={"account_id": account.id, "org_id": account.org_id})
    return token, record


def logout(session: Session, secrets: Secrets, token: str) -> None:
    session.execute(
        delete(AdminSession).where(AdminSession.token_hash == secrets.hash_session_token(token))
    )
    session.commit()


def resolve_session(session: Session, secrets: Secrets, token: str) -> Principal | None:
    if not token.startswith("ots_") or len(token) > 128:
        return None
    row = session.execute(
        select(AdminSession, Account)
        .join(Account, Account.id == AdminSession.account_id)
        .where(AdminSession.token_hash == secrets.hash_session_token(token))
    ).one_or_none()
    if row is None:
        return None
    admin_session, account = row
    if admin_session.expires_at <= utcnow() or account.status != "active":
        return None
    return Principal(
        account_id=account.id, org_id=account.org_id, role=account.role, email=account.email
    )


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    created: bool
    org_id: str
    admin_email: str
    admin_password: str | None
    api_key: str | None
    key_id: str | None


def bootstrap(session: Session, secrets: Secrets) -> BootstrapResult:
    """Create the first org, its owner and one API key, unless an org already exists.

    Secrets are returned only when created, and only to the caller: never stored in
    plaintext.
    """
    from onetoken.keys import service as keys_service

    if session.scalar(select(func.count()).select_from(Org)):
        org = session.scalars(select(Org).order_by(Org.created_at)).first()
        assert org is not None
        owner = org_owner(session, org.id)
        return BootstrapResult(
            created=False,
            org_id=org.id,
            admin_email=owner.email if owner else "",
            admin_password=None,
            api_key=None,
            key_id=None,
        )
    org = create_org(session, BOOTSTRAP_ORG_NAME)
    password = generate_password()
    owner = create_account(session, org.id, BOOTSTRAP_EMAIL, password, "owner")
    key, plaintext = keys_service.create_key(
        session, secrets, org_id=org.id, created_by=owner.id, name="bootstrap"
    )
    session.commit()
    log.info("bootstrap.created", extra={"org_id": org.id, "account_id": owner.id})
    return BootstrapResult(
        created=True,
        org_id=org.id,
        admin_email=owner.email,
        admin_password=password,
        api_key=plaintext,
        key_id=key.id,
    )
