"""Ingestion: every engine instance's journal into call_log and the ledger.

Two consumers read each instance's journal, each with its own cursor (segment, offset) in
the control DB:

- ledger: per batch, one usage entry per (org, key, model, UTC day) with its call count,
  idempotent by the batch identity (instance, segment, start offset) and the group, plus
  package allocation, the instance's spent marks and the cursor, in one transaction under
  `mark_lock`. A crash before the commit leaves nothing; after it, the cursor has moved.
- call_log: the batch's Native block (built by the engine's reader) into ClickHouse with
  the insert_deduplication_token of the batch identity (instance, segment, start and end
  offset), then the cursor. A ClickHouse outage holds only this cursor back; the retry
  reads exactly the same range again, so it carries the same block and token and
  ClickHouse drops it if the first attempt did land (duplicates that escape the dedup
  window still collapse under FINAL).

Python never sees a record: the reader hands over the block plus the usage and call
groups (onetoken.ingest.batch), a few dozen per batch.

A segment is deleted once it is complete and both cursors are past it, so the journal is
the one durable record log and the one replay path.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onetoken._core import JournalBatch
from onetoken.analytics.columns import SHARED_DATABASE
from onetoken.analytics.sink import CallLogSink
from onetoken.billing import service as billing
from onetoken.billing import usage
from onetoken.billing.upkeep import BillingUpkeep
from onetoken.db.session import SessionFactory
from onetoken.ingest import caps, journal
from onetoken.ingest.batch import Batch, UsageGroup, from_journal
from onetoken.ingest.journal import InstanceJournal
from onetoken.ingest.marks import add_marks
from onetoken.ingest.models import IngestCursor
from onetoken.kit.worker import LoopThread
from onetoken.orgs.terms import pool_databases
from onetoken.settings import Settings

log = logging.getLogger("onetoken.ingest")

LEDGER = "ledger"
CALL_LOG = "call_log"


@dataclass(frozen=True, order=True)
class Position:
    """Everything before byte `offset` of segment `segment` (and lower segments) is read."""

    segment: int
    offset: int


_START = Position(0, 0)


def usage_entries(
    instance_id: str, start: Position, groups: list[UsageGroup]
) -> list[billing.Usage]:
    """The batch's usage groups as ledger entries.

    Entry ids derive from the batch identity and the group, so reading the same batch
    again (after a crash before its commit) names the same entries."""
    prefix = f"{instance_id}:{start.segment}:{start.offset}:"
    out = []
    for org, key, model, day, calls, cost, first_ts, app in groups:
        # A key moved mid-batch makes two groups; calls in no application keep the id
        # they had before applications, so a batch read again by a newer version matches.
        ident = f"{org}\x00{key}\x00{model}\x00{day}" + (f"\x00{app}" if app else "")
        digest = hashlib.sha256(ident.encode()).hexdigest()
        out.append(
            billing.Usage(
                org_id=org,
                entry_id=prefix + digest[:20],
                cost=cost,
                ts_us=first_ts,
                key_id=key,
                model=model,
                calls=calls,
                application_id=app,
            )
        )
    return out


def dedup_token(instance_id: str, start: Position, end: Position) -> str:
    """call_log's insert_deduplication_token for the batch read from start to end."""
    return f"calllog:{instance_id}:{start.segment}:{start.offset}:{end.offset}"


