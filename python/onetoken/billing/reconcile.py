"""Reconciliation: the ledger's usage charges against call_log's costs, per org and UTC day,
exactly.

Both sides come from the same journal records (cost in nano-units): call_log keeps one row
per request, the ledger one entry per (org, key, model, UTC day) of an ingested batch with
its call count. An entry never straddles a UTC day, so the sums and the counts of charged
calls must agree per day; any difference is a bug or lost data, never rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from clickhouse_connect.driver.client import Client
from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.analytics import queries
from onetoken.analytics.queries import EPOCH
from onetoken.billing.models import LedgerEntry


@dataclass(frozen=True, slots=True)
class OrgReconciliation:
    org_id: str
    day: date
    ledger_usage: int
    call_log_cost: int
    ledger_calls: int = 0
    call_log_calls: int = 0

    @property
    def difference(self) -> int:
        return self.ledger_usage - self.call_log_cost

    @property
    def calls_difference(self) -> int:
        return self.ledger_calls - self.call_log_calls


def ledger_usage_by_day(
    session: Session, start: datetime, end: datetime
) -> dict[tuple[str, date], tuple[int, int]]:
    """(org, UTC day) -> (usage charged, calls) over [start, end).

    Summed here rather than in SQL: the day of a timestamp depends on the session time
    zone in PostgreSQL, and Python's integers never overflow."""
    q = (
        select(LedgerEntry.org_id, LedgerEntry.created_at, LedgerEntry.amount, LedgerEntry.calls)
        .where(LedgerEntry.kind == "usage")
        .where(LedgerEntry.created_at >= start, LedgerEntry.created_at < end)
        .execution_options(yield_per=10_000)
    )
    out: dict[tuple[str, date], tuple[int, int]] = {}
    for org, at, amount, calls in session.execute(q):
        day = at.astimezone(UTC).date() if at.tzinfo else at.date()
        cost, n = out.get((org, day), (0, 0))
        out[(org, day)] = (cost - int(amount), n + int(calls))
    return out


def reconcile(
    session: Session,
    client: Client,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[OrgReconciliation]:
    """One line per (org, UTC day) seen on either side over [start, end) (record time)."""
    lo = start or EPOCH
    hi = end or datetime.now(UTC) + timedelta(days=1)
    ledger = ledger_usage_by_day(session, lo, hi)
    logged = {k: v for k, v in queries.charged_by_org_day(client, lo, hi).items() if k[0]}
    lines = []
    for org, day in sorted(ledger.keys() | logged.keys()):
        usage, calls = ledger.get((org, day), (0, 0))
        cost, logged_calls = logged.get((org, day), (0, 0))
        lines.append(OrgReconciliation(org, day, usage, cost, calls, logged_calls))
    return lines
