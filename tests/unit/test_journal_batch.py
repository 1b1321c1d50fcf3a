"""`_core.read_journal_batch` and `_core.journal_instance_live`: the engine's journal read
back as one call_log Native block plus the ledger's and observers' groups. The block must
store in ClickHouse exactly what clickhouse-connect's own column insert stores."""

from __future__ import annotations

import fcntl
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.client import Client

from onetoken import _core
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.columns import CALL_LOG_COLUMNS, CALL_LOG_SCHEMA, CALL_LOG_TABLE
from onetoken.analytics.sink import CallLogSink
from onetoken.ingest.batch import from_journal
from onetoken.settings import Settings

from .batches import summarize

COLUMNS = list(CALL_LOG_COLUMNS)
STRINGS = {name for name, ch_type in CALL_LOG_SCHEMA if "String" in ch_type}
# The engine writes these from fixed sets; any short value reads back.
FIXED = {"path": "/v1/chat/completions", "usage_source": "upstream", "rate_limit": "pass"}
TRICKY = [
    "",
    "plain",
    'quote " backslash \\ slash /',
    "\x00\x01\x08\t\n\x0b\x0c\r\x1f\x7f",
    "ünïcödé ✓ 🦀 \u2028",
    "x" * 300,  # a length that takes two varint bytes
]
INT_RANGES = {
    "prompt_tokens": (0, 2**32 - 1),
    "completion_tokens": (0, 2**32 - 1),
    "cached_tokens": (0, 2**32 - 1),
    "cost": (-(2**63), 2**63 - 1),
    "status": (0, 2**16 - 1),
    "latency_us": (0, 2**32 - 1),
    "ttfb_us": (0, 2**32 - 1),
    "streamed": (0, 255),
    "attempts": (0, 255),
}


def _record(i: int) -> dict[str, Any]:
    return {n: FIXED.get(n, f"{n}-{i}") if n in STRINGS else i for n in COLUMNS}


def _line(row: dict[str, Any]) -> bytes:
    return orjson.dumps({n: row[n] for n in COLUMNS}) + b"\n"


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {n: [r[n] for r in rows] for n in COLUMNS}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    client = open_client(Settings(data_dir=tmp_path_factory.mktemp("native")))
    yield client
    client.close()


def test_offsets_resume_and_bad_lines_are_counted(tmp_path: Path) -> None:
    seg = tmp_path / "journal-inst-00000000.jsonl"
    seg.write_bytes(_line(_record(0)) + b"torn {\n" + _line(_record(1)) + _line(_record(2)))
    first = _core.read_journal_batch(str(seg), 0, 2, False)
    assert (first.rows, first.min_ts, first.max_ts) == (2, 0, 1)
    assert first.bad_lines == 1, "the bad line is counted, not returned"
    rest = _core.read_journal_batch(str(seg), first.next_offset, 10, False)
    assert (rest.rows, rest.min_ts, rest.next_offset) == (1, 2, seg.stat().st_size)
    end = _core.read_journal_batch(str(seg), rest.next_offset, 10, True)
    assert (end.rows, end.native, end.next_offset, end.bad_lines) == (0, b"", rest.next_offset, 0)
    # Bounded by a byte offset: exactly the first read's range again.
    again = _core.read_journal_batch(str(seg), 0, 10, False, until=first.next_offset)
    assert (again.native, again.next_offset) == (first.native, first.next_offset)


def test_a_tail_without_newline_waits_unless_complete(tmp_path: Path) -> None:
    seg = tmp_path / "journal-inst-00000000.jsonl"
    seg.write_bytes(_line(_record(0)) + _line(_record(1))[:30])
    whole = len(_line(_record(0)))
    live = _core.read_journal_batch(str(seg), whole, 10, False)
    assert (live.rows, live.next_offset, live.bad_lines) == (0, whole, 0)
    dead = _core.read_journal_batch(str(seg), whole, 10, True)
    assert (dead.rows, dead.next_offset, dead.bad_lines) == (0, whole + 30, 1)


def test_a_missing_segment_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _core.read_journal_batch(str(tmp_path / "gone.jsonl"), 0, 1, False)


