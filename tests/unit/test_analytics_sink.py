"""CallLogSink: insert, spool on failure, replay (idempotently) into embedded chDB."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.client import Client

from onetoken.analytics import queries
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.analytics.sink import CallLogSink
from onetoken.settings import Settings

# Recent enough that the 180-day TTL does not drop the rows as they are inserted.
T0 = (int(time.time()) // 3600 - 24) * 3600 * 1_000_000


def make_batch(org: str, n: int, *, start: int = 0, ts0: int = T0) -> dict[str, list[Any]]:
    ids = range(start, start + n)
    return {
        "ts": [ts0 + i * 1000 for i in ids],
        "request_id": [f"{org}-req-{i:06d}" for i in ids],
        "org_id": [org] * n,
        "account_id": [f"acc-{i % 3}" for i in ids],
        "key_id": ["ot-ab12...9f3c"] * n,
        "path": ["/v1/chat/completions"] * n,
        "model_requested": ["gpt-4o-mini"] * n,
        "model_served": ["gpt-4o-mini-2024-07-18"] * n,
        "provider": ["openai"] * n,
        "prompt_tokens": [10 + i for i in ids],
        "completion_tokens": [5] * n,
        "cached_tokens": [0] * n,
        "usage_source": ["upstream"] * n,
        "cost": [1_000 + i for i in ids],
        "status": [200] * n,
        "error_code": [""] * n,
        "latency_us": [1500] * n,
        "ttfb_us": [300] * n,
        "streamed": [i % 2 for i in ids],
        "source_ip": ["10.1.2.3"] * n,
        "user_agent": ["pytest"] * n,
        "rate_limit": ["pass"] * n,
        "attempts": [1] * n,
        "guard_flags": [""] * n,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sink")


@pytest.fixture(scope="module")
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    # One chDB engine for the module (~250 MB, one path per process).
    client = open_client(settings)
    yield client
    client.close()


@pytest.fixture()
def sink(settings: Settings, client: Client) -> Iterator[CallLogSink]:
    sink = CallLogSink(settings, client=client)
    yield sink
    sink.close()


@pytest.fixture()
def dead_sink(data_dir: Path) -> Iterator[CallLogSink]:
    # Same data dir (so the same spool dir), but a ClickHouse server nobody listens on.
    dead = Settings(
        data_dir=data_dir, clickhouse_dsn=f"http://default:pw@127.0.0.1:{free_port()}/onetoken"
    )
    sink = CallLogSink(dead)
    yield sink
    sink.close()


def assert_one_row_per_request(client: Client, org: str, n: int) -> None:
    assert queries.count_calls(client, org_id=org) == n
    assert queries.count_distinct_requests(client, org_id=org) == n
    rows = client.query(
        "SELECT request_id, count() FROM onetoken.call_log FINAL WHERE org_id = {o:String} "
        "GROUP BY request_id HAVING count() > 1",
        parameters={"o": org},
    ).result_rows
    assert rows == []


def test_write_inserts_and_counts(sink: CallLogSink, client: Client) -> None:
    sink.write(make_batch("org-direct", 500))
    assert sink.rows_written == 500
    assert sink.rows_spooled == 0
    assert_one_row_per_request(client, "org-direct", 500)
    # ts went in as microseconds and reads back unchanged.
    page = queries.org_calls(client, "org-direct", limit=1)
    assert page.rows[0]["ts"] == T0 + 499 * 1000


def test_same_batch_written_twice_reads_once(sink: CallLogSink, client: Client) -> None:
    batch = make_batch("org-twice", 300)
    sink.write(batch)
    sink.write(batch)
    assert_one_row_per_request(client, "org-twice", 300)


def test_dead_server_spools_then_replay_is_idempotent(
    dead_sink: CallLogSink, sink: CallLogSink, client: Client, data_dir: Path
) -> None:
    org = "org-spooled"
    first, second = make_batch(org, 1000), make_batch(org, 500, start=1000)
    started = time.monotonic()
    dead_sink.write(first)
    dead_sink.write(second)
    dead_sink.write(first)  # a batch the pump re-sent: spooled twice
    assert time.monotonic() - started < 30
    assert dead_sink.rows_written == 0
    assert dead_sink.rows_spooled == 2500
    assert dead_sink.spool_files == 1
    assert dead_sink.last_error is not None
    spooled = dead_sink.pending_spool_files()[0]
    assert spooled.parent == data_dir / "spool"
    assert spooled.stat().st_mode & 0o777 == 0o600
    lines = spooled.read_bytes().splitlines()
    assert len(lines) == 2500
    assert tuple(orjson.loads(lines[0])) == CALL_LOG_COLUMNS
    assert queries.count_calls(client, org_id=org) == 0

    backup = data_dir / "backup.jsonl.bak"
    shutil.copy(spooled, backup)
    assert sink.replay_spool() == 2500
    assert sink.spool_files == 0
    assert_one_row_per_request(client, org, 1500)

    # Replayed a second time (a crash after insert, before the delete): still one row each.
    shutil.copy(backup, spooled)
    assert sink.replay_spool() == 2500
    assert sink.spool_files == 0
    assert_one_row_per_request(client, org, 1500)
    assert queries.cost_for_org(client, org, T0, T0 + 10**12) == sum(1_000 + i for i in range(1500))
    backup.unlink()


def test_engine_overflow_file_is_replayed(
    sink: CallLogSink, client: Client, data_dir: Path
) -> None:
    org = "org-overflow"
    batch = make_batch(org, 120)
    spool = data_dir / "spool"
    spool.mkdir(exist_ok=True)
    overflow = spool / "overflow-engine1.jsonl"
    with overflow.open("wb") as f:
        for row in zip(*(batch[c] for c in CALL_LOG_COLUMNS), strict=True):
            f.write(orjson.dumps(dict(zip(CALL_LOG_COLUMNS, row, strict=True))) + b"\n")
        f.write(b'{"ts": 17672256')  # a write torn by a crash
    seen: list[int] = []
    assert sink.replay_spool(on_batch=lambda b: seen.append(len(b["request_id"]))) == 120
    assert seen == [120]
    assert sink.spool_bad_lines == 1
    assert not overflow.exists()
    assert sink.pending_spool_files() == []
    assert_one_row_per_request(client, org, 120)


def test_open_overflow_segment_is_left_to_the_engine(
    sink: CallLogSink, client: Client, data_dir: Path
) -> None:
    # The engine writes overflow-<instance>-<seq>.jsonl.open and renames it to .jsonl when
    # sealed: only the sealed one is complete, so only it is claimed and replayed.
    org = "org-segments"
    batch = make_batch(org, 6)
    rows = [
        orjson.dumps(dict(zip(CALL_LOG_COLUMNS, row, strict=True))) + b"\n"
        for row in zip(*(batch[c] for c in CALL_LOG_COLUMNS), strict=True)
    ]
    spool = data_dir / "spool"
    spool.mkdir(exist_ok=True)
    sealed = spool / "overflow-0123456789abcdef-00000000.jsonl"
    still_open = spool / "overflow-0123456789abcdef-00000001.jsonl.open"
    sealed.write_bytes(b"".join(rows[:4]))
    still_open.write_bytes(b"".join(rows[4:]))
    assert sink.pending_spool_files() == [sealed]
    assert sink.replay_spool() == 4
    assert not sealed.exists()
    assert still_open.read_bytes() == b"".join(rows[4:])
    assert_one_row_per_request(client, org, 4)


def test_overflow_lines_from_before_guard_flags_replay_as_empty(
    sink: CallLogSink, client: Client, data_dir: Path
) -> None:
    org = "org-pre-guard"
    batch = make_batch(org, 4)
    batch["guard_flags"] = ["", "bank_card:1", "", "phone:2,secret_key:1"]
    spool = data_dir / "spool"
    spool.mkdir(exist_ok=True)
    overflow = spool / "overflow-engine-old.jsonl"
    rows = [dict(zip(CALL_LOG_COLUMNS, r, strict=True)) for r in zip(*batch.values(), strict=True)]
    del rows[0]["guard_flags"]  # written by an engine that predates the column
    overflow.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    bad_before = sink.spool_bad_lines
    assert sink.replay_spool() == 4
    assert sink.spool_bad_lines == bad_before
    flags = client.query(
        "SELECT request_id, guard_flags FROM onetoken.call_log FINAL WHERE org_id = {o:String} "
        "ORDER BY request_id",
        parameters={"o": org},
    ).result_rows
    assert [f for _, f in flags] == batch["guard_flags"]


def test_failed_on_batch_keeps_the_file(sink: CallLogSink, data_dir: Path) -> None:
    spool = data_dir / "spool"
    spool.mkdir(exist_ok=True)
    overflow = spool / "overflow-engine2.jsonl"
    batch = make_batch("org-kept", 3)
    overflow.write_bytes(
        b"".join(
            orjson.dumps(dict(zip(CALL_LOG_COLUMNS, row, strict=True))) + b"\n"
            for row in zip(*(batch[c] for c in CALL_LOG_COLUMNS), strict=True)
        )
    )

    def ledger_down(_: dict[str, list[Any]]) -> None:
        raise RuntimeError("ledger unavailable")

    assert sink.replay_spool(on_batch=ledger_down) == 0
    kept = sink.pending_spool_files()
    assert len(kept) == 1 and kept[0].name.startswith("claimed-")
    assert sink.replay_spool() == 3
    assert sink.pending_spool_files() == []


def test_malformed_batch_never_raises_and_is_set_aside(sink: CallLogSink, data_dir: Path) -> None:
    batch = make_batch("org-bad", 4)
    del batch["cost"]
    batch["prompt"] = ["must never be stored"] * 4  # not a contract column
    sink.write(batch)
    assert sink.rows_rejected == 4
    rejected = list((data_dir / "spool").glob("rejected-*.jsonl"))
    assert len(rejected) == 1
    assert b"must never be stored" not in rejected[0].read_bytes()
    assert rejected[0] not in sink.pending_spool_files()
    rejected[0].unlink()


def test_out_of_range_value_is_spooled_not_raised(sink: CallLogSink) -> None:
    batch = make_batch("org-range", 2)
    batch["status"] = [200, 70_000]  # does not fit UInt16
    sink.write(batch)
    assert sink.rows_spooled == 2
    files = sink.pending_spool_files()
    assert len(files) == 1
    # It cannot be inserted, so replay keeps it (and does not raise).
    assert sink.replay_spool() == 0
    assert sink.pending_spool_files() == files
    files[0].unlink()


def test_cost_by_org_and_paging(sink: CallLogSink, client: Client) -> None:
    sink.write(make_batch("org-page-a", 25))
    sink.write(make_batch("org-page-b", 7, ts0=T0 + 10**9))
    costs = queries.cost_by_org(client, T0, T0 + 10**12)
    assert costs["org-page-a"] == sum(1_000 + i for i in range(25))
    assert costs["org-page-b"] == sum(1_000 + i for i in range(7))
    # The window is half-open: [start, end).
    assert "org-page-b" not in queries.cost_by_org(client, T0, T0 + 10**9)

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = queries.org_calls(client, "org-page-a", limit=10, cursor=cursor)
        seen += [r["request_id"] for r in page.rows]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"org-page-a-req-{i:06d}" for i in reversed(range(25))]
    with pytest.raises(ValueError):
        queries.org_calls(client, "org-page-a", cursor="garbage")
