"""Restriction of processing (policy section XIII.4): who asked for it, and the client as
the records of their requests keep it (onetoken.security.restriction says how).

An org admin sets the org's mode, a person sets their own account's; the stricter of the
two applies, to the calls of the account's keys (the engine, through the snapshot's
`restrict_client`) and to the account's own control-API requests (sign-ins, audit events,
terms acceptances). A change bumps the config revision: the route commits it and waits,
like every engine-visible change, until the polling gateways confirm serving it."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.session import bump_revision
from onetoken.kit.crypto import Secrets
from onetoken.orgs.models import Account, Org
from onetoken.security import restriction
from onetoken.security.models import LoginSource


def restricted(session: Session, account_id: str) -> bool:
    """Whether the account's records keep its clients restricted (its own or its org's)."""
    row = session.execute(
        select(Account.restriction, Org.restriction)
        .join(Org, Org.id == Account.org_id)
        .where(Account.id == account_id)
    ).first()
    return row is not None and "restricted" in (row[0], row[1])


def restricted_accounts(session: Session) -> set[str]:
    """Accounts whose own mode is restricted (the snapshot adds each org's to its keys)."""
    return set(session.scalars(select(Account.id).where(Account.restriction == "restricted")))


def client(
    session: Session, secrets: Secrets, account_id: str, source_ip: str, user_agent: str
) -> restriction.Client:
    return restriction.client(
        restriction.secret(secrets), source_ip, user_agent,
        restricted=restricted(session, account_id),
    )


def set_org(session: Session, secrets: Secrets, org: Org, mode: str) -> str:
    """Set the org's mode; returns the one before. Not committed."""
    before = org.restriction
    if mode != before:
        org.restriction = mode
        if mode == "restricted":
            for account_id in session.scalars(select(Account.id).where(Account.org_id == org.id)):
                _tokenize_sources(session, secrets, account_id)
        bump_revision(session)
    return before


def set_account(session: Session, secrets: Secrets, account: Account, mode: str) -> str:
    """Set the account's own mode; returns the one before. Not committed."""
    before = account.restriction
    if mode != before:
        account.restriction = mode
        if mode == "restricted":
            _tokenize_sources(session, secrets, account.id)
        bump_revision(session)
    return before


def _tokenize_sources(session: Session, secrets: Secrets, account_id: str) -> None:
    """The sign-in networks the login guard remembers become tokens, so it still knows
    them (a new network is still told from a known one) without keeping them in clear."""
    key = restriction.secret(secrets)
    rows = session.scalars(
        select(LoginSource).where(LoginSource.account_id == account_id, LoginSource.kind == "net")
    ).all()
    for row in rows:
        if row.value.startswith(restriction.RESTRICTED_ADDRESS_PREFIX):
            continue
        token = restriction.ip_token(key, row.value)
        if session.get(LoginSource, (account_id, "net", token)) is None:
            session.add(LoginSource(account_id=account_id, kind="net", value=token,
                                    first_seen=row.first_seen, last_seen=row.last_seen))
        session.delete(row)


def effective(session: Session, account_id: str) -> str:
    return "restricted" if restricted(session, account_id) else "clear"


def restricted_values(secrets: Secrets, source_ip: str, user_agent: str) -> tuple[str, str]:
    """A request's client values once its account became restricted mid-request (the
    request that turned it on is audited without them too). Idempotent: a token stays."""
    if source_ip.startswith(restriction.RESTRICTED_ADDRESS_PREFIX):
        return source_ip, restriction.product(user_agent)
    view = restriction.client(restriction.secret(secrets), source_ip, user_agent, restricted=True)
    return view.source_ip, view.user_agent


def address_key(secrets: Secrets, source_ip: str) -> str:
    """The key of the sign-in guard's per-address counters: the address's token, for every
    account, so an address trying restricted and unrestricted accounts is one source to the
    lockout, and the counters hold no address in clear. A token stays as it is."""
    if not source_ip or source_ip.startswith(restriction.RESTRICTED_ADDRESS_PREFIX):
        return source_ip
    return restriction.ip_token(restriction.secret(secrets), source_ip)

