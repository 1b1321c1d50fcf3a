"""Ingestion from journal files into the ledger (aggregated usage entries, marks, cursors)
and call_log (its own cursor), with the guarantees the journal must keep."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from onetoken.billing import packages, usage
from onetoken.billing import service as billing
from onetoken.billing.models import LedgerEntry, PackageConsumption
from onetoken.ingest.ingestor import Ingestor
from onetoken.ingest.journal import lock_name, segment_name
from onetoken.ingest.marks import spent_marks
from onetoken.ingest.models import IngestCursor
from onetoken.orgs import service as orgs
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.unit.batches import decode_native
from tests.unit.journal_files import append, dead, live, record

CREDIT = 10**12
NOW_US = datetime.now(UTC).replace(hour=12).timestamp().__int__() * 1_000_000


class FakeSink:
    """Takes call_log blocks unless `down` (a ClickHouse outage); every attempt's dedup
    token is kept."""

    def __init__(self) -> None:
        self.down = False
        self.inserted: list[str] = []
        self.attempts: list[tuple[str, int]] = []
        self.closed = False

    def available(self) -> bool:
        return True

    def insert(
        self, block: bytes, rows: int, dedup_token: str, database: str = "onetoken"
    ) -> bool:
        self.attempts.append((dedup_token, rows))
        if self.down:
            return False
        request_ids = decode_native(block)["request_id"]
        assert len(request_ids) == rows
        self.inserted.extend(request_ids)
        return True

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def org_id(state: AppState) -> str:
    with state.session_factory() as s:
        org = orgs.create_org(s, "A")
        billing.credit(s, org.id, amount=CREDIT, kind="grant", idempotency_key="g")
        s.commit()
        return org.id


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def ingestor(settings: Settings, state: AppState, sink: FakeSink) -> Ingestor:
    settings.ensure_dirs()
    return Ingestor(settings, state.session_factory, sink=sink)  # type: ignore[arg-type]


def spool(settings: Settings) -> Path:
    return settings.spool_dir


def usage_entries(state: AppState, org_id: str) -> list[LedgerEntry]:
    with state.session_factory() as s:
        return list(
            s.scalars(
                select(LedgerEntry)
                .where(LedgerEntry.org_id == org_id, LedgerEntry.kind == "usage")
                .order_by(LedgerEntry.created_at)
            )
        )


def charged(state: AppState, org_id: str) -> tuple[int, int]:
    entries = usage_entries(state, org_id)
    return -sum(e.amount for e in entries), sum(e.calls for e in entries)


def test_usage_is_one_entry_per_org_key_model_and_day(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str, sink: FakeSink
) -> None:
    rows = [
        record("r1", org_id=org_id, cost=10, ts_us=NOW_US),
        record("r2", org_id=org_id, cost=20, ts_us=NOW_US + 5),
        record("r3", org_id=org_id, cost=30, ts_us=NOW_US + 9, model="other"),
        record("r4", org_id=org_id, cost=40, ts_us=NOW_US + 7, key_id="key_b"),
        # Not charged: no cost, or no org (an unknown key).
        record("r5", org_id=org_id, cost=0, ts_us=NOW_US),
        record("r6", cost=0, ts_us=NOW_US),
    ]
    append(spool(settings), "i1", 1, rows)
    dead(spool(settings), "i1")
    assert ingestor.catch_up() == 6
    entries = usage_entries(state, org_id)
    got = sorted((e.key_id, e.model, -e.amount, e.calls, e.request_id) for e in entries)
    assert got == [
        ("key_a", "m", 30, 2, None),
        ("key_a", "other", 30, 1, None),
        ("key_b", "m", 40, 1, None),
    ]
    # Every record reached call_log once, and the spent marks of the instance moved.
    assert sorted(sink.inserted) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert ingestor.rows_ingested == 6
    assert ingestor.rows_logged == 6


def test_an_entry_never_straddles_a_utc_day(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str
) -> None:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    at = int(midnight.timestamp()) * 1_000_000
    rows = [
        record("late", org_id=org_id, cost=7, ts_us=at - 1),
        record("early", org_id=org_id, cost=11, ts_us=at),
        record("early2", org_id=org_id, cost=13, ts_us=at + 1),
    ]
    append(spool(settings), "i1", 1, rows)
    dead(spool(settings), "i1")
    ingestor.catch_up()
    entries = usage_entries(state, org_id)
    assert [(e.created_at, -e.amount, e.calls) for e in entries] == [
        (midnight - timedelta(microseconds=1), 7, 1),
        (midnight, 24, 2),
    ]


def test_marks_are_per_instance_and_move_with_the_ledger(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str
) -> None:
    append(spool(settings), "i1", 1, [record("a", org_id=org_id, cost=5, ts_us=NOW_US)])
    append(spool(settings), "i2", 1, [record("b", org_id=org_id, cost=8, ts_us=NOW_US)])
    with live(spool(settings), "i1"), live(spool(settings), "i2"):
        # Live instances: their last segment is not complete, but whole lines are read.
        ingestor.catch_up()
        with state.session_factory() as s:
            assert spent_marks(s, "i1") == ({org_id: 5}, {"key_a": 5})
            assert spent_marks(s, "i2") == ({org_id: 8}, {"key_a": 8})
            assert spent_marks(s, "gone") == ({}, {})
            assert billing.balance(s, org_id) == CREDIT - 13


def test_replay_after_a_crash_charges_nothing_twice(
    ingestor: Ingestor,
    settings: Settings,
    state: AppState,
    org_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = [record(f"r{i}", org_id=org_id, cost=3, ts_us=NOW_US + i) for i in range(100)]
    append(spool(settings), "i1", 1, rows)
    dead(spool(settings), "i1")
    settings.flush_max_rows = 30

    real = usage.record_usage
    calls = Counter[str]()

    def crash_on_second_batch(session: Any, usages: Any) -> Any:
        calls["n"] += 1
        out = real(session, usages)
        if calls["n"] == 2:
            # Dies after the entries were written, before the commit.
            raise RuntimeError("crash")
        return out

    monkeypatch.setattr(usage, "record_usage", crash_on_second_batch)
    # Another instance's journal goes on while this one's batch fails.
    append(spool(settings), "i2", 1, [record("other", org_id=org_id, cost=1000, ts_us=NOW_US)])
    dead(spool(settings), "i2")
    with caplog.at_level(logging.ERROR):
        ingestor.catch_up()
    assert [r.getMessage() for r in caplog.records] == ["ingest.failed"]
    assert charged(state, org_id) == (1090, 31)
    monkeypatch.setattr(usage, "record_usage", real)
    # A new ingestor (a restarted control process) picks up from the committed cursor.
    again = Ingestor(settings, state.session_factory, sink=FakeSink())  # type: ignore[arg-type]
    again.catch_up()
    again.catch_up()
    assert charged(state, org_id) == (1300, 101)
    with state.session_factory() as s:
        assert spent_marks(s, "i1")[0] == {}  # instance forgotten once fully ingested
        assert billing.balance(s, org_id) == CREDIT - 1300


def test_two_ingestors_on_one_journal_charge_each_call_once(
    settings: Settings, state: AppState, org_id: str
) -> None:
    # Cursors move by compare-and-set in the batch's transaction: whichever ingestor
    # commits a batch first owns it, the other rolls back and rereads its cursors.
    settings.flush_max_rows = 5
    sp = spool(settings)
    rows = [record(f"r{i}", org_id=org_id, cost=1 + i % 7, ts_us=NOW_US + i) for i in range(300)]
    append(sp, "i1", 1, rows[:150])
    append(sp, "i1", 2, rows[150:])
    dead(sp, "i1")
    sinks = [FakeSink(), FakeSink()]
    ingestors = [
        Ingestor(settings, state.session_factory, sink=sink)  # type: ignore[arg-type]
        for sink in sinks
    ]
    start = threading.Barrier(2)

    def run(ingestor: Ingestor) -> None:
        start.wait()
        while ingestor.catch_up():
            pass

    threads = [threading.Thread(target=run, args=(i,)) for i in ingestors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ingestor in ingestors:
        ingestor.catch_up()
    assert charged(state, org_id) == (sum(1 + i % 7 for i in range(300)), 300)
    assert sum(i.rows_ingested for i in ingestors) == 300
    # call_log may see a batch twice (its insert is idempotent by token), never miss one.
    assert set(sinks[0].inserted) | set(sinks[1].inserted) == {f"r{i}" for i in range(300)}
    assert list(sp.iterdir()) == []


def test_clickhouse_outage_delays_only_call_log_and_loses_nothing(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str, sink: FakeSink
) -> None:
    sp = spool(settings)
    append(sp, "i1", 1, [record(f"a{i}", org_id=org_id, cost=1, ts_us=NOW_US) for i in range(5)])
    append(sp, "i1", 2, [record(f"b{i}", org_id=org_id, cost=1, ts_us=NOW_US) for i in range(5)])
    dead(sp, "i1")
    sink.down = True
    ingestor.catch_up()
    # The ledger went on; the segments stay for call_log.
    assert charged(state, org_id) == (10, 10)
    assert sink.inserted == []
    assert (sp / segment_name("i1", 1)).exists()
    assert (sp / segment_name("i1", 2)).exists()
    sink.down = False
    ingestor.catch_up()
    assert sorted(sink.inserted) == sorted(
        [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    )
    assert charged(state, org_id) == (10, 10)
    # Both consumers passed everything of a dead instance: files and state are gone.
    assert sorted(p.name for p in sp.iterdir()) == []
    with state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(IngestCursor)) == 0


def test_a_call_log_retry_sends_the_same_range_and_token_though_the_segment_grew(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str, sink: FakeSink
) -> None:
    """The dedup token names the batch (instance, segment, start, end): a retry must read
    exactly that range again, or ClickHouse could not drop a block that did land."""
    sp = spool(settings)
    append(sp, "i1", 1, [record(r, org_id=org_id, cost=1, ts_us=NOW_US) for r in ("a", "b")])
    with live(sp, "i1"):
        sink.down = True
        ingestor.catch_up()
        assert sink.attempts == [(sink.attempts[0][0], 2)]
        append(sp, "i1", 1, [record("c", org_id=org_id, cost=1, ts_us=NOW_US)])
        sink.down = False
        ingestor.catch_up()
    first, retry, after = sink.attempts
    assert retry == first
    assert after[1] == 1 and after[0] != first[0]
    assert sink.inserted == ["a", "b", "c"]
    assert charged(state, org_id) == (3, 3)


def test_bad_line_is_counted_and_skipped_never_echoed(
    ingestor: Ingestor,
    settings: Settings,
    state: AppState,
    org_id: str,
    sink: FakeSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-live-SECRET-in-a-torn-line"
    sp = spool(settings)
    append(
        sp,
        "i1",
        1,
        [record("a", org_id=org_id, cost=2, ts_us=NOW_US)],
        raw=f'{{"x":"{secret}\n'.encode(),
    )
    append(sp, "i1", 1, [record("b", org_id=org_id, cost=3, ts_us=NOW_US)])
    dead(sp, "i1")
    with caplog.at_level(logging.DEBUG):
        ingestor.catch_up()
    assert ingestor.bad_lines == 1
    assert sorted(sink.inserted) == ["a", "b"]
    assert charged(state, org_id) == (5, 2)
    assert secret not in caplog.text
    assert any(r.getMessage() == "ingest.bad_lines" for r in caplog.records)


def test_live_tail_waits_and_a_dead_instances_torn_tail_is_bad(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str, sink: FakeSink
) -> None:
    sp = spool(settings)
    whole = record("a", org_id=org_id, cost=2, ts_us=NOW_US)
    append(sp, "i1", 1, [whole], raw=b'{"ts":1,"request_id":"half')
    with live(sp, "i1"):
        ingestor.catch_up()
        assert sink.inserted == ["a"]
        assert ingestor.bad_lines == 0
        # Live: the segment is not complete, so it stays.
        ingestor.catch_up()
        assert (sp / segment_name("i1", 1)).exists()
    # The engine died mid-line: the tail is counted as bad, the segment and lock go.
    ingestor.catch_up()
    assert ingestor.bad_lines == 1
    assert sink.inserted == ["a"]
    assert not (sp / segment_name("i1", 1)).exists()
    assert not (sp / lock_name("i1")).exists()


def test_complete_segments_of_a_live_instance_are_deleted_once_passed(
    ingestor: Ingestor, settings: Settings, org_id: str, sink: FakeSink
) -> None:
    sp = spool(settings)
    append(sp, "i1", 1, [record("a", org_id=org_id, cost=1, ts_us=NOW_US)])
    append(sp, "i1", 2, [record("b", org_id=org_id, cost=1, ts_us=NOW_US)])
    with live(sp, "i1"):
        ingestor.catch_up()
        assert not (sp / segment_name("i1", 1)).exists()
        assert (sp / segment_name("i1", 2)).exists()
        append(sp, "i1", 2, [record("c", org_id=org_id, cost=1, ts_us=NOW_US)])
        ingestor.catch_up()
    assert sink.inserted == ["a", "b", "c"]
    assert (sp / lock_name("i1")).exists()


def test_packages_pay_before_prepaid(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str
) -> None:
    with state.session_factory() as s:
        pkg = packages.grant_package(
            s,
            org_id,
            credit=25,
            validity_days=1,
            idempotency_key="p",
            # Granted an hour before the records (noon today), valid until tomorrow: it
            # pays for them whatever the time of day the test runs at.
            now=datetime.fromtimestamp(NOW_US / 1_000_000, UTC) - timedelta(hours=1),
        )
        s.commit()
        pkg_id = pkg.id
    rows = [record(f"r{i}", org_id=org_id, cost=10, ts_us=NOW_US + i) for i in range(4)]
    append(spool(settings), "i1", 1, rows)
    dead(spool(settings), "i1")
    ingestor.catch_up()
    with state.session_factory() as s:
        assert packages.package_credit(s, org_id) == 0
        consumed = s.scalars(
            select(PackageConsumption.amount).where(PackageConsumption.package_id == pkg_id)
        ).all()
        assert sum(consumed) == 25
        assert billing.balance(s, org_id) == CREDIT + 25 - 40


def test_snapshot_reads_under_mark_lock_never_count_a_cost_twice(
    ingestor: Ingestor, settings: Settings, state: AppState, org_id: str
) -> None:
    # balance + mark stays the credit whenever both are read under mark_lock, however the
    # reads interleave with the ingestor's commits.
    settings.flush_max_rows = 7
    rows = [record(f"r{i}", org_id=org_id, cost=1 + i % 3, ts_us=NOW_US + i) for i in range(400)]
    sp = spool(settings)
    append(sp, "i1", 1, rows)
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            with ingestor.mark_lock, state.session_factory() as s:
                marks, _ = spent_marks(s, "i1")
                seen.append(billing.balance(s, org_id) + marks.get(org_id, 0))

    with live(sp, "i1"):
        t = threading.Thread(target=reader)
        t.start()
        try:
            ingestor.catch_up()
        finally:
            done.set()
            t.join()
    assert seen and set(seen) == {CREDIT}
    total = sum(1 + i % 3 for i in range(400))
    assert charged(state, org_id) == (total, 400)
    # Marks accumulated over the 58 batches, per org and per key.
    with state.session_factory() as s:
        assert spent_marks(s, "i1") == ({org_id: total}, {"key_a": total})


def test_background_thread_ingests_and_stop_catches_up(
    settings: Settings, state: AppState, org_id: str, sink: FakeSink
) -> None:
    settings.flush_interval_ms = 20
    settings.ensure_dirs()
    ingestor = Ingestor(settings, state.session_factory, sink=sink)  # type: ignore[arg-type]
    flushed = threading.Event()
    ingestor.flush_hooks.append(flushed.set)
    seen: list[int] = []
    ingestor.batch_observers.append(lambda b: seen.append(b.rows))
    ingestor.start()
    sp = spool(settings)
    append(sp, "i1", 1, [record("a", org_id=org_id, cost=1, ts_us=NOW_US)])
    assert flushed.wait(10)
    dead(sp, "i1")
    ingestor.stop()
    assert sink.inserted == ["a"] and sink.closed
    assert seen == [1]
    assert charged(state, org_id) == (1, 1)
