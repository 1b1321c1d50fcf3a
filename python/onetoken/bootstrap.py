"""The first organization of an installation: its owner, the platform operator, and one
API key (`onetoken bootstrap`, and `serve --demo` through onetoken.demo)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onetoken.keys import service as keys
from onetoken.kit.crypto import Secrets, generate_password
from onetoken.orgs import service as orgs
from onetoken.orgs.models import Org

log = logging.getLogger("onetoken.orgs")

BOOTSTRAP_ORG_NAME = "Default"
BOOTSTRAP_EMAIL = "admin@onetoken.local"
BOOTSTRAP_LOGIN = "admin"


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    created: bool
    org_id: str
    admin_email: str
    admin_password: str | None
    api_key: str | None
    key_id: str | None


def bootstrap(session: Session, secrets: Secrets) -> BootstrapResult:
    """Create the first org, its owner (the platform operator) and one API key, unless
    an org already exists.

    Secrets are returned only when created, and only to the caller: never stored in
    plaintext.
    """
    if session.scalar(select(func.count()).select_from(Org)):
        org = session.scalars(select(Org).order_by(Org.created_at)).first()
        assert org is not None
        owner = orgs.org_owner(session, org.id)
        return BootstrapResult(
            created=False,
            org_id=org.id,
            admin_email=(owner.email or owner.login_name) if owner else "",
            admin_password=None,
            api_key=None,
            key_id=None,
        )
    org = orgs.create_org(session, BOOTSTRAP_ORG_NAME)
    password = generate_password()
    owner = orgs.create_account(
        session,
        org.id,
        BOOTSTRAP_EMAIL,
        password,
        "owner",
        login_name=BOOTSTRAP_LOGIN,
        display_name="Operator",
        is_operator=True,
    )
    key, plaintext = keys.create_key(
        session, secrets, org_id=org.id, created_by=owner.id, name="bootstrap"
    )
    session.commit()
    log.info("bootstrap.created", extra={"org_id": org.id, "account_id": owner.id})
    return BootstrapResult(
        created=True,
        org_id=org.id,
        admin_email=BOOTSTRAP_EMAIL,
        admin_password=password,
        api_key=plaintext,
        key_id=key.id,
    )
