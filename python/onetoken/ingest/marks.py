"""Per-instance spent marks: the cost the ledger has taken from one engine instance.

An engine counts `spent` in memory from its start; its snapshot carries balance =
SUM(ledger) and mark = the cost ingested from that instance, read together under
`Ingestor.mark_lock` (or one transaction), so available = balance - (spent - mark) -
reserved never counts a cost twice or misses one.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from onetoken.ingest.models import IngestMark

ORG: str = "org"
KEY: str = "key"


def spent_marks(session: Session, instance_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """(org id -> cost ingested from the instance, key id -> same)."""
    orgs: dict[str, int] = {}
    keys: dict[str, int] = {}
    for scope, subject, amount in session.execute(
        select(IngestMark.scope, IngestMark.subject_id, IngestMark.amount).where(
            IngestMark.instance_id == instance_id
        )
    ):
        (orgs if scope == ORG else keys)[subject] = int(amount)
    return orgs, keys


def add_marks(
    session: Session, instance_id: str, orgs: Mapping[str, int], keys: Mapping[str, int]
) -> None:
    """Move the instance's marks by the cost just ingested, in the caller's transaction."""
    for scope, amounts in ((ORG, orgs), (KEY, keys)):
        for subject, amount in amounts.items():
            if not subject or amount == 0:
                continue
            res = session.execute(
                update(IngestMark)
                .where(
                    IngestMark.instance_id == instance_id,
                    IngestMark.scope == scope,
                    IngestMark.subject_id == subject,
                )
                .values(amount=IngestMark.amount + amount)
                .execution_options(synchronize_session=False)
            )
            if getattr(res, "rowcount", 0) == 0:
                session.add(
                    IngestMark(
                        instance_id=instance_id, scope=scope, subject_id=subject, amount=amount
                    )
                )
    session.flush()