class Ingestor:
    def __init__(
        self,
        settings: Settings,
        session_factory: SessionFactory,
        *,
        sink: CallLogSink | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self._sink = sink
        # Held while a ledger batch commits: the snapshot builder reads balances and marks
        # under it, so a cost is in both or in neither.
        self.mark_lock = threading.Lock()
        # See every batch once, after the ledger took it (metadata-only detectors).
        self.batch_observers: list[Callable[[Batch], None]] = []
        # Called after every ingestion round and once more at stop (security log writer).
        self.flush_hooks: list[Callable[[], None]] = []
        self.billing = BillingUpkeep(session_factory)
        self.rows_ingested = 0
        self.rows_logged = 0
        self.bad_lines = 0
        # What the metrics show (ingest.metrics): rounds run, rounds or instances that
        # failed, and when the last round ended (time.time()); a loop that stopped running
        # rounds shows as an old timestamp.
        self.rounds = 0
        self.failures = 0
        self.last_round_at: float | None = None
        # (instance, start) -> end of a call_log batch ClickHouse did not take: the retry
        # reads that range exactly, so its block and dedup token are the same.
        self._call_log_retry: dict[tuple[str, Position], int] = {}
        self._round = threading.Lock()
        # pool -> its call_log database, read at the start of every round.
        self._databases: dict[str, str] = {}
        self._worker = LoopThread("onetoken-ingest", self._loop)
        self._stopped = False

    @property
    def sink(self) -> CallLogSink:
        if self._sink is None:
            self._sink = CallLogSink(self.settings)
        return self._sink

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def _loop(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        while not self._worker.stopping.wait(interval):
            try:
                self.catch_up()
            except Exception as exc:
                self.failures += 1
                log.error("ingest.failed", extra={"exc_type": type(exc).__name__})
            self._run_flush_hooks()

    def stop(self) -> None:
        """Catch up with every journal, run the flush hooks, close the sink. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._worker.stop(timeout=60)
        try:
            self.catch_up()
        except Exception as exc:
            log.error("ingest.failed", extra={"exc_type": type(exc).__name__})
        self._run_flush_hooks()
        self.sink.close()
        log.info("ingest.stopped", extra={"rows": self.rows_ingested})

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No ingestion round runs inside: the ledger and call_log hold the same batches
        (onetoken.backup copies both in here). Gateways go on journaling meanwhile."""
        with self._round:
            yield

    def _run_flush_hooks(self) -> None:
        for hook in self.flush_hooks:
            try:
                hook()
            except Exception as exc:
                log.error("ingest.flush_hook_failed", extra={"exc_type": type(exc).__name__})

    # -- ingestion ----------------------------------------------------------------------

    def catch_up(self) -> int:
        """Ingest every journal up to its last complete line; returns the records whose
        ledger side committed in this call."""
        with self._round:
            before = self.rows_ingested
            with self.session_factory() as session:
                # A pool's gateways journal apart; their call metadata go to its database.
                self._databases = pool_databases(session)
            for instance in journal.scan(self.settings.spool_dir).values():
                try:
                    self._ingest_instance(instance)
                except (CursorMoved, FileNotFoundError):
                    # Another ingestor took this journal's batch (or collected its
                    # segment) first: read its cursors afresh next round.
                    log.warning("ingest.cursor_moved", extra={"instance_id": instance.instance_id})
                except Exception as exc:
                    # Nothing of the failed batch committed; it is read again next round,
                    # and the other instances' journals go on meanwhile.
                    self.failures += 1
                    log.error(
                        "ingest.failed",
                        extra={"exc_type": type(exc).__name__, "instance_id": instance.instance_id},
                    )
            self.rounds += 1
            self.last_round_at = time.time()
            return self.rows_ingested - before

    def _cursors(self, instance_id: str) -> dict[str, Position]:
        with self.session_factory() as session:
            rows = session.execute(
                select(IngestCursor.consumer, IngestCursor.segment, IngestCursor.offset).where(
                    IngestCursor.instance_id == instance_id
                )
            ).all()
        return {str(c): Position(int(s), int(o)) for c, s, o in rows}

    def _ingest_instance(self, instance: InstanceJournal) -> None:
        saved = self._cursors(instance.instance_id)
        ledger: Position | None = saved.get(LEDGER, _START)
        call_log: Position | None = saved.get(CALL_LOG, _START)
        stored = {LEDGER: LEDGER in saved, CALL_LOG: CALL_LOG in saved}
        logging_on = self.sink.available()
        while True:
            # None: nothing more to read this round for that consumer.
            if ledger is not None:
                ledger = self._readable(instance, ledger, LEDGER, stored)
            if call_log is not None:
                call_log = (
                    self._readable(instance, call_log, CALL_LOG, stored) if logging_on else None
                )
            if ledger is None and call_log is None:
                break
            if ledger is not None and ledger == call_log:
                # One read serves both consumers while they are level.
                batch, end = self._read(instance, ledger, count_bad=True)
                if end is None:
                    ledger = call_log = None
                    continue
                ledger = self._ledger_step(instance, ledger, end, batch, stored)
                call_log, logging_on = self._call_log_step(instance, call_log, end, batch, stored)
                continue
            if ledger is not None:
                batch, end = self._read(instance, ledger, count_bad=True)
                ledger = (
                    None if end is None else self._ledger_step(instance, ledger, end, batch, stored)
                )
            if call_log is not None:
                until = self._call_log_retry.get((instance.instance_id, call_log))
                batch, end = self._read(instance, call_log, count_bad=False, until=until)
                if end is None:
                    call_log = None
                else:
                    call_log, logging_on = self._call_log_step(
                        instance, call_log, end, batch, stored
                    )
        self._collect(instance)

    def _readable(
        self, instance: InstanceJournal, pos: Position, consumer: str, stored: dict[str, bool]
    ) -> Position | None:
        """Where the consumer reads next: its position, moved past complete segments it
        has read to the end. None when it has nothing left on disk."""
        seg = instance.first_from(pos.segment)
        if seg is None:
            return None
        if seg != pos.segment:
            moved = Position(seg, 0)
            self._move_cursor(consumer, instance.instance_id, pos, moved, stored)
            return moved
        return pos

    def _read(
        self,
        instance: InstanceJournal,
        pos: Position,
        *,
        count_bad: bool,
        until: int | None = None,
    ) -> tuple[JournalBatch | None, Position | None]:
        """One batch from pos (none past byte `until`): (batch, end). end is None when
        nothing is left there yet (a live tail); a complete segment read to its end moves
        on to the next one."""
        complete = instance.complete(pos.segment)
        path = instance.segment_path(pos.segment)
        read = journal.read(path, pos.offset, self.settings.flush_max_rows, complete, until)
        bad = read.bad_lines
        if bad and count_bad:
            self.bad_lines += bad
            log.warning(
                "ingest.bad_lines", extra={"count": bad, "instance_id": instance.instance_id}
            )
        if read.next_offset > pos.offset:
            return read, Position(pos.segment, read.next_offset)
        if complete:
            return None, Position(pos.segment + 1, 0)
        return None, None

    def _move_cursor(
        self,
        consumer: str,
        instance_id: str,
        old: Position,
        new: Position,
        stored: dict[str, bool],
        session: Session | None = None,
    ) -> None:
        if session is None:
            with self.session_factory() as own:
                _compare_and_set(own, consumer, instance_id, old, new, stored[consumer])
                own.commit()
        else:
            _compare_and_set(session, consumer, instance_id, old, new, stored[consumer])
        stored[consumer] = True

    def _ledger_step(
        self,
        instance: InstanceJournal,
        start: Position,
        end: Position,
        read: JournalBatch | None,
        stored: dict[str, bool],
    ) -> Position:
        if read is None or read.rows == 0:
            self._move_cursor(LEDGER, instance.instance_id, start, end, stored)
            return end
        batch = from_journal(read)
        usages = usage_entries(instance.instance_id, start, batch.usage)
        with self.mark_lock, self.session_factory() as session:
            _compare_and_set(session, LEDGER, instance.instance_id, start, end, stored[LEDGER])
            inserted = usage.record_usage(session, usages)
            orgs: dict[str, int] = defaultdict(int)
            keys: dict[str, int] = defaultdict(int)
            apps: dict[str, int] = defaultdict(int)
            for u in inserted:
                orgs[u.org_id] += u.cost
                if u.key_id:
                    keys[u.key_id] += u.cost
                if u.application_id:
                    apps[u.application_id] += u.cost
            add_marks(session, instance.instance_id, orgs, keys, apps)
            session.commit()
        stored[LEDGER] = True
        self.rows_ingested += batch.rows
        self.billing.observe(batch)
        for observe in self.batch_observers:
            try:
                observe(batch)
            except Exception as exc:
                log.error("ingest.observer_failed", extra={"exc_type": type(exc).__name__})
        return end

    def _call_log_step(
        self,
        instance: InstanceJournal,
        start: Position | None,
        end: Position,
        read: JournalBatch | None,
        stored: dict[str, bool],
    ) -> tuple[Position | None, bool]:
        """(new position, ClickHouse still taking inserts)."""
        if start is None:
            return None, False
        retry = (instance.instance_id, start)
        if read is not None and read.rows:
            token = dedup_token(instance.instance_id, start, end)
            database = self._databases.get(instance.pool or "", SHARED_DATABASE)
            if not self.sink.insert(read.native, read.rows, token, database):
                # Outage: this cursor waits; the segment stays until it passes, and the
                # retry reads this same range.
                if start.segment == end.segment:
                    self._call_log_retry[retry] = end.offset
                return None, False
            self.rows_logged += read.rows
        self._call_log_retry.pop(retry, None)
        self._move_cursor(CALL_LOG, instance.instance_id, start, end, stored)
        return end, True

    def _collect(self, instance: InstanceJournal) -> None:
        """Delete the complete segments both consumers have passed; forget (or, with Redis,
        retire) a dead instance once none of its segments is left."""
        saved = self._cursors(instance.instance_id)
        passed = min(saved.get(LEDGER, _START), saved.get(CALL_LOG, _START)).segment
        left = []
        for seg in instance.segments:
            if seg < passed and instance.complete(seg):
                journal.remove(instance.segment_path(seg))
            else:
                left.append(seg)
        instance.segments = left
        if left or instance.live:
            return
        if journal.instance_live(instance.lock_path()):
            return
        with self.mark_lock, self.session_factory() as session:
            if self.settings.redis_url:
                # Its money lease in Redis is deleted by the cap publisher, in the script
                # that lowers the caps by these marks; the rows go after that.
                caps.mark_retired(session, instance.instance_id)
            else:
                caps.forget_retired(session, [instance.instance_id])
            session.commit()
        journal.remove(instance.lock_path())


class CursorMoved(Exception):
    """Another ingestor moved this cursor first; this batch is theirs."""


def _compare_and_set(
    session: Session,
    consumer: str,
    instance_id: str,
    old: Position,
    new: Position,
    exists: bool,
) -> None:
    """Move a cursor from `old` to `new`, or raise CursorMoved when it is not at `old`:
    two ingestors on one journal then never both charge a batch."""
    if not exists:
        session.add(
            IngestCursor(
                consumer=consumer, instance_id=instance_id, segment=new.segment, offset=new.offset
            )
        )
        try:
            session.flush()
        except IntegrityError as exc:
            raise CursorMoved(consumer) from exc
        return
    res = session.execute(
        update(IngestCursor)
        .where(
            IngestCursor.consumer == consumer,
            IngestCursor.instance_id == instance_id,
            IngestCursor.segment == old.segment,
            IngestCursor.offset == old.offset,
        )
        .values(segment=new.segment, offset=new.offset)
        .execution_options(synchronize_session=False)
    )
    if getattr(res, "rowcount", 0) != 1:
        raise CursorMoved(consumer)
