from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.billing import service as billing
from onetoken.db.models import LedgerEntry
from onetoken.deps import AppState
from onetoken.gateway.supervisor import GatewaySupervisor
from onetoken.orgs import service as orgs
from onetoken.settings import Settings
from tests.unit.conftest import contract

Batch = dict[str, list[Any]]


def record(org_id: str, request_id: str, cost: int, ts_us: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ts": ts_us if ts_us is not None else time.time_ns() // 1000,
        "request_id": request_id,
        "org_id": org_id,
        "account_id": "acc",
        "key_id": "key",
        "path": "/v1/chat/completions",
        "model_requested": "m",
        "model_served": "m",
        "provider": "p",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 0,
        "usage_source": "upstream",
        "cost": cost,
        "status": 200,
        "error_code": "",
        "latency_us": 100,
        "ttfb_us": 50,
        "streamed": 0,
        "source_ip": "127.0.0.1",
        "user_agent": "t",
        "rate_limit": "pass",
        "attempts": 1,
        "guard_flags": "",
    }
    return row


def to_batch(rows: list[dict[str, Any]]) -> Batch:
    return {c: [r[c] for r in rows] for c in CALL_LOG_COLUMNS}


class FakeEngine:
    def __init__(self, config_json: bytes) -> None:
        self.config = orjson.loads(config_json)
        self.snapshots: list[dict[str, Any]] = []
        self.queue: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stopped_with: float | None = None
        self.instance_id = "fake"

    def start(self) -> str:
        return "127.0.0.1:18080"

    def load_snapshot(self, data: bytes) -> int:
        snap = orjson.loads(data)
        self.snapshots.append(snap)
        return int(snap["version"])

    def drain_records(self, max_records: int) -> Batch | None:
        with self.lock:
            rows, self.queue = self.queue[:max_records], self.queue[max_records:]
        return to_batch(rows) if rows else None

    def stop(self, grace_seconds: float) -> None:
        self.stopped_with = grace_seconds

    def stats(self) -> dict[str, int]:
        return {"queue_depth": len(self.queue)}


class FakeSink:
    def __init__(self) -> None:
        self.written: list[Batch] = []
        self.pending: list[Batch] = []
        self.closed = False

    def write(self, batch: Batch) -> None:
        self.written.append(batch)

    def replay_spool(self, on_batch: Callable[[Batch], None] | None = None) -> int:
        n = 0
        while self.pending:
            batch = self.pending[0]
            if on_batch:
                on_batch(batch)
            self.written.append(self.pending.pop(0))
            n += len(batch["request_id"])
        return n

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def org_id(state: AppState) -> str:
    with state.session_factory() as s:
        org = orgs.create_org(s, "A")
        billing.credit(s, org.id, amount=1_000_000, kind="grant", idempotency_key="g")
        s.commit()
        return org.id


@pytest.fixture
def sup(
    settings: Settings, state: AppState
) -> Iterator[tuple[GatewaySupervisor, FakeEngine, FakeSink]]:
    engines: list[FakeEngine] = []

    def factory(cfg: bytes) -> FakeEngine:
        engines.append(FakeEngine(cfg))
        return engines[-1]

    sink = FakeSink()
    settings.flush_interval_ms = 20
    settings.config_watch_interval_ms = 50
    s = GatewaySupervisor(
        settings, state.secrets, state.session_factory, engine_factory=factory, sink=sink
    )
    s.start()
    yield s, engines[0], sink
    s.stop(0)


def _usage_sum(state: AppState, org_id: str) -> int:
    with state.session_factory() as s:
        return int(
            s.scalar(
                select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                    LedgerEntry.org_id == org_id, LedgerEntry.kind == "usage"
                )
            )
            or 0
        )


def test_start_pushes_config_and_snapshot(sup: Any, org_id: str, settings: Settings) -> None:
    _s, engine, _ = sup
    assert set(engine.config) == set(contract("engine_config.json"))
    assert engine.config["spool_dir"] == str(settings.spool_dir.resolve())
    assert engine.snapshots and engine.snapshots[0]["version"] == 1


