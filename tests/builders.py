"""Builders for what unit and integration tests put into a control DB: orgs with their
people, keys, providers and models, written through the services as the API writes them.

Each takes an open session and leaves the commit to the caller, so a test builds its
whole world in one transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from onetoken.db.migrate import upgrade
from onetoken.db.session import make_engine
from onetoken.keys import service as keys
from onetoken.kit.crypto import Secrets
from onetoken.orgs import acceptance
from onetoken.orgs import service as orgs
from onetoken.providers import service as providers
from onetoken.settings import Settings

if TYPE_CHECKING:
    from onetoken.keys.models import ApiKey
    from onetoken.orgs.models import Account, Org
    from onetoken.providers.models import Model, Provider

PASSWORD = "correct horse battery staple"
# The terms of service a deployment with the default settings asks for.
TERMS_VERSION: str = Settings.model_fields["terms_version"].default
# Where tests point providers that nothing calls (the snapshot only names it).
UNUSED_UPSTREAM = "http://127.0.0.1:9009/v1"


def org_with_owner(
    s: Session,
    name: str,
    email: str,
    password: str = PASSWORD,
    role: str = "owner",
    *,
    is_operator: bool = False,
    terms: str | None = TERMS_VERSION,
) -> tuple[Org, Account]:
    """The owner accepts the terms of service `terms` (None: nothing accepted yet)."""
    org = orgs.create_org(s, name)
    account = orgs.create_account(s, org.id, email, password, role, is_operator=is_operator)
    if terms is not None:
        accept_terms(s, account, terms)
    return org, account


def accept_terms(s: Session, account: Account, version: str = TERMS_VERSION) -> None:
    """`account` accepts the terms of service `version`, through the service the control
    API records acceptances with (tests sign in as people who have read them)."""
    acceptance.accept(s, account, version=version, current=version, source_ip="")


def provider(
    s: Session,
    secrets: Secrets,
    owner: str | None,
    *,
    name: str = "up",
    base_url: str = UNUSED_UPSTREAM,
    api_key: str | None = None,
) -> Provider:
    """An OpenAI-protocol provider of org `owner` (None: the platform's)."""
    return providers.create_provider(
        s, secrets, owner, name=name, protocol="openai", base_url=base_url, api_key=api_key
    )


def model(
    s: Session,
    owner: str | None,
    upstream: Provider,
    name: str,
    *,
    kind: str = "chat",
    upstream_model: str = "mock-gpt",
    **fields: Any,
) -> Model:
    """A deployment of `name` on `upstream`; `fields`: prices, limits and the like."""
    return providers.create_model(
        s,
        owner,
        name=name,
        kind=kind,
        provider_id=upstream.id,
        upstream_model=upstream_model,
        **fields,
    )


def api_key(
    s: Session, secrets: Secrets, org: Org, by: Account, name: str = "k", **fields: Any
) -> tuple[ApiKey, str]:
    """A key of `org` made by `by`: the row and its plaintext."""
    return keys.create_key(s, secrets, org_id=org.id, created_by=by.id, name=name, **fields)


def database_at(url: str, revision: str, org_created_at: str) -> Engine:
    """A control DB migrated only up to `revision`, holding org `org_1` ("First"): the
    starting point of a migration test."""
    engine = make_engine(url)
    upgrade(engine, revision)
    with engine.begin() as c:
        c.execute(
            text("INSERT INTO orgs VALUES ('org_1', 'First', 'active', :t)"),
            {"t": org_created_at},
        )
    return engine
