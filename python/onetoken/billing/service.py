from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NotRequired, TypedDict, Unpack, cast

from sqlalchemy import Table, func, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from onetoken.analytics.queries import EPOCH
from onetoken.billing.models import LedgerEntry
from onetoken.db.session import config_changed
from onetoken.kit.errors import Conflict, Unprocessable

log = logging.getLogger("onetoken.billing")

IN_CHUNK = 500

#: The most one ledger entry may move either way (a credit, grant, adjustment, order or
#: refund): 100 million currency units.
MAX_ENTRY_NANO = 10**17
#: The most an org's balance may hold either way: 1 billion currency units, so SUM(amount)
#: over its ledger stays about nine times below the signed 64-bit limit the databases
#: and the engine count in.
MAX_BALANCE_NANO = 10**18


def check_entry_bounds(session: Session, org_id: str, amount: int, kind: str) -> None:
    """Refuse an entry above the per-entry maximum or one that would take the org's
    balance past MAX_BALANCE_NANO either way.

    Negative entries other than adjustments (refunds, expiries, revoked packages) only
    take back credit that was bounded when it landed, so they skip the balance sum."""
    if abs(amount) > MAX_ENTRY_NANO:
        raise Unprocessable(
            "Amount is above the most one ledger entry may move.",
            param="amount",
            code="amount_too_large",
        )
    if amount < 0 and kind != "adjustment":
        return
    if abs(balance(session, org_id) + amount) > MAX_BALANCE_NANO:
        raise Unprocessable(
            "This entry would take the balance past the most an organization may hold.",
            param="amount",
            code="balance_limit",
        )


def _bounded(total: int) -> int:
    # What the engine is given: a ledger written before the bounds existed may sum past
    # them, and one such org must not stop every snapshot.
    return max(-MAX_BALANCE_NANO, min(MAX_BALANCE_NANO, total))


def _exact_sums(session: Session, org_id: str | None) -> dict[str, int]:
    # SQLite's SUM raises on signed 64-bit overflow (PostgreSQL widens to numeric);
    # Python's integers do not overflow. Only reached for a ledger from before the bounds.
    q = select(LedgerEntry.org_id, LedgerEntry.amount)
    if org_id is not None:
        q = q.where(LedgerEntry.org_id == org_id)
    totals: dict[str, int] = {}
    for org, amount in session.execute(q.execution_options(yield_per=10_000)):
        totals[org] = totals.get(org, 0) + int(amount)
    log.error("ledger.sum_overflow", extra={"org_id": org_id or ""})
    return totals


def balance(session: Session, org_id: str) -> int:
    try:
        total = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                LedgerEntry.org_id == org_id
            )
        )
    except OperationalError:
        total = _exact_sums(session, org_id).get(org_id, 0)
    return _bounded(int(total or 0))


def balances(session: Session) -> dict[str, int]:
    try:
        rows: dict[str, int] = {
            org_id: int(total or 0)
            for org_id, total in session.execute(
                select(LedgerEntry.org_id, func.sum(LedgerEntry.amount)).group_by(
                    LedgerEntry.org_id
                )
            ).all()
        }
    except OperationalError:
        rows = _exact_sums(session, None)
    return {org_id: _bounded(total) for org_id, total in rows.items()}


class NewEntry(TypedDict):
    """A non-usage ledger entry as its callers describe it."""

    kind: str
    amount: int
    idempotency_key: str
    memo: NotRequired[str | None]
    created_by: NotRequired[str | None]


