"""Plans and packages: credit with a validity period, consumed before the prepaid balance.

The org's balance is the sum of its ledger entries, package credit included, so the engine
needs nothing new. Which pool paid is ledger-level accounting: each usage charge is
allocated to the org's active packages (earliest expiry first) and what a package still
holds when it lapses leaves the balance with one `expiry` entry.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from onetoken.billing.models import Package, PackageConsumption, Plan
from onetoken.billing.service import Usage, post_entry, usage_time
from onetoken.db.base import new_id, utcnow
from onetoken.kit.errors import Conflict, NotFound, Unprocessable

log = logging.getLogger("onetoken.billing")

MAX_VALIDITY_DAYS = 3660


def create_plan(
    session: Session, *, name: str, price: int, credit: int, validity_days: int
) -> Plan:
    if price < 0 or credit <= 0:
        raise Unprocessable("A plan needs a price >= 0 and a credit > 0.", param="credit")
    if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
        raise Unprocessable("Validity must be 1 to 3660 days.", param="validity_days")
    if session.scalar(select(Plan.id).where(Plan.name == name)) is not None:
        raise Conflict("A plan with this name already exists.", param="name")
    plan = Plan(
        id=new_id("plan"), name=name, price=price, credit=credit, validity_days=validity_days
    )
    session.add(plan)
    session.flush()
    return plan


def list_plans(session: Session, *, active_only: bool = True) -> Sequence[Plan]:
    q = select(Plan).order_by(Plan.price, Plan.name)
    if active_only:
        q = q.where(Plan.active.is_(True))
    return session.scalars(q).all()


def get_plan(session: Session, plan_id: str, *, active_only: bool = True) -> Plan:
    plan = session.get(Plan, plan_id)
    if plan is None or (active_only and not plan.active):
        raise NotFound("Plan not found.")
    return plan


def grant_package(
    session: Session,
    org_id: str,
    *,
    credit: int,
    validity_days: int,
    idempotency_key: str,
    plan_id: str | None = None,
    order_id: str | None = None,
    created_by: str | None = None,
    now: datetime | None = None,
) -> Package:
    """A package and its `package_grant` ledger entry, once per idempotency key."""

    start = now or utcnow()
    package_id = new_id("pkg")
    _, created = post_entry(
        session,
        org_id,
        kind="package_grant",
        amount=credit,
        idempotency_key=idempotency_key,
        memo=f"package {package_id}",
        created_by=created_by,
    )
    if not created:
        existing = session.scalars(
            select(Package).where(Package.org_id == org_id, Package.order_id == order_id)
        ).first()
        if existing is None:
            raise Conflict("This package was already granted.", code="idempotency_key_reused")
        return existing
    package = Package(
        id=package_id,
        org_id=org_id,
        plan_id=plan_id,
        order_id=order_id,
        credit=credit,
        remaining=credit,
        valid_from=start,
        expires_at=start + timedelta(days=validity_days),
        status="active",
    )
    session.add(package)
    session.flush()
    log.info("package.granted", extra={"org_id": org_id, "kind": "package_grant"})
    return package


def list_packages(session: Session, org_id: str) -> Sequence[Package]:
    return session.scalars(
        select(Package).where(Package.org_id == org_id).order_by(Package.created_at.desc())
    ).all()


def package_credit(session: Session, org_id: str) -> int:
    """Credit still held by the org's active packages (part of its balance)."""
    total = session.scalar(
        select(func.coalesce(func.sum(Package.remaining), 0)).where(
            Package.org_id == org_id, Package.status == "active"
        )
    )
    return int(total or 0)


