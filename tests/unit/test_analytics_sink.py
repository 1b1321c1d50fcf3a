"""CallLogSink: Native blocks into embedded chDB, idempotent retries by dedup token,
failures reported."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from onetoken.analytics import queries
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.sink import CallLogSink
from onetoken.settings import Settings
from tests.support import free_port

from .batches import encode

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
        "application_id": [""] * n,
        "images": [0] * n,
        "audio_ms": [0] * n,
        "characters": [0] * n,
        "search_units": [i % 3 for i in ids],
    }


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
    # A ClickHouse server nobody listens on.
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


def insert(sink: CallLogSink, columns: dict[str, list[Any]], token: str | None = None) -> bool:
    block, rows = encode(columns)
    return sink.insert(block, rows, token or f"calllog:{columns['request_id'][0]}:{rows}")


def test_insert_stores_and_counts(sink: CallLogSink, client: Client) -> None:
    assert insert(sink, make_batch("org-direct", 500))
    assert sink.rows_written == 500
    assert_one_row_per_request(client, "org-direct", 500)
    # ts went in as microseconds and reads back unchanged.
    page = queries.org_calls(client, "org-direct", limit=1)
    assert page.rows[0]["ts"] == T0 + 499 * 1000


def test_same_block_and_token_inserted_twice_is_stored_once(
    sink: CallLogSink, client: Client
) -> None:
    batch = make_batch("org-twice", 300)
    assert insert(sink, batch, "calllog:i:0:0:300")
    assert insert(sink, batch, "calllog:i:0:0:300")
    physical = client.command(
        "SELECT count() FROM onetoken.call_log WHERE org_id = 'org-twice'"
    )
    assert physical == 300, "the second insert was dropped by its token, not merged"
    assert_one_row_per_request(client, "org-twice", 300)


def test_dead_server_reports_false_and_the_retry_is_idempotent(
    dead_sink: CallLogSink, sink: CallLogSink, client: Client
) -> None:
    # The journal keeps the records while ClickHouse is down: the sink only says whether
    # it took a batch, and the ingestor inserts the same batch again later.
    org = "org-retried"
    first, second = make_batch(org, 1000), make_batch(org, 500, start=1000)
    started = time.monotonic()
    assert not dead_sink.available() or not insert(dead_sink, first)
    assert not insert(dead_sink, second)
    assert time.monotonic() - started < 30
    assert dead_sink.rows_written == 0
    assert dead_sink.last_error is not None
    assert queries.count_calls(client, org_id=org) == 0
    assert insert(sink, first) and insert(sink, second)
    # Inserted again (a crash after the insert, before the cursor moved): one row each.
    assert insert(sink, first)
    assert_one_row_per_request(client, org, 1500)
    assert queries.cost_for_org(client, org, T0, T0 + 10**12) == sum(1_000 + i for i in range(1500))


def test_a_block_clickhouse_cannot_read_is_reported_never_raised_nor_echoed(
    sink: CallLogSink, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    batch = make_batch("org-bad", 4)
    batch["user_agent"] = ["must never be logged"] * 4
    block, rows = encode(batch)
    assert not sink.insert(block[: len(block) // 2], rows, "calllog:bad")
    assert sink.batches_failed == 1
    assert sink.last_error is not None
    assert queries.count_calls(client, org_id="org-bad") == 0
    assert "must never be logged" not in caplog.text


def test_cost_by_org_and_paging(sink: CallLogSink, client: Client) -> None:
    assert insert(sink, make_batch("org-page-a", 25))
    assert insert(sink, make_batch("org-page-b", 7, ts0=T0 + 10**9))
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