def test_an_instance_is_live_while_its_lock_is_held(tmp_path: Path) -> None:
    lock = tmp_path / "journal-inst.lock"
    assert not _core.journal_instance_live(str(lock))
    with lock.open("w") as held:
        assert not _core.journal_instance_live(str(lock))
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _core.journal_instance_live(str(lock))
    assert not _core.journal_instance_live(str(lock))


def test_the_native_block_stores_what_the_column_insert_stores(
    client: Client, tmp_path: Path
) -> None:
    rows = []
    for i, text in enumerate(TRICKY):
        row = _record(i)
        for name in STRINGS - FIXED.keys():
            row[name] = text if name != "request_id" else f"req-{i}-{text}"
        # The engine's error codes come from a fixed set: a long one is not a record.
        row["error_code"] = text[:64]
        row["org_id"] = "org-native"
        rows.append(row)
    # Every integer column at both ends of its type.
    for j, end in enumerate((0, 1)):
        row = _record(100 + j)
        row.update({name: bounds[end] for name, bounds in INT_RANGES.items()})
        row["org_id"] = "org-native"
        rows.append(row)
    # Recent and distinct: the table's TTL would drop old rows at insert.
    now_us = int(time.time()) * 1_000_000
    for k, row in enumerate(rows):
        row["ts"] = now_us - k
    seg = tmp_path / "journal-inst-00000000.jsonl"
    seg.write_bytes(b"".join(_line(r) for r in rows))
    read = _core.read_journal_batch(str(seg), 0, 100, True)
    assert (read.rows, read.bad_lines) == (len(rows), 0)

    client.command("CREATE TABLE IF NOT EXISTS onetoken.call_log_cols AS onetoken.call_log")
    columns = _columns(rows)
    client.insert(
        "onetoken.call_log_cols",
        [columns[n] for n in COLUMNS],
        column_names=COLUMNS,
        column_oriented=True,
    )
    sink = CallLogSink(Settings(data_dir=tmp_path), client=client)
    assert sink.insert(read.native, read.rows, "calllog:native-test")
    select = ", ".join("toUnixTimestamp64Micro(ts)" if n == "ts" else n for n in COLUMNS)

    def stored(table: str) -> list[tuple[Any, ...]]:
        return sorted(
            client.query(
                f"SELECT {select} FROM {table} WHERE org_id = 'org-native'"  # noqa: S608
            ).result_rows
        )

    via_block = stored(CALL_LOG_TABLE)
    assert len(via_block) == len(rows)
    assert via_block == stored("onetoken.call_log_cols")
    assert sorted(tuple(r[n] for n in COLUMNS) for r in rows) == via_block


def test_groups_equal_the_reference_aggregation(tmp_path: Path) -> None:
    rng = random.Random(9)  # noqa: S311 -- repeatable test data
    day = 86_400_000_000
    rows = []
    for i in range(3000):
        row = _record(i)
        row.update(
            ts=20_000 * day + rng.randrange(-day // 2, day // 2),
            org_id=rng.choice(["", "org-a", "org-b"]),
            account_id=rng.choice(["acc-1", "acc-2"]),
            key_id=rng.choice(["", "key-1", "key-2", "key-3"]),
            model_requested=rng.choice(["", "m1", "m2"]),
            cost=rng.choice([0, -5, 1, 7, 2**62]),
            status=rng.choice([200, 200, 401, 429, 502]),
            error_code=rng.choice(["", "key_revoked", "upstream_timeout", "budget_exceeded"]),
            source_ip=f"10.0.0.{rng.randrange(4)}",
            provider=rng.choice(["", "p1", "p2"]),
            user_agent=f"ua-{i}",
            streamed=i % 2,
            attempts=i % 4,
        )
        rows.append(row)
    seg = tmp_path / "journal-inst-00000000.jsonl"
    seg.write_bytes(b"".join(_line(r) for r in rows))
    got = from_journal(_core.read_journal_batch(str(seg), 0, 10_000, True))
    want = summarize(_columns(rows))
    assert got == want
    assert sum(c.calls for c in got.calls) == 3000
    assert sum(u.cost for u in got.usage) == sum(
        r["cost"] for r in rows if r["cost"] > 0 and r["org_id"]
    )
