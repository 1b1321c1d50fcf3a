"""The money cap publisher: each org's cap in Redis, which the gateways' money leases
never exceed together (docs/scale-out.md, "Money").

    cap(org) = ledger balance + credit limit + Σ org-scope spent marks of the instances
               not retired

Ingestion leaves it unchanged (the balance drops by what the marks rise). It moves when
money moves in or out (every such ledger entry passes billing.service._append, which
names the org in the session; the commit wakes this publisher), when the org's credit
limit changes (billing.budgets.update_org_settings names it likewise) and when an
instance is retired. A full round over every org also runs at start and every
`cap_publish_interval_seconds`, which heals a Redis restart and catches changes other
processes committed.

Revisions: a cap is written with the config revision (db.base.ConfigRevision) of the
read that computed it, and Redis keeps the highest. That counter is one row bumped in the
same transaction as every non-usage ledger entry and every retirement, so its row lock
orders those transactions and a read that sees revision R sees exactly the cap-moving
commits up to R: a write at R is never older than one at R - 1, across processes and
control replicas. A sequence would not do: its numbers are taken before commit, so a
later commit can carry a lower one.

Retiring (after ingestion has read a dead instance's journal to its end and marked it in
ingest_retired, which excludes its marks): a full round reads the retired instances
first, then the caps, and one script per org sets the cap and deletes those instances'
holds; only then do their cursors, marks and retired rows go. A crash between any two
steps leaves each org's headroom in Redis (cap - Σ hold) at or below the truth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import delete, event, func, select
from sqlalchemy.orm import Session

from onetoken.billing.budgets import spendable
from onetoken.billing.models import LedgerEntry, OrgBilling
from onetoken.billing.service import MAX_BALANCE_NANO, MONEY_MOVED
from onetoken.db.base import ConfigRevision
from onetoken.db.session import SessionFactory, bump_revision
from onetoken.ingest.marks import ORG
from onetoken.ingest.models import IngestCursor, IngestMark, IngestRetired, IngestWrittenOff
from onetoken.kit.metrics import Metric
from onetoken.kit.worker import LoopThread
from onetoken.orgs.models import Org
from onetoken.settings import Settings

log = logging.getLogger("onetoken.caps")

# A Redis call that takes longer fails the round; the next one retries. Nothing on the API
# path waits for it (the publisher runs on its own thread).
_REDIS_TIMEOUT_S = 2.0
# After a failed round (Redis unreachable), the next full round runs this soon.
_RETRY_S = 1.0

# KEYS[1] the org's cap hash, KEYS[2] its hold hash; ARGV[1] cap, ARGV[2] revision,
# ARGV[3..] retired instances. A write older than the stored one leaves the cap as is;
# deleting the retired holds is right either way, since every read at or after the one
# that saw them retired leaves their marks out of the cap.
_PUBLISH = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'rev') or '-1')
local written = 0
if tonumber(ARGV[2]) >= stored then
  redis.call('HSET', KEYS[1], 'cap', ARGV[1], 'rev', ARGV[2])
  written = 1
end
for i = 3, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return written
"""


def cap_key(prefix: str, org_id: str) -> str:
    return f"{prefix}{{o:{org_id}}}:cap"


def hold_key(prefix: str, org_id: str) -> str:
    return f"{prefix}{{o:{org_id}}}:hold"


# The gateways' lease scripts compute in Lua, whose numbers are doubles: exact below 2^53
# nano-units (about 9 million currency units), and they grant nothing past that rather
# than round money. A larger cap is published as the largest exact one, so an org with a
# bigger balance is still served, up to that much held at once.
LEASE_EXACT_MAX = 2**53 - 1


@dataclass(frozen=True, slots=True)
class CapPlan:
    """Caps read at one revision, and the retired instances whose holds go with them."""

    revision: int
    caps: dict[str, int]
    retired: list[str]


