"""Reconciliation: the ledger's usage charges against call_log's costs, per org, exactly.

Both sides are written from the same engine record (cost in nano-units, keyed by request
id), so any difference is a bug or lost data, never rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from clickhouse_connect.driver.client import Client
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onetoken.analytics import queries
from onetoken.db.models import LedgerEntry

_FAR_PAST = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class OrgReconciliation:
    org_id: str
    ledger_usage: int
    call_log_cost: int

    @property
    def difference(self) -> int:
        return self.ledger_usage - self.call_log_cost


def reconcile(
    session: Session,
    client: Client,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[OrgReconciliation]:
    """One line per org seen on either side over [start, end) (record time)."""
    lo = start or _FAR_PAST
    hi = end or datetime.now(UTC) + timedelta(days=1)
    q = (
        select(LedgerEntry.org_id, func.sum(LedgerEntry.amount))
        .where(LedgerEntry.kind == "usage")
        .where(LedgerEntry.created_at >= lo, LedgerEntry.created_at < hi)
        .group_by(LedgerEntry.org_id)
    )
    ledger = {org: -int(total or 0) for org, total in session.execute(q).all()}
    logged = {org: cost for org, cost in queries.cost_by_org(client, lo, hi).items() if org}
    return [
        OrgReconciliation(org, ledger.get(org, 0), logged.get(org, 0))
        for org in sorted(ledger.keys() | logged.keys())
    ]
