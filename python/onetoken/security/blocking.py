"""Blocked sources: addresses the gateway refuses with 403 `ip_blocked` until a deadline
(attack interception), every request or only those without a valid key (by reason). They
reach the engine as the snapshot's top-level `blocked_ips` (docs/snapshot.md); expired rows
are ignored at once and purged by the retention job."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from onetoken.db.base import utcnow
from onetoken.db.session import bump_revision
from onetoken.security.models import BlockedSource

# Blocks raised by failed authentication refuse only requests without a valid key: the
# valid keys behind the same address (a company NAT, a load test's deliberate bad keys)
# keep working while the failing attempts are refused.
AUTH_FLOOD = "auth_flood"
UNAUTHENTICATED_ONLY = frozenset({AUTH_FLOOD})


def normalize(source: str) -> str:
    """A single address as a host CIDR (`1.2.3.4/32`), a network as its canonical form."""
    return str(ipaddress.ip_network(source.strip(), strict=False))


def block(session: Session, source: str, seconds: int, reason: str) -> datetime:
    """Block `source` for `seconds` from now (extending, never shortening, a current
    block) and bump the config revision. The caller commits."""
    cidr = normalize(source)
    until = utcnow() + timedelta(seconds=seconds)
    row = session.get(BlockedSource, cidr)
    if row is None:
        session.add(BlockedSource(cidr=cidr, until=until, reason=reason))
    elif row.until < until:
        row.until = until
        row.reason = reason
    else:
        until = row.until
    bump_revision(session)
    return until


def unblock(session: Session, source: str) -> bool:
    row = session.get(BlockedSource, normalize(source))
    if row is None:
        return False
    session.delete(row)
    bump_revision(session)
    return True


def active(session: Session) -> list[BlockedSource]:
    return list(
        session.scalars(
            select(BlockedSource).where(BlockedSource.until > utcnow()).order_by(BlockedSource.cidr)
        )
    )


def snapshot_entries(session: Session) -> list[dict[str, Any]]:
    """The snapshot's `blocked_ips` (only unexpired blocks), each with the requests it
    refuses: `unauthenticated` for the reasons in UNAUTHENTICATED_ONLY, `all` otherwise."""
    return [
        {
            "cidr": b.cidr,
            "until": int(b.until.timestamp()),
            "mode": "unauthenticated" if b.reason in UNAUTHENTICATED_ONLY else "all",
        }
        for b in active(session)
    ]


def purge_expired(session: Session) -> int:
    result = session.execute(delete(BlockedSource).where(BlockedSource.until <= utcnow()))
    return int(getattr(result, "rowcount", 0) or 0)
