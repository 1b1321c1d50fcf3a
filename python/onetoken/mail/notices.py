"""What each message says and who gets it. Messages carry ids, amounts, periods and
kinds of events: never request content, never a key (a key appears by its display id or
its id), and a one-time token only in the link sent to the person it belongs to."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import partial
from typing import Any, Final, Protocol
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken import mail
from onetoken.kit.crypto import Secrets
from onetoken.mail.outbox import enqueue
from onetoken.orgs.models import Account, Org
from onetoken.security.log import SecurityEvent

log = logging.getLogger("onetoken.mail")

INVITE_PATH: Final = "/accept-invite"
RESET_PATH: Final = "/reset-password"
# Who hears of an org's money and of its security.
BILLING_ROLES: Final = ("owner", "admin", "billing")
ADMIN_ROLES: Final = ("owner", "admin")
ALERT_SEVERITIES: Final = frozenset({"high", "critical"})
# The alert data fields a message may show: metadata the webhooks already carry.
_SHOWN_FIELDS: Final = (
    "balance", "threshold", "scope", "period", "budget", "spent", "key_id", "application_id",
)


class LinkSettings(Protocol):
    public_url: str


def _link(settings: LinkSettings, path: str, token: str) -> str:
    return f"{settings.public_url.rstrip('/')}{path}?token={quote(token)}"


def invitation(
    session: Session,
    secrets: Secrets,
    settings: LinkSettings,
    account: Account,
    token: str,
    expires_at: datetime,
) -> bool:
    """Queue the invitation of `account` (an invited account with an e-mail address).
    False when it has no address: the inviter passes the token on."""
    if not account.email:
        return False
    org = session.get(Org, account.org_id)
    body = (
        f"You have been invited to the organization {org.name if org else account.org_id} "
        f"on onetoken as {account.role}.\n\n"
        f"Set your password here (works once, until {expires_at:%Y-%m-%d %H:%M} UTC):\n"
        f"{_link(settings, INVITE_PATH, token)}\n\n"
        f"Your sign-in name: {account.login_name}\n"
    )
    enqueue(session, secrets, kind="invitation", to_address=account.email,
            subject="Your onetoken invitation", body=body, org_id=account.org_id)
    return True


def password_reset(
    session: Session,
    secrets: Secrets,
    settings: LinkSettings,
    account: Account,
    token: str,
    minutes: int,
) -> None:
    assert account.email is not None
    body = (
        "Someone asked to reset the password of your onetoken account "
        f"{account.login_name}.\n\n"
        f"Choose a new password here (works once, for {minutes} minutes):\n"
        f"{_link(settings, RESET_PATH, token)}\n\n"
        "If it was not you, ignore this message: your password stays as it is.\n"
    )
    enqueue(session, secrets, kind="password_reset", to_address=account.email,
            subject="Reset your onetoken password", body=body, org_id=account.org_id)


def _recipients(session: Session, org_id: str, roles: Iterable[str]) -> list[str]:
    return [
        email
        for email in session.scalars(
            select(Account.email).where(
                Account.org_id == org_id,
                Account.role.in_(tuple(roles)),
                Account.status == "active",
                Account.email.is_not(None),
            ).order_by(Account.id)
        ).all()
        if email
    ]


def org_alert(
    session: Session, secrets: Secrets, org_id: str, kind: str, data: Mapping[str, Any]
) -> int:
    """Queue a low-balance or exhausted-budget alert to the org's owners, admins and
    billing members. Returns how many messages were queued."""
    org = session.get(Org, org_id)
    if org is None or org.status != "active":
        return 0
    if kind == "balance_low":
        subject = "onetoken: balance below its threshold"
        lead = f"The balance of {org.name} fell below the threshold set for it."
    else:
        subject = "onetoken: budget exhausted"
        lead = f"A budget of {org.name} is exhausted: requests it covers are refused."
    lines = [f"{f}: {data[f]}" for f in _SHOWN_FIELDS if f in data and data[f] is not None]
    body = lead + "\n\n" + "\n".join(lines) + "\n"
    addresses = _recipients(session, org_id, BILLING_ROLES)
    for address in addresses:
        enqueue(session, secrets, kind=kind, to_address=address, subject=subject, body=body,
                org_id=org_id)
    return len(addresses)


def security_alert(session: Session, secrets: Secrets, event: SecurityEvent) -> int:
    """Queue the alert of a high-severity security event to the org's owners and admins:
    its kind, severity, time and ids, never its detail values or addresses."""
    org = session.get(Org, event.org_id)
    if org is None or org.status != "active":
        return 0
    body = (
        f"A {event.severity}-severity security event was recorded for {org.name}.\n\n"
        f"kind: {event.kind}\n"
        f"time: {event.ts:%Y-%m-%d %H:%M:%S} UTC\n"
        f"event id: {event.event_id}\n"
        f"actor id: {event.actor_id or '-'}\n"
        f"subject id: {event.subject_id or '-'}\n\n"
        "The security log in the console has the details.\n"
    )
    addresses = _recipients(session, event.org_id, ADMIN_ROLES)
    for address in addresses:
        enqueue(session, secrets, kind="security_alert", to_address=address,
                subject=f"onetoken security alert: {event.kind}", body=body,
                org_id=event.org_id)
    return len(addresses)


def on_security_event(event: SecurityEvent) -> None:
    """Event-bus subscriber: a high-severity event of an org becomes alerts, queued by
    the mail worker's thread (the recording request does not wait), at most one per org
    and kind per cooldown. Never raises."""
    worker = mail.current()
    if worker is None or event.severity not in ALERT_SEVERITIES or not event.org_id:
        return
    if not worker.first_alert(event.org_id, event.kind):
        return
    worker.later(lambda session: _count(security_alert(session, worker.secrets, event)))


def on_billing_events(events: Iterable[tuple[str, str, Mapping[str, Any]]]) -> None:
    """The low-balance and budget events billing raises, each once per crossing or
    period, as alerts (queued on the mail worker's thread). Never raises."""
    worker = mail.current()
    if worker is None:
        return
    for org_id, kind, data in events:
        if kind in ("balance_low", "quota_exhausted"):
            worker.later(partial(_org_alert_job, worker.secrets, org_id, kind, dict(data)))


def _org_alert_job(
    secrets: Secrets, org_id: str, kind: str, data: Mapping[str, Any], session: Session
) -> None:
    _count(org_alert(session, secrets, org_id, kind, data))


def _count(queued: int) -> None:
    if queued:
        log.info("mail.alerts_queued", extra={"count": queued})
