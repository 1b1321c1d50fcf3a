"""What an ingesting process exports on its metrics listener (kit.metrics): how far each
engine instance's journal in this spool dir is ahead of its two consumers, and what this
process's ingestor and ClickHouse sink have done.

Journal depth is read from the spool dir and the cursors in the control DB at scrape
time, so it is the same whichever process reads it (`onetoken control` on the embedded
default, `onetoken ingest` beside each gateway): it says what waits on disk, not what
this process did. The call_log consumer's backlog is the ClickHouse write spool: a batch
ClickHouse did not take stays in the journal, behind that cursor, until it does.

Labels: the engine instance id (random per gateway start) and the consumer; no org,
key or pool names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from onetoken.db.session import SessionFactory
from onetoken.ingest import journal
from onetoken.ingest.ingestor import CALL_LOG, LEDGER, Ingestor
from onetoken.ingest.journal import InstanceJournal
from onetoken.ingest.models import IngestCursor
from onetoken.kit.metrics import Metric

CONSUMERS = (LEDGER, CALL_LOG)


@dataclass(frozen=True)
class Depth:
    """One consumer's backlog in one instance's journal."""

    unread_bytes: int
    unread_segments: int
    #: Seconds since the oldest unread record's call started; 0 when nothing is unread.
    oldest_unread_age_s: float


def _sizes(instance: InstanceJournal) -> dict[int, int]:
    sizes = {}
    for seg in instance.segments:
        try:
            sizes[seg] = instance.segment_path(seg).stat().st_size
        except FileNotFoundError:
            continue  # collected since the listing: read by both consumers
    return sizes


def depth(
    instance: InstanceJournal, sizes: dict[int, int], cursor: tuple[int, int], now: float
) -> Depth:
    """The backlog behind a consumer's cursor (segment, offset) in `instance`."""
    unread: list[tuple[int, int]] = []  # (segment, first unread byte)
    total = 0
    for seg, size in sorted(sizes.items()):
        start = cursor[1] if seg == cursor[0] else 0
        if seg < cursor[0] or size <= start:
            continue
        unread.append((seg, start))
        total += size - start
    return Depth(total, len(unread), _oldest_age(instance, unread, now))


def _oldest_age(instance: InstanceJournal, unread: list[tuple[int, int]], now: float) -> float:
    # The first whole record after the cursor; a segment holding only a line still being
    # written (or bad lines) has none, so the next one is asked.
    for seg, offset in unread:
        try:
            read = journal.read(instance.segment_path(seg), offset, 1, instance.complete(seg))
        except FileNotFoundError:
            continue
        if read.rows:
            return max(0.0, now - read.min_ts / 1_000_000)
    return 0.0


def _cursors(session_factory: SessionFactory) -> dict[tuple[str, str], tuple[int, int]]:
    with session_factory() as session:
        rows = session.execute(
            select(IngestCursor.consumer, IngestCursor.instance_id, IngestCursor.segment,
                   IngestCursor.offset)
        ).all()
    return {(str(c), str(i)): (int(s), int(o)) for c, i, s, o in rows}


def journal_metrics(spool_dir: Path, session_factory: SessionFactory) -> list[Metric]:
    """Every instance journaling into `spool_dir` (and its pools' dirs)."""
    instances = journal.scan(spool_dir)
    cursors = _cursors(session_factory)
    now = time.time()
    live = Metric("onetoken_journal_live", "gauge",
                  "1 while the instance's engine holds its journal lock on this machine")
    segments = Metric("onetoken_journal_segments", "gauge", "Journal segment files on disk")
    size = Metric("onetoken_journal_bytes", "gauge", "Bytes of journal segment files on disk")
    unread = Metric("onetoken_journal_unread_bytes", "gauge",
                    "Journal bytes the consumer has yet to read (ledger, call_log)")
    unread_segs = Metric("onetoken_journal_unread_segments", "gauge",
                         "Journal segment files holding bytes the consumer has yet to read")
    age = Metric("onetoken_journal_oldest_unread_age_seconds", "gauge",
                 "Age of the oldest record the consumer has yet to read (from its call's "
                 "start); 0 when it has read everything")
    for iid, instance in sorted(instances.items()):
        sizes = _sizes(instance)
        live.add(int(instance.live), engine_instance=iid)
        segments.add(len(sizes), engine_instance=iid)
        size.add(sum(sizes.values()), engine_instance=iid)
        for consumer in CONSUMERS:
            d = depth(instance, sizes, cursors.get((consumer, iid), (0, 0)), now)
            unread.add(d.unread_bytes, engine_instance=iid, consumer=consumer)
            unread_segs.add(d.unread_segments, engine_instance=iid, consumer=consumer)
            age.add(round(d.oldest_unread_age_s, 3), engine_instance=iid, consumer=consumer)
    return [live, segments, size, unread, unread_segs, age]


def ingestor_metrics(ingestor: Ingestor) -> list[Metric]:
    """What this process's ingestor and its ClickHouse sink have done since it started."""
    records = Metric("onetoken_ingest_records_total", "counter",
                     "Journal records this process ingested, by consumer")
    records.add(ingestor.rows_ingested, consumer=LEDGER)
    records.add(ingestor.rows_logged, consumer=CALL_LOG)
    sink = ingestor.sink
    last = ingestor.last_round_at
    return [
        records,
        Metric("onetoken_ingest_bad_lines_total", "counter",
               "Journal lines that were not records, consumed and dropped").add(
            ingestor.bad_lines),
        Metric("onetoken_ingest_rounds_total", "counter",
               "Ingestion rounds run over every journal").add(ingestor.rounds),
        Metric("onetoken_ingest_failures_total", "counter",
               "Ingestion rounds, or one instance's part of one, that failed (retried "
               "next round)").add(ingestor.failures),
        Metric("onetoken_ingest_last_round_timestamp_seconds", "gauge",
               "When the last ingestion round ended (Unix time); 0 before the first").add(
            round(last, 3) if last is not None else 0),
        Metric("onetoken_clickhouse_rows_written_total", "counter",
               "call_log rows ClickHouse took from this process").add(sink.rows_written),
        Metric("onetoken_clickhouse_insert_failures_total", "counter",
               "call_log batches ClickHouse did not take (kept in the journal, retried)").add(
            sink.batches_failed),
    ]
