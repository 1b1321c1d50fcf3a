"""Gateway pools and the organizations' commercial terms, one of which pins an org to a
pool (docs/pools.md).

Operators run pools and write terms; an org's members read its terms. A change bumps the
config revision, so every gateway's next snapshot serves (or stops serving) the org's keys
within the same confirmation as any other config change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.base import utcnow
from onetoken.db.session import bump_revision
from onetoken.kit.errors import Conflict, NotFound, Unprocessable
from onetoken.orgs.models import SETTLEMENT_PERIODS, GatewayPool, Org, OrgTerms

# A pool's name names its gateways' spool directory and travels in channel URLs as is.
POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
POOL_NAME_RULE = "lowercase letters, digits and dashes, at most 32, not starting with a dash"


def check_pool_name(name: str) -> str:
    if not POOL_NAME.fullmatch(name):
        raise Unprocessable(f"A pool name is {POOL_NAME_RULE}.", param="name")
    return name


def list_pools(session: Session) -> list[GatewayPool]:
    return list(session.scalars(select(GatewayPool).order_by(GatewayPool.name)))


def get_pool(session: Session, name: str) -> GatewayPool:
    pool = session.get(GatewayPool, name)
    if pool is None:
        raise NotFound("Gateway pool not found.")
    return pool


def pool_sizes(session: Session) -> dict[str, int]:
    """How many orgs each pool serves."""
    sizes: dict[str, int] = {}
    for pool in session.scalars(select(OrgTerms.pool).where(OrgTerms.pool.is_not(None))):
        if pool is not None:
            sizes[pool] = sizes.get(pool, 0) + 1
    return sizes


def create_pool(
    session: Session, name: str, description: str, clickhouse_database: str | None = None
) -> GatewayPool:
    check_pool_name(name)
    if session.get(GatewayPool, name) is not None:
        raise Conflict("A gateway pool with this name already exists.", param="name")
    pool = GatewayPool(
        name=name, description=description, clickhouse_database=clickhouse_database
    )
    session.add(pool)
    session.flush()
    return pool


def update_pool(session: Session, name: str, changes: dict[str, Any]) -> GatewayPool:
    """Apply `changes` (the fields sent: description, clickhouse_database)."""
    pool = get_pool(session, name)
    for field_name in ("description", "clickhouse_database"):
        if field_name in changes:
            setattr(pool, field_name, changes[field_name])
    pool.updated_at = utcnow()
    session.flush()
    return pool


def pool_databases(session: Session) -> dict[str, str]:
    """pool -> the ClickHouse database of its call metadata, for pools that have one."""
    rows = session.execute(
        select(GatewayPool.name, GatewayPool.clickhouse_database).where(
            GatewayPool.clickhouse_database.is_not(None)
        )
    ).all()
    return {name: db for name, db in rows if db is not None}


#: The terms set here; the price factor is one too, kept with the org's billing settings
#: (billing.budgets) and read and set beside these by the terms API.
TERM_FIELDS = ("pool", "contract_ref", "settlement", "dpa_signed_at")


@dataclass(frozen=True)
class Terms:
    """An org's commercial terms as read: the row's values, or the defaults."""

    org_id: str
    pool: str | None
    contract_ref: str | None
    settlement: str
    dpa_signed_at: datetime | None
    # None: never set (the defaults).
    updated_at: datetime | None

    @property
    def dpa_signed(self) -> bool:
        return self.dpa_signed_at is not None

    def audit_view(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "contract_ref": self.contract_ref,
            "settlement": self.settlement,
            "dpa_signed_at": self.dpa_signed_at.isoformat() if self.dpa_signed_at else None,
        }


def get_terms(session: Session, org: Org) -> Terms:
    row = session.get(OrgTerms, org.id)
    if row is None:
        return Terms(org_id=org.id, pool=None, contract_ref=None, settlement="prepaid",
                     dpa_signed_at=None, updated_at=None)
    return Terms(org_id=org.id, pool=row.pool, contract_ref=row.contract_ref,
                 settlement=row.settlement, dpa_signed_at=row.dpa_signed_at,
                 updated_at=row.updated_at)


def set_terms(session: Session, org: Org, changes: dict[str, Any]) -> tuple[Terms, Terms]:
    """Apply `changes` (the fields the operator sent, of TERM_FIELDS) to the org's terms:
    (before, after). A pool that does not exist is 422 on `pool`."""
    before = get_terms(session, org)
    row = session.get(OrgTerms, org.id)
    if row is None:
        row = OrgTerms(org_id=org.id, pool=None, settlement="prepaid")
        session.add(row)
    if "pool" in changes:
        pool = changes["pool"]
        if pool is not None and session.get(GatewayPool, pool) is None:
            raise Unprocessable("No gateway pool of this name exists.", param="pool")
        row.pool = pool
    if "settlement" in changes:
        if changes["settlement"] not in SETTLEMENT_PERIODS:
            raise Unprocessable("Unknown settlement period.", param="settlement")
        row.settlement = changes["settlement"]
    for name in ("contract_ref", "dpa_signed_at"):
        if name in changes:
            setattr(row, name, changes[name])
    row.updated_at = utcnow()
    if before.pool != row.pool:
        # The org's keys move between gateways: every gateway gets a new snapshot.
        bump_revision(session)
    session.flush()
    session.expire(org, ["terms"])
    return before, get_terms(session, org)


def org_pools(session: Session) -> dict[str, str]:
    """org id -> pool for every org pinned to a pool (the others use the shared gateways)."""
    rows = session.execute(
        select(OrgTerms.org_id, OrgTerms.pool).where(OrgTerms.pool.is_not(None))
    ).all()
    return {org_id: pool for org_id, pool in rows if pool is not None}
