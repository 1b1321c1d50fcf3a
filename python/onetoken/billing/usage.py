"""Usage into the ledger: the ingestor's aggregated spend becomes idempotent usage entries,
then is allocated to the org's packages (which post through the ledger themselves)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.billing import packages
from onetoken.billing.models import LedgerEntry
from onetoken.billing.service import (
    IN_CHUNK,
    Usage,
    insert_ignoring_duplicates,
    usage_key,
    usage_time,
)
from onetoken.orgs.models import Org


def _chunks(items: Sequence[str], n: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def record_usage(session: Session, usages: Sequence[Usage]) -> list[Usage]:
    """Insert usage entries (amount = -cost) once per entry id and allocate them to
    packages; returns those inserted. Entries of orgs that no longer exist are skipped.

    Does not commit: the caller commits under the lock that also moves the spent marks.
    """
    by_key: dict[str, Usage] = {}
    for u in usages:
        if u.cost > 0 and u.org_id and u.entry_id:
            by_key.setdefault(usage_key(u.entry_id), u)
    if not by_key:
        return []
    keys = list(by_key)
    existing: set[str] = set()
    for chunk in _chunks(keys, IN_CHUNK):
        existing.update(
            session.scalars(
                select(LedgerEntry.idempotency_key).where(LedgerEntry.idempotency_key.in_(chunk))
            )
        )
    org_ids = list({u.org_id for u in by_key.values()})
    known_orgs: set[str] = set()
    for chunk in _chunks(org_ids, IN_CHUNK):
        known_orgs.update(session.scalars(select(Org.id).where(Org.id.in_(chunk))))
    fresh = [u for k, u in by_key.items() if k not in existing and u.org_id in known_orgs]
    if not fresh:
        return []
    rows = [
        {
            "org_id": u.org_id,
            "kind": "usage",
            "amount": -u.cost,
            "idempotency_key": usage_key(u.entry_id),
            "request_id": None,
            "created_at": usage_time(u.ts_us),
            "key_id": u.key_id or None,
            "model": u.model or None,
            "calls": u.calls,
            "application_id": u.application_id or None,
        }
        for u in fresh
    ]
    session.execute(insert_ignoring_duplicates(session), rows)
    packages.allocate_usage(session, fresh)
    return fresh