def read_caps(session: Session, org_ids: Iterable[str] | None = None) -> tuple[int, dict[str, int]]:
    """(revision, org id -> cap) of every org, or of `org_ids`, in one statement: one
    snapshot on PostgreSQL and SQLite alike, so an ingestion commit is wholly in the
    balance and the marks or in neither (separate statements could see the balance
    before it and the marks after, a cap too high)."""
    balance = (
        select(func.coalesce(func.sum(LedgerEntry.amount), 0))
        .where(LedgerEntry.org_id == Org.id)
        .scalar_subquery()
    )
    marks = (
        select(func.coalesce(func.sum(IngestMark.amount), 0))
        .where(
            IngestMark.scope == ORG,
            IngestMark.subject_id == Org.id,
            IngestMark.instance_id.not_in(select(IngestRetired.instance_id)),
        )
        .scalar_subquery()
    )
    credit = (
        select(func.coalesce(func.sum(OrgBilling.credit_limit), 0))
        .where(OrgBilling.org_id == Org.id)
        .scalar_subquery()
    )
    revision = select(ConfigRevision.revision).where(ConfigRevision.id == 1).scalar_subquery()
    q = select(Org.id, balance, marks, credit, revision)
    if org_ids is not None:
        q = q.where(Org.id.in_(list(org_ids)))
    rev = 0
    caps: dict[str, int] = {}
    for org_id, total, marked, limit, r in session.execute(q):
        rev = int(r or 0)
        # What the engine is given as the balance (gateway.snapshot): the ledger balance,
        # bounded (billing.service.balances), plus the credit limit, bounded again.
        bounded = max(-MAX_BALANCE_NANO, min(MAX_BALANCE_NANO, int(total)))
        caps[str(org_id)] = min(spendable(bounded, int(limit)) + int(marked), LEASE_EXACT_MAX)
    return rev, caps


def read_plan(session: Session, org_ids: Iterable[str] | None = None) -> CapPlan:
    """A full round's plan (`org_ids` None) carries the retired instances, read before the
    caps: one retired after that read still counts in these caps and keeps its holds."""
    retired = []
    if org_ids is None:
        retired = list(session.scalars(select(IngestRetired.instance_id)))
    revision, caps = read_caps(session, org_ids)
    return CapPlan(revision, caps, retired)


def mark_retired(session: Session, instance_id: str) -> None:
    """Retire a dead, fully ingested instance in the caller's transaction: its marks leave
    the caps from this commit on, under a new revision (a cap read before it must not
    overwrite the lower one). Idempotent."""
    if session.get(IngestRetired, instance_id) is None:
        session.add(IngestRetired(instance_id=instance_id))
        bump_revision(session)
        session.flush()


def forget_retired(session: Session, instance_ids: list[str]) -> None:
    """The last step of retiring, once Redis has lost their holds; the caller commits.
    A written-off instance keeps its cursors: should its journal turn up after all, it is
    read on from there, not charged again from the start."""
    session.execute(
        delete(IngestCursor).where(
            IngestCursor.instance_id.in_(instance_ids),
            IngestCursor.instance_id.not_in(select(IngestWrittenOff.instance_id)),
        )
    )
    session.execute(delete(IngestMark).where(IngestMark.instance_id.in_(instance_ids)))
    session.execute(delete(IngestRetired).where(IngestRetired.instance_id.in_(instance_ids)))


