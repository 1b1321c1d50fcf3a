"""Per-instance spent marks: the cost the ledger has taken from one engine instance.

An engine counts `spent` in memory from its start; its snapshot carries balance =
SUM(ledger) and mark = the cost ingested from that instance, read together under
`Ingestor.mark_lock` (or one transaction), so available = balance - (spent - mark) -
reserved never counts a cost twice or misses one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from onetoken.ingest.models import IngestMark

ORG: str = "org"
KEY: str = "key"
APP: str = "app"


def spent_marks(session: Session, instance_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """(org id -> cost ingested from the instance, key id -> same)."""
    orgs: dict[str, int] = {}
    keys: dict[str, int] = {}
    for scope, subject, amount in session.execute(
        select(IngestMark.scope, IngestMark.subject_id, IngestMark.amount).where(
            IngestMark.instance_id == instance_id, IngestMark.scope != APP
        )
    ):
        (orgs if scope == ORG else keys)[subject] = int(amount)
    return orgs, keys


def application_marks(session: Session, instance_id: str) -> dict[str, int]:
    """application id -> cost ingested from the instance while the key was in it."""
    return {
        str(subject): int(amount)
        for subject, amount in session.execute(
            select(IngestMark.subject_id, IngestMark.amount).where(
                IngestMark.instance_id == instance_id, IngestMark.scope == APP
            )
        )
    }


def add_marks(
    session: Session,
    instance_id: str,
    orgs: Mapping[str, int],
    keys: Mapping[str, int],
    apps: Mapping[str, int] | None = None,
) -> None:
    """Move the instance's marks by the cost just ingested, in the caller's transaction.

    Two statements per batch whatever the number of orgs and keys (one executemany to
    move the marks that exist, one to create the rest): a batch touches hundreds."""
    moves = {
        (scope, subject): amount
        for scope, amounts in ((ORG, orgs), (KEY, keys), (APP, apps or {}))
        for subject, amount in amounts.items()
        if subject and amount
    }
    if not moves:
        return
    table = cast(Table, IngestMark.__table__)
    known = {
        (str(scope), str(subject))
        for scope, subject in session.execute(
            select(IngestMark.scope, IngestMark.subject_id).where(
                IngestMark.instance_id == instance_id
            )
        )
    }
    existing = [
        {"b_scope": scope, "b_subject": subject, "b_amount": amount}
        for (scope, subject), amount in moves.items()
        if (scope, subject) in known
    ]
    fresh = [
        {"instance_id": instance_id, "scope": scope, "subject_id": subject, "amount": amount}
        for (scope, subject), amount in moves.items()
        if (scope, subject) not in known
    ]
    if existing:
        session.execute(
            update(table)
            .where(
                table.c.instance_id == instance_id,
                table.c.scope == bindparam("b_scope"),
                table.c.subject_id == bindparam("b_subject"),
            )
            .values(amount=table.c.amount + bindparam("b_amount")),
            existing,
        )
    if fresh:
        session.execute(insert(table), fresh)
