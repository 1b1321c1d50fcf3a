"""Legal holds (docs/retention.md, "Legal holds"): an operator keeps an org's records from
being purged or anonymized, with a reason and an expiry, for as long as the law or a
dispute requires (policy sections VIII and X).

A hold stands from when it is placed until it is lifted or expires. While one stands:

- the control-DB purge (rights.retention) keeps the org's tickets, sign-in sources and
  webhook delivery log;
- an account cancellation in the org revokes the account's keys and disables it, but its
  anonymization waits (rights.erasure: state `held`), and so does the ClickHouse part of
  erasures already queued for the org;
- ClickHouse's TTLs skip the org's rows: they cannot ask the control DB, so the control
  process copies the standing holds into `onetoken.legal_holds`, which every TTL rule
  reads (analytics.clickhouse.NOT_HELD_CONDITION), at once when a hold is placed or
  lifted and at every pass of the erasure worker.

When the last hold of an org ends, all of that resumes: the next purge, the erasure
worker's next pass, and ClickHouse's next TTL merge of the parts that hold the org's
expired rows (`merge_with_ttl_timeout`, 4 hours by default)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.analytics.clickhouse import sync_legal_holds
from onetoken.db.base import new_id, utcnow
from onetoken.db.session import SessionFactory
from onetoken.kit.errors import BadRequest, Conflict, NotFound
from onetoken.orgs.models import Org
from onetoken.rights.models import LegalHold
from onetoken.security import audit

log = logging.getLogger("onetoken.rights")

ClientRunner = Callable[[Callable[[Any], Any]], Any]


def standing(now: datetime | None = None) -> Any:
    """The condition of a hold that stands at `now` (default: now)."""
    at = now or utcnow()
    return (LegalHold.lifted_at.is_(None)) & (LegalHold.expires_at > at)


def held_org_ids(session: Session) -> set[str]:
    """The orgs with a hold standing now."""
    return set(session.scalars(select(LegalHold.org_id).where(standing()).distinct()))


def is_held(session: Session, org_id: str) -> bool:
    return session.scalar(
        select(LegalHold.id).where(standing(), LegalHold.org_id == org_id).limit(1)
    ) is not None


def org_holds(session: Session, org_id: str) -> list[LegalHold]:
    """Every hold of an org, standing or not, newest first."""
    return list(session.scalars(
        select(LegalHold).where(LegalHold.org_id == org_id)
        .order_by(LegalHold.placed_at.desc(), LegalHold.id)
    ))


def place(
    session: Session, actor: audit.Actor, org_id: str, *, reason: str, expires_at: datetime
) -> LegalHold:
    """Place a hold (the caller commits, then syncs ClickHouse)."""
    if session.get(Org, org_id) is None:
        raise NotFound("Organization not found.")
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    if expires_at <= utcnow():
        raise BadRequest("A hold must expire in the future.", code="invalid_expiry")
    hold = LegalHold(
        id=new_id("hold"), org_id=org_id, reason=reason, placed_by=actor.account_id,
        placed_at=utcnow(), expires_at=expires_at,
    )
    session.add(hold)
    session.flush()
    # The reason is the operator's free text: it stays in the hold, the trail names it.
    audit.event(actor, "legal_hold.placed", "high", subject_id=hold.id, org_id=org_id,
                detail={"hold_id": hold.id, "expires_at": expires_at.isoformat()})
    return hold


def lift(session: Session, actor: audit.Actor, org_id: str, hold_id: str) -> LegalHold:
    """Lift a standing hold (the caller commits, then syncs ClickHouse)."""
    hold = session.get(LegalHold, hold_id)
    if hold is None or hold.org_id != org_id:
        raise NotFound("Legal hold not found.")
    now = utcnow()
    if hold.lifted_at is not None or hold.expires_at <= now:
        raise Conflict("This hold no longer stands.", code="hold_ended")
    hold.lifted_at = now
    hold.lifted_by = actor.account_id
    audit.event(actor, "legal_hold.lifted", "high", subject_id=hold.id, org_id=org_id,
                detail={"hold_id": hold.id, "expires_at": hold.expires_at.isoformat()})
    return hold


def state_of(hold: LegalHold, now: datetime | None = None) -> str:
    at = now or utcnow()
    if hold.lifted_at is not None:
        return "lifted"
    return "standing" if hold.expires_at > at else "expired"


def sync_clickhouse(session_factory: SessionFactory, runner: ClientRunner) -> int:
    """Copy the standing holds into ClickHouse's legal_holds (what the TTLs read); returns
    how many rows were written."""
    with session_factory() as session:
        rows = [
            (h.id, h.org_id, h.expires_at)
            for h in session.scalars(select(LegalHold).where(standing()))
        ]
    written = int(runner(lambda client: sync_legal_holds(client, rows)))
    if written:
        log.info("rights.holds_synced", extra={"rows": written})
    return written
