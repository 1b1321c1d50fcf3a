"""docs/analytics.md is the generator's output, the generator describes every column of
whatever tables the migrations create, and every example query runs on chDB with data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from onetoken.analytics import clickhouse as ch
from onetoken.analytics import docs
from onetoken.analytics.columns import CALL_LOG_COLUMNS, CALL_LOG_DOCS, CALL_LOG_TABLE
from onetoken.analytics.examples import Example, ExampleError, load_examples, parse
from onetoken.security.log import SECURITY_LOG_COLUMNS, SecurityEvent
from tests.unit.journal_files import record

DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"
POOL = "onetoken_docs_pool"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    # One chDB engine for the module, migrated as the generator migrates its own.
    client = ch.open_client(docs.default_settings(tmp_path_factory.mktemp("docs")))
    yield client
    client.close()


def _call(i: int, now_us: int, **values: Any) -> list[Any]:
    row = record(f"req-{i:04d}", org_id=f"org-{i % 2}", cost=1_234_567_891 + i,
                 key_id=f"key-{i % 3}", ts_us=now_us - i * 60_000_000)
    row.update(values)
    return [row[c] for c in CALL_LOG_COLUMNS]


@pytest.fixture(scope="module")
def seeded(client: Client) -> Client:
    """A day of varied calls (errors, limits, streams, guard findings), one batch inserted
    twice as a replay would, a pool's calls, and security events."""
    now_us = time.time_ns() // 1000
    rows = []
    for i in range(40):
        values: dict[str, Any] = {"latency_us": 1_000 + 500 * i, "ttfb_us": 200 + 10 * i}
        if i % 5 == 0:
            values |= {"status": 429, "error_code": "rate_limited", "rate_limit": "limited",
                       "usage_source": "none", "cost": 0}
        if i % 7 == 0:
            values |= {"status": 502, "error_code": "upstream_error"}
        if i % 4 == 0:
            values |= {"streamed": 1, "guard_flags": "bank_card:2,phone:1"}
        if i % 3 == 1:
            values |= {"application_id": "app-crm"}
        rows.append(_call(i, now_us, **values))
    client.insert(CALL_LOG_TABLE, rows, column_names=list(CALL_LOG_COLUMNS))
    client.insert(CALL_LOG_TABLE, rows[:5], column_names=list(CALL_LOG_COLUMNS))
    ch.ensure_pool_database(client, POOL, 30)
    client.insert(ch.call_log_table(POOL), [_call(100, now_us, org_id="org-pooled")],
                  column_names=list(CALL_LOG_COLUMNS))
    events = [
        SecurityEvent(kind=kind, severity="medium", org_id="org-0", actor_id=f"acc-{n}")
        for n, kind in enumerate(["auth.login_failed", "auth.login_failed", "key.revoked_used"])
    ]
    client.insert("onetoken.security_log", [e.row() for e in events],
                  column_names=list(SECURITY_LOG_COLUMNS))
    return client


def test_docs_analytics_md_is_generated_from_the_schema(client: Client) -> None:
    assert DOC.read_text() == docs.render(client), (
        "docs/analytics.md is stale: run `make docs` "
        "(python -m onetoken.analytics.docs docs/analytics.md)"
    )


def test_the_page_describes_every_column_of_every_table(client: Client) -> None:
    page = docs.render(client)
    # A view's columns are its query's (it holds no rows): the page names the table the
    # view writes to instead.
    tables = client.query(
        "SELECT table, name, comment FROM system.columns WHERE database = 'onetoken' "
        "AND table NOT IN (SELECT name FROM system.tables WHERE database = 'onetoken' "
        "AND engine IN ('MaterializedView', 'View'))"
    ).result_rows
    assert {t for t, _, _ in tables} >= {"call_log", "security_log", "schema_migrations"}
    for table, column, comment in tables:
        assert f"### onetoken.{table}" in page
        described = CALL_LOG_DOCS[column] if table == "call_log" else comment
        assert f"| `{column}` |" in page
        assert described and described in page, (table, column)