def credit(session: Session, org_id: str, **entry: Unpack[NewEntry]) -> tuple[LedgerEntry, bool]:
    """Add a non-usage entry once per idempotency key. Returns (entry, created).

    A retried request with the same key returns the first entry; the same key with a
    different amount or kind is a conflict, not a second credit.
    """
    kind, amount = entry["kind"], entry["amount"]
    if kind != "adjustment" and amount <= 0:
        raise Unprocessable("Amount must be positive for this kind.", param="amount")
    # Keys are scoped per org so one org can neither collide with nor probe another's.
    scoped = f"credit:{org_id}:{entry['idempotency_key']}"
    existing = _by_key(session, scoped)
    if existing is None:
        try:
            scoped_entry: NewEntry = {
                **entry, "idempotency_key": scoped, "memo": entry.get("memo") or None
            }
            return _append(session, org_id, scoped_entry, "ledger.credit"), True
        except IntegrityError:
            # A concurrent request with the same key won; the credit is its whole
            # transaction, so rolling back loses nothing else.
            session.rollback()
            existing = _by_key(session, scoped)
            if existing is None:
                raise
    if existing.amount != amount or existing.kind != kind:
        raise Conflict(
            "This idempotency key was already used for a different credit.",
            param="idempotency_key",
            code="idempotency_key_reused",
        )
    return existing, False


#: Session.info key: the orgs whose money moved in or out in the session's transaction
#: (every non-usage entry passes through _append). The cap publisher takes them after the
#: commit (onetoken.ingest.caps); a rollback drops them.
MONEY_MOVED = "onetoken.money_moved"


def _append(session: Session, org_id: str, entry: NewEntry, event: str) -> LedgerEntry:
    """Insert the entry (within the bounds one entry may move) for the engine's next
    snapshot, and log `event`.

    The one place money moves in or out of an org (usage is not: ingestion moves cost from
    the gateways' spend into the ledger). The config revision it bumps is also the money
    caps' revision (docs/scale-out.md)."""
    check_entry_bounds(session, org_id, entry["amount"], entry["kind"])
    row = LedgerEntry(org_id=org_id, **entry)
    session.add(row)
    config_changed(session, log, event, org_id=org_id, kind=entry["kind"])
    session.info.setdefault(MONEY_MOVED, set()).add(org_id)
    return row


def _by_key(session: Session, key: str) -> LedgerEntry | None:
    return session.scalars(
        select(LedgerEntry).where(LedgerEntry.idempotency_key == key)
    ).one_or_none()


def list_entries(
    session: Session, org_id: str, *, limit: int, before_id: int | None = None
) -> tuple[Sequence[LedgerEntry], bool]:
    """Newest first; page with `before_id` = the last id of the previous page."""
    q = select(LedgerEntry).where(LedgerEntry.org_id == org_id)
    if before_id is not None:
        q = q.where(LedgerEntry.id < before_id)
    rows = session.scalars(q.order_by(LedgerEntry.id.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


@dataclass(frozen=True, slots=True)
class Usage:
    """One usage charge: `calls` calls of one org, key and model within one UTC day.

    `entry_id` names the charge wherever it must be unique: its ledger idempotency key and
    its package consumptions. Ingestion derives it from the batch identity and the group,
    so a batch ingested again yields the same ids and charges nothing twice."""

    org_id: str
    entry_id: str
    cost: int
    #: The earliest call's time: the entry's created_at, inside the calls' UTC day.
    ts_us: int
    key_id: str = ""
    model: str = ""
    calls: int = 1
    application_id: str = ""


def usage_key(entry_id: str) -> str:
    return "usage:" + entry_id


def usage_time(ts_us: int) -> datetime:
    # Integer arithmetic: a float timestamp would round some microseconds away, and the
    # ledger time must fall in the same UTC day/month as the call_log row.
    return EPOCH + timedelta(microseconds=ts_us)


def post_entry(
    session: Session, org_id: str, **entry: Unpack[NewEntry]
) -> tuple[LedgerEntry, bool]:
    """Append one non-usage entry once per (global) idempotency key, inside the caller's
    transaction; returns (entry, created). The engine sees it after the caller commits."""
    existing = _by_key(session, entry["idempotency_key"])
    if existing is not None:
        return existing, False
    return _append(session, org_id, entry, "ledger.entry"), True


def insert_ignoring_duplicates(session: Session):  # type: ignore[no-untyped-def]
    # The table, not the mapped class: a Core executemany, without the ORM's bulk-insert
    # bookkeeping per row (a third of the ingestion's ledger time).
    table = cast(Table, LedgerEntry.__table__)
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing(index_elements=["idempotency_key"])
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=["idempotency_key"])
    return insert(table)
