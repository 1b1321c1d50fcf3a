"""The engine instances an operator can see, and writing off one whose journal was lost
(docs/scale-out.md, "Operating: gateways and lost journals").

An instance is known to the control DB by its ingest cursors and marks and, once retired,
by `ingest_retired`; to Redis by its heartbeat in `ot:gateways` and its money leases in
`ot:{o:<org>}:hold`; to this machine by its journal in the spool dir. Normal retirement
(ingestor._collect) needs the journal read to its end. When the journal died with its
disk (an emptyDir on a lost node), nothing would ever retire the instance and its holds
would keep its orgs under-admitted forever: `write_off` retires it through the same
crash-safe path, after checking that it is neither live nor still journaled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onetoken.db.session import SessionFactory
from onetoken.ingest import caps, journal
from onetoken.ingest.marks import ORG
from onetoken.ingest.models import IngestCursor, IngestMark, IngestRetired, IngestWrittenOff
from onetoken.orgs.models import Org
from onetoken.security.audit import Actor, event
from onetoken.settings import Settings

# How old a heartbeat may be while the gateways still count its instance as live: the
# engine keeps entries for 30 refill intervals of 100 ms (rust/gateway/src/shared, its
# LIVE_INTERVALS and default refill_interval_ms) and drops older ones itself.
HEARTBEAT_EXPIRY_MS = 3_000
_REDIS_TIMEOUT_S = 2.0
# The operator's reason lands in the security log: a label, not a story.
MAX_REASON = 200


def heartbeat_key(prefix: str) -> str:
    return f"{prefix}gateways"


@dataclass
class Instance:
    instance_id: str
    #: Age of the last heartbeat in Redis, ms on Redis' clock; None when it has none.
    heartbeat_age_ms: int | None = None
    #: "live" (its engine holds the lock here), "complete" (segments here, engine gone:
    #: ingestion will read them and retire it), "absent" (nothing here).
    journal: str = "absent"
    segments: int = 0
    #: Where the ledger consumer has read to, (segment, offset), if it has started.
    ingested_to: tuple[int, int] | None = None
    #: Org id -> cost the ledger has ingested from it (its org-scope marks).
    ingested: dict[str, int] = field(default_factory=dict)
    #: Org id -> its money lease in Redis (cumulative since it started).
    held: dict[str, int] = field(default_factory=dict)
    retired_at: datetime | None = None
    written_off_at: datetime | None = None

    @property
    def live(self) -> bool:
        fresh = self.heartbeat_age_ms is not None and self.heartbeat_age_ms < HEARTBEAT_EXPIRY_MS
        return fresh or self.journal == "live"

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "live": self.live,
            "heartbeat_age_ms": self.heartbeat_age_ms,
            "journal": self.journal,
            "segments": self.segments,
            "ingested_to": list(self.ingested_to) if self.ingested_to else None,
            "ingested": dict(sorted(self.ingested.items())),
            "held": dict(sorted(self.held.items())),
            "held_total": sum(self.held.values()),
            "retired": self.retired_at is not None,
            "retired_at": self.retired_at.isoformat() if self.retired_at else None,
            "written_off_at": self.written_off_at.isoformat() if self.written_off_at else None,
        }


@dataclass
class Inventory:
    instances: dict[str, Instance]
    #: False when Redis is not configured or did not answer: only the control DB and the
    #: spool dir spoke.
    redis: bool
    #: The error class when Redis is configured but did not answer.
    redis_error: str | None = None


def open_redis(settings: Settings) -> redis.Redis | None:
    if not settings.redis_url:
        return None
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=_REDIS_TIMEOUT_S,
        socket_connect_timeout=_REDIS_TIMEOUT_S,
        decode_responses=True,
    )


def inventory(
    settings: Settings, session_factory: SessionFactory, client: redis.Redis | None
) -> Inventory:
    """Every instance the control DB, Redis (when given) and this machine's spool dir
    know of."""
    found: dict[str, Instance] = {}

    def get(instance_id: str) -> Instance:
        if instance_id not in found:
            found[instance_id] = Instance(instance_id)
        return found[instance_id]

    with session_factory() as session:
        for iid, seg, off in session.execute(
            select(IngestCursor.instance_id, IngestCursor.segment, IngestCursor.offset).where(
                IngestCursor.consumer == "ledger"
            )
        ):
            get(str(iid)).ingested_to = (int(seg), int(off))
        for iid, subject, amount in session.execute(
            select(IngestMark.instance_id, IngestMark.subject_id, IngestMark.amount).where(
                IngestMark.scope == ORG
            )
        ):
            get(str(iid)).ingested[str(subject)] = int(amount)
        for iid, at in session.execute(select(IngestRetired.instance_id, IngestRetired.retired_at)):
            get(str(iid)).retired_at = at
        # Only those still known otherwise: the table keeps every write-off for good.
        for iid, at in session.execute(
            select(IngestWrittenOff.instance_id, IngestWrittenOff.written_off_at)
        ):
            if str(iid) in found:
                found[str(iid)].written_off_at = at
        org_ids = [str(o) for o in session.scalars(select(Org.id))]
    for iid, local in journal.scan(settings.spool_dir).items():
        inst = get(iid)
        inst.segments = len(local.segments)
        if local.live:
            inst.journal = "live"
        elif local.segments:
            inst.journal = "complete"
    if client is None:
        return Inventory(found, False)
    try:
        _from_redis(client, settings.redis_prefix, org_ids, get)
    except redis.RedisError as exc:
        # An SRE in an incident still wants what the control DB knows.
        return Inventory(found, False, type(exc).__name__)
    return Inventory(found, True)


def _from_redis(client: redis.Redis, prefix: str, org_ids: list[str], get: Any) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(heartbeat_key(prefix), 0, -1, withscores=True)
    for org_id in org_ids:
        pipe.hgetall(caps.hold_key(prefix, org_id))
    now, beats, *holds = pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    for iid, score in beats:
        get(str(iid)).heartbeat_age_ms = max(0, now_ms - int(score))
    for org_id, held in zip(org_ids, holds, strict=True):
        for iid, amount in held.items():
            get(str(iid)).held[org_id] = int(amount)


class Refused(Exception):
    """The instance must not be written off (yet); the message says why."""


@dataclass(frozen=True)
class WriteOff:
    instance_id: str
    #: False when there was nothing to do (already retired, or nothing known of it).
    done: bool
    #: Org id -> (money lease released in Redis, cost the ledger had ingested from it).
    orgs: dict[str, tuple[int, int]]


def write_off(
    settings: Settings,
    session_factory: SessionFactory,
    client: redis.Redis | None,
    instance_id: str,
    *,
    reason: str,
    actor: Actor,
) -> WriteOff:
    """Retire an instance whose journal is gone, through the same path as ingestion's
    retirement: with Redis, `ingest_retired` and a new revision in one commit (with the
    `ingest_written_off` row that keeps its cursors), then the cap publisher's full round
    lowers each cap by its marks and deletes its holds in one script per org. Refuses
    while it is live, its journal is still here, or Redis cannot say. Idempotent."""
    reason = reason.strip()
    if not reason:
        raise Refused("--reason must not be empty")
    if len(reason) > MAX_REASON:
        raise Refused(f"--reason must be at most {MAX_REASON} characters")
    known = inventory(settings, session_factory, client)
    if known.redis_error is not None:
        raise Refused(
            f"Redis did not answer ({known.redis_error}): whether instance {instance_id} is "
            "live cannot be told"
        )
    found = known.instances.get(instance_id)
    if found is None or found.retired_at is not None or found.written_off_at is not None:
        return WriteOff(instance_id, False, {})
    if found.journal == "live":
        raise Refused(
            f"instance {instance_id} is live: its engine holds the journal lock on this machine"
        )
    if found.heartbeat_age_ms is not None and found.heartbeat_age_ms < HEARTBEAT_EXPIRY_MS:
        raise Refused(
            f"instance {instance_id} is live: its last heartbeat in Redis is "
            f"{found.heartbeat_age_ms} ms old (gateways count it until {HEARTBEAT_EXPIRY_MS} ms)"
        )
    if found.journal == "complete":
        raise Refused(
            f"the journal of instance {instance_id} is still here ({found.segments} segment(s)): "
            "ingestion reads it and retires the instance by itself, charging its calls"
        )
    if not found.ingested and not found.held and found.ingested_to is None:
        # Only a lapsing heartbeat: no lease, no mark, no cursor: nothing is held for it.
        return WriteOff(instance_id, False, {})
    orgs = {
        org_id: (found.held.get(org_id, 0), found.ingested.get(org_id, 0))
        for org_id in sorted(found.held.keys() | found.ingested.keys())
    }
    with session_factory() as session:
        try:
            session.add(IngestWrittenOff(instance_id=instance_id))
            session.flush()
        except IntegrityError:
            return WriteOff(instance_id, False, {})  # a concurrent run wrote it off first
        _retire(session, settings, instance_id)
        session.commit()
    _record(actor, instance_id, reason, orgs)
    return WriteOff(instance_id, True, orgs)


def _retire(session: Session, settings: Settings, instance_id: str) -> None:
    # The ingestor's own choice (ingestor._collect): without Redis no lease exists and the
    # rows go at once; with it, the publisher drops the holds with the lowered caps first.
    if settings.redis_url:
        caps.mark_retired(session, instance_id)
    else:
        caps.forget_retired(session, [instance_id])


def _record(actor: Actor, instance_id: str, reason: str, orgs: dict[str, tuple[int, int]]) -> None:
    """One event per org, in that org's name (its admins see what was written off), with
    the money as integers; one without an org when the instance held nothing."""
    if not orgs:
        event(
            actor, "gateway.written_off", "high", subject_id=instance_id, org_id="",
            detail={"instance_id": instance_id, "reason": reason, "orgs": 0},
        )
    for org_id, (held, ingested) in orgs.items():
        event(
            actor,
            "gateway.written_off",
            "high",
            subject_id=instance_id,
            org_id=org_id,
            detail={
                "instance_id": instance_id,
                "reason": reason,
                "orgs": len(orgs),
                "held": held,
                "ingested": ingested,
                # The lease beyond what the ledger charged: the most its lost calls can
                # have cost (an instance never spends past its hold).
                "unledgered_at_most": max(0, held - ingested),
            },
        )