def test_a_new_table_is_picked_up_and_a_column_without_a_comment_stops_it(
    client: Client,
) -> None:
    client.command(
        "CREATE TABLE onetoken.zz_added (k String COMMENT 'A key.', n UInt64 COMMENT 'A count.') "
        "ENGINE = MergeTree ORDER BY k"
    )
    try:
        page = docs.render(client)
        assert "### onetoken.zz_added" in page
        assert "| `n` | `UInt64` | A count. |" in page
        assert "Retention: kept until deleted (no TTL)." in page
        client.command("ALTER TABLE onetoken.zz_added ADD COLUMN bare UInt8")
        with pytest.raises(docs.DocsError, match=r"onetoken\.zz_added\.bare"):
            docs.render(client)
    finally:
        client.command("DROP TABLE onetoken.zz_added SYNC")


def test_retention_names_the_settings_and_the_defaults(client: Client) -> None:
    page = docs.render(client)
    assert "`TTL ts + toIntervalDay(180) WHERE org_id NOT IN (SELECT org_id FROM " \
           "onetoken.legal_holds FINAL WHERE until > now64())` with the defaults; set by " \
           "`ONETOKEN_CALL_LOG_TTL_DAYS` (default 180 days)" in page
    assert "`ONETOKEN_SECURITY_LOG_TTL_DAYS` (default 365 days)" in page
    assert "`ONETOKEN_LOGIN_RECORDS_TTL_DAYS` (default 180 days)" in page


def test_a_malformed_example_block_is_refused() -> None:
    with pytest.raises(ExampleError, match="columns"):
        parse("-- name: x\n-- What.\nSELECT 1 AS a;\n")
    with pytest.raises(ExampleError, match="one statement"):
        parse("-- name: x\n-- columns: a\n-- What.\nSELECT 1 AS a\n")
    (only,) = parse("-- about\n\n-- name: x\n-- columns: a\n-- needs: onetoken.t\n-- What.\n"
                    "SELECT 1 AS a;\n")
    assert only == Example("x", "What.", ("a",), ("onetoken.t",), "SELECT 1 AS a")


def _exists(client: Client, table: str) -> bool:
    return str(client.command(f"EXISTS TABLE {table}")).strip() == "1"


@pytest.mark.parametrize("example", load_examples(), ids=lambda e: e.name)
def test_every_example_returns_its_columns_and_rows(seeded: Client, example: Example) -> None:
    missing = [t for t in example.needs if not _exists(seeded, t)]
    if missing:
        # Written against the schema contract; the tables come with the rollup migrations.
        pytest.skip(f"needs {', '.join(missing)}")
    result = seeded.query(example.sql)
    assert tuple(result.column_names) == example.columns
    assert result.result_rows, example.name


def test_money_examples_are_exact_and_read_each_call_once(seeded: Client) -> None:
    (cost,) = [e for e in load_examples() if e.name == "cost_by_org_model_day"]
    rows = seeded.query(cost.sql).named_results()
    nano = sum(r["cost_nano"] for r in rows)
    # 40 calls, 8 of them refused at no cost, and the replayed batch counted once.
    assert nano == sum(1_234_567_891 + i for i in range(40) if i % 5)
    assert sum(r["cost_currency"] for r in seeded.query(cost.sql).named_results()) * 10**9 == nano
    (pools,) = [e for e in load_examples() if e.name == "calls_in_every_log_database"]
    per_db = {r["database"]: r for r in seeded.query(pools.sql).named_results()}
    assert sorted(per_db) == ["onetoken", POOL]
    assert (per_db["onetoken"]["calls"], per_db[POOL]["calls"]) == (40, 1)
    # The replayed rows count as rows until a merge collapses them, never as calls.
    assert 40 <= per_db["onetoken"]["rows"] <= 45
