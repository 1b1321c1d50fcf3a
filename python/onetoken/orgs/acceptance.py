"""The terms of service each person accepts on behalf of their organization (policy
section XII.2, docs/terms.md).

The current version is a setting (ONETOKEN_TERMS_VERSION). An account that has not
accepted it (a new account, an invited one that just set its password, anyone after the
version changed) is held by the control API to the `session` permission (own profile,
these terms, sign out) until it accepts; API keys on the gateway and the operator's CLI
never pass through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.kit.errors import Conflict, Forbidden
from onetoken.orgs.models import Account, TermsAcceptance

#: What accepting says, shown with the version (the policy's words, section XII).
STATEMENT = (
    "This service is only for enterprises and organizations, not for personal use. I use it "
    "solely on behalf of my organization, which has authorized me to do so."
)


class TermsNotAccepted(Forbidden, code="terms_not_accepted"):
    """403 to every session request but the `session` permission's until the account
    accepts the current version."""

    def __init__(self, version: str) -> None:
        super().__init__(
            f"Accept the terms of service, version {version}, on behalf of your "
            "organization first: POST /api/v1/me/terms/accept.",
            param="version",
        )
        self.version = version


@dataclass(frozen=True, slots=True)
class TermsStatus:
    """The current terms as one account sees them."""

    version: str
    url: str | None
    statement: str
    # None: not accepted yet.
    accepted_at: datetime | None


def accepted_at(session: Session, account_id: str, version: str) -> datetime | None:
    return session.scalar(
        select(TermsAcceptance.accepted_at).where(
            TermsAcceptance.account_id == account_id, TermsAcceptance.version == version
        )
    )


def check_accepted(session: Session, account_id: str, version: str) -> None:
    """TermsNotAccepted unless the account accepted `version` (the control API's gate)."""
    if accepted_at(session, account_id, version) is None:
        raise TermsNotAccepted(version)


def status(session: Session, account_id: str, version: str, url: str | None) -> TermsStatus:
    return TermsStatus(version, url, STATEMENT, accepted_at(session, account_id, version))


def accept(
    session: Session,
    account: Account,
    *,
    version: str,
    current: str,
    source_ip: str,
) -> tuple[TermsAcceptance, bool]:
    """Record that `account` accepts `version` on behalf of its org: (the record, whether
    it is new). Only the current version can be accepted (409 `terms_version_mismatch`
    otherwise: the page the person read is out of date). Accepting again returns the
    first record; of two concurrent accepts one inserts and the other finds it."""
    if version != current:
        raise Conflict(
            "This is not the current version of the terms of service; read it again.",
            code="terms_version_mismatch",
            param="version",
        )
    found = _find(session, account.id, version)
    if found is not None:
        return found, False
    record = TermsAcceptance(
        id=new_id("tac"),
        account_id=account.id,
        org_id=account.org_id,
        version=version,
        accepted_at=utcnow(),
        source_ip=source_ip,
    )
    try:
        with session.begin_nested():
            session.add(record)
    except IntegrityError:
        # The unique (account, version) refused a concurrent twin: that one stands.
        found = _find(session, account.id, version)
        if found is None:
            raise
        return found, False
    return record, True


def _find(session: Session, account_id: str, version: str) -> TermsAcceptance | None:
    return session.scalars(
        select(TermsAcceptance).where(
            TermsAcceptance.account_id == account_id, TermsAcceptance.version == version
        )
    ).first()


def list_for_org(
    session: Session, org_id: str, *, version: str | None = None
) -> Sequence[TermsAcceptance]:
    """The org's acceptances, newest first (one version's with `version`)."""
    query = select(TermsAcceptance).where(TermsAcceptance.org_id == org_id)
    if version is not None:
        query = query.where(TermsAcceptance.version == version)
    return list(
        session.scalars(query.order_by(TermsAcceptance.accepted_at.desc(), TermsAcceptance.id))
    )