def test_pump_writes_ledger_once_and_moves_spent_mark(
    sup: Any, org_id: str, state: AppState
) -> None:
    s, engine, sink = sup
    engine.queue += [record(org_id, "r1", 300), record(org_id, "r2", 0), record("", "r3", 0)]
    assert s.pump_once() == 3
    assert _usage_sum(state, org_id) == -300
    assert s.ingested_cost() == {org_id: 300}
    assert sink.written[-1]["request_id"] == ["r1", "r2", "r3"]
    # The same request id again (e.g. a replayed spool) is not charged twice.
    engine.queue.append(record(org_id, "r1", 300))
    s.pump_once()
    assert _usage_sum(state, org_id) == -300
    assert s.ingested_cost() == {org_id: 300}
    # Balance and spent_mark in the next snapshot move together.
    s.push_snapshot()
    o = next(o for o in engine.snapshots[-1]["orgs"] if o["id"] == org_id)
    assert (o["balance"], o["spent_mark"]) == (1_000_000 - 300, 300)


def test_ledger_sum_equals_call_log_cost(sup: Any, org_id: str, state: AppState) -> None:
    s, engine, sink = sup
    engine.queue += [record(org_id, f"q{i}", i * 7) for i in range(250)]
    while s.pump_once():
        pass
    logged = sum(c for b in sink.written for c in b["cost"])
    assert -_usage_sum(state, org_id) == logged == sum(i * 7 for i in range(250))


def test_pump_thread_and_watcher_run(sup: Any, org_id: str, state: AppState) -> None:
    _s, engine, _sink = sup
    engine.queue.append(record(org_id, "bg", 11))
    with state.session_factory() as sess:
        orgs.create_org(sess, "made elsewhere")
        sess.commit()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _usage_sum(state, org_id) == -11 and any(
            len(snap["orgs"]) == 2 for snap in engine.snapshots
        ):
            break
        time.sleep(0.02)
    assert _usage_sum(state, org_id) == -11
    assert any(len(snap["orgs"]) == 2 for snap in engine.snapshots)
    versions = [snap["version"] for snap in engine.snapshots]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


def test_replayed_records_count_for_this_engine_only_when_newer(
    sup: Any, org_id: str, state: AppState
) -> None:
    s, _, sink = sup
    old = record(org_id, "old", 50, ts_us=1)  # from an engine that ran before this one
    new = record(org_id, "new", 70)
    sink.pending.append(to_batch([old, new]))
    sink.replay_spool(s._ingest_replayed)
    assert _usage_sum(state, org_id) == -120
    assert s.ingested_cost() == {org_id: 70}


def test_ledger_failure_parks_the_batch_for_replay(
    sup: Any, org_id: str, state: AppState, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, engine, sink = sup
    before = len(sink.written)

    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("db down")

    monkeypatch.setattr(billing, "record_usage", boom)
    engine.queue.append(record(org_id, "parked", 5))
    s.pump_once()
    assert len(sink.written) == before
    parked = list(settings.spool_dir.glob("overflow-pump-*.jsonl"))
    assert len(parked) == 1
    line = orjson.loads(parked[0].read_bytes().splitlines()[0])
    assert line["request_id"] == "parked" and set(line) == set(CALL_LOG_COLUMNS)


def test_stop_drains_everything(settings: Settings, state: AppState, org_id: str) -> None:
    sink = FakeSink()
    holder: list[FakeEngine] = []

    def factory(cfg: bytes) -> FakeEngine:
        holder.append(FakeEngine(cfg))
        return holder[0]

    settings.flush_interval_ms = 60_000
    s = GatewaySupervisor(
        settings, state.secrets, state.session_factory, engine_factory=factory, sink=sink
    )
    s.start()
    holder[0].queue += [record(org_id, f"s{i}", 1) for i in range(10)]
    s.stop(2.5)
    assert holder[0].stopped_with == 2.5
    assert holder[0].queue == []
    assert _usage_sum(state, org_id) == -10
    assert sink.closed
    s.stop(1)  # idempotent