class CapPublisher:
    """Publishes the money caps to Redis on its own thread (start/stop), or one round at a
    time (publish_all, publish) for the caller's thread."""

    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        *,
        client: redis.Redis | None = None,
    ) -> None:
        if client is None:
            if not settings.redis_url:
                raise ValueError("the cap publisher needs ONETOKEN_REDIS_URL")
            client = redis.Redis.from_url(
                settings.redis_url.get_secret_value(),
                socket_timeout=_REDIS_TIMEOUT_S,
                socket_connect_timeout=_REDIS_TIMEOUT_S,
            )
        self._redis = client
        self._script = client.register_script(_PUBLISH)
        self._prefix = settings.redis_prefix
        self._interval = settings.cap_publish_interval_seconds
        self.session_factory = session_factory
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._worker = LoopThread("onetoken-caps", self._loop)
        # What /healthz and the metrics show: rounds that failed in a row (Redis down or
        # slow), all failed rounds, and writes Redis refused as older than its cap.
        self.failing = 0
        self.failures = 0
        self.stale_writes = 0
        self.last_published: float | None = None  # time.time() of the last good round

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        event.listen(self.session_factory, "after_commit", self._committed)
        event.listen(self.session_factory, "after_rollback", _dropped)
        self._worker.start()

    def stop(self) -> None:
        if event.contains(self.session_factory, "after_commit", self._committed):
            event.remove(self.session_factory, "after_commit", self._committed)
            event.remove(self.session_factory, "after_rollback", _dropped)
        self._worker.stop(timeout=2 * _REDIS_TIMEOUT_S + 5)
        self._redis.close()

    def _committed(self, session: Session) -> None:
        moved = session.info.pop(MONEY_MOVED, None)
        if moved:
            with self._pending_lock:
                self._pending |= moved
            self._worker.wake.set()

    def health(self) -> str:
        return "failing" if self.failing else "ok"

    def metrics(self) -> list[Metric]:
        last = self.last_published
        return [
            Metric("onetoken_cap_publisher_failing_rounds", "gauge",
                   "Cap publishing rounds that failed in a row (Redis down or slow); 0 when "
                   "the last one succeeded").add(self.failing),
            Metric("onetoken_cap_publisher_failures_total", "counter",
                   "Cap publishing rounds that failed").add(self.failures),
            Metric("onetoken_cap_publisher_stale_writes_total", "counter",
                   "Caps Redis kept because it held one of a newer revision").add(
                self.stale_writes),
            Metric("onetoken_cap_publisher_last_success_timestamp_seconds", "gauge",
                   "When the last round succeeded (Unix time); 0 before the first").add(
                round(last, 3) if last is not None else 0),
        ]

    # -- rounds -------------------------------------------------------------------------

    def _loop(self) -> None:
        full_at = 0.0  # a full round first: at start, every org
        while not self._worker.stopping.is_set():
            self._worker.wake.wait(max(0.0, full_at - time.monotonic()))
            self._worker.wake.clear()
            if self._worker.stopping.is_set():
                return
            full = time.monotonic() >= full_at
            with self._pending_lock:
                orgs, self._pending = self._pending, set()
            try:
                if full:
                    self.publish_all()
                    full_at = time.monotonic() + self._interval
                elif orgs:
                    self.publish(orgs)
            except Exception as exc:
                # The orgs' changes are committed: the full round soon retries them all.
                self.failing += 1
                self.failures += 1
                full_at = time.monotonic() + min(_RETRY_S, self._interval)
                log.warning(
                    "caps.publish_failed",
                    extra={"exc_type": type(exc).__name__, "count": len(orgs)},
                )
                continue
            if self.failing:
                log.info("caps.publish_recovered", extra={"count": self.failing})
            self.failing = 0
            self.last_published = time.time()

    def publish_all(self) -> None:
        """Every org's cap; then the retired instances' holds are gone from Redis, so
        their DB rows go too."""
        with self.session_factory() as session:
            plan = read_plan(session)
        self.write(plan)
        if plan.retired:
            with self.session_factory() as session:
                forget_retired(session, plan.retired)
                session.commit()
            log.info("caps.retired", extra={"count": len(plan.retired)})

    def publish(self, org_ids: Iterable[str]) -> None:
        with self.session_factory() as session:
            plan = read_plan(session, org_ids)
        self.write(plan)

    def write(self, plan: CapPlan) -> None:
        """One script per org, pipelined; raises when Redis did not take them all."""
        if not plan.caps:
            # Nothing to write still asks Redis: /healthz must not say "ok" while it is down.
            self._redis.ping()
            return
        pipe = self._redis.pipeline(transaction=False)
        for org_id, cap in plan.caps.items():
            self._script(
                keys=[cap_key(self._prefix, org_id), hold_key(self._prefix, org_id)],
                args=[cap, plan.revision, *plan.retired],
                client=pipe,
            )
        written: list[Any] = pipe.execute()
        self.stale_writes += sum(1 for w in written if not w)


def _dropped(session: Session) -> None:
    # Money that did not move: nothing to publish for it.
    session.info.pop(MONEY_MOVED, None)