def allocate_usage(session: Session, usages: Sequence[Usage]) -> int:
    """Charge freshly written usage entries to active packages (a package valid at an
    entry's first call pays for all of it); returns the amount allocated. Runs in the
    ledger insert's transaction, so a usage entry and its allocation commit together (and
    an entry ingested again, not fresh, is never allocated)."""
    if not usages:
        return 0
    org_ids = {u.org_id for u in usages}
    # Columns, not ORM objects: the identity map would hand back rows whose `remaining`
    # predates the conditional UPDATEs below.
    candidates = session.execute(
        select(
            Package.id, Package.org_id, Package.remaining, Package.valid_from, Package.expires_at
        )
        .where(
            Package.org_id.in_(org_ids),
            Package.status == "active",
            Package.remaining > 0,
        )
        .order_by(Package.expires_at, Package.id)
    ).all()
    if not candidates:
        return 0
    by_org: dict[str, list[Any]] = defaultdict(list)
    left: dict[str, int] = {}
    for p in candidates:
        by_org[p.org_id].append(p)
        left[p.id] = p.remaining
    taken: dict[str, int] = defaultdict(int)
    rows: list[dict[str, object]] = []

    for u in sorted(usages, key=lambda u: (u.ts_us, u.entry_id)):
        at = usage_time(u.ts_us)
        due = u.cost
        for p in by_org.get(u.org_id, ()):
            if due <= 0:
                break
            if left[p.id] <= 0 or not (p.valid_from <= at < p.expires_at):
                continue
            share = min(due, left[p.id])
            left[p.id] -= share
            taken[p.id] += share
            due -= share
            # The consumption's request_id column names the usage entry it paid.
            rows.append({"package_id": p.id, "request_id": u.entry_id, "amount": share})
    allocated = 0
    kept: set[str] = set()
    # In one order whatever the batch: ingestors in other processes allocating to the same
    # packages then queue on their rows instead of deadlocking.
    for package_id, amount in sorted(taken.items()):
        # Conditional on the row still being active with enough left: an expiry that won
        # a race keeps its amount, and this usage is then paid from the prepaid balance.
        res = session.execute(
            update(Package)
            .where(
                Package.id == package_id,
                Package.status == "active",
                Package.remaining >= amount,
            )
            .values(remaining=Package.remaining - amount)
            .execution_options(synchronize_session=False)
        )
        if getattr(res, "rowcount", 0) == 1:
            kept.add(package_id)
            allocated += amount
    rows = [r for r in rows if r["package_id"] in kept]
    if rows:
        now = utcnow()
        session.add_all(
            PackageConsumption(
                package_id=str(r["package_id"]),
                request_id=str(r["request_id"]),
                amount=int(str(r["amount"])),
                created_at=now,
            )
            for r in rows
        )
        session.flush()
    return allocated


def expire_due(session: Session, now: datetime | None = None) -> list[tuple[str, int]]:
    """Lapse every active package whose validity ended: status expired, and one `expiry`
    entry taking what it still held off the balance. Returns (org_id, amount) per package.
    The caller commits."""

    at = now or utcnow()
    due = session.scalars(
        select(Package.id).where(Package.status == "active", Package.expires_at <= at)
    ).all()
    out: list[tuple[str, int]] = []
    for package_id in due:
        # Claim the row first so a concurrent allocation (conditional on active) cannot
        # take from it after its remaining was read.
        res = session.execute(
            update(Package)
            .where(Package.id == package_id, Package.status == "active")
            .values(status="expired")
            .execution_options(synchronize_session=False)
        )
        if getattr(res, "rowcount", 0) != 1:
            continue
        package = session.get(Package, package_id, populate_existing=True)
        if package is None:
            continue
        lapsed = package.remaining
        if lapsed > 0:
            post_entry(
                session,
                package.org_id,
                kind="expiry",
                amount=-lapsed,
                idempotency_key=f"expiry:{package.id}",
                memo=f"package {package.id}",
            )
        package.remaining = 0
        session.flush()
        out.append((package.org_id, lapsed))
        log.info("package.expired", extra={"org_id": package.org_id, "kind": "expiry"})
    return out


def revoke_package(
    session: Session, package: Package, *, idempotency_key: str, created_by: str | None
) -> int:
    """Take what a package still holds off the balance (order refund); returns it."""

    res = session.execute(
        update(Package)
        .where(Package.id == package.id, Package.status == "active")
        .values(status="revoked")
        .execution_options(synchronize_session=False)
    )
    session.refresh(package)
    if getattr(res, "rowcount", 0) != 1:
        return 0
    lapsed = package.remaining
    if lapsed > 0:
        post_entry(
            session,
            package.org_id,
            kind="refund",
            amount=-lapsed,
            idempotency_key=idempotency_key,
            memo=f"package {package.id}",
            created_by=created_by,
        )
    package.remaining = 0
    session.flush()
    return lapsed
