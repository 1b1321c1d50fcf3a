"""The per-minute rollup call_stats_1m (migration 008) against real chDB: it adds up to what
call_log FINAL holds, in the shared database and in a pool's; a batch re-sent with its
token reaches it once; its TTL follows call_log's; it holds no account or key ids."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from onetoken.analytics import clickhouse as ch
from onetoken.analytics.columns import (
    CALL_LOG_COLUMNS,
    CALL_LOG_READ,
    CALL_STATS_READ,
    call_log_table,
    call_stats_table,
)
from onetoken.analytics.sink import CallLogSink
from onetoken.settings import Settings

from .batches import encode

POOL_DB = "onetoken_rollup_p1"
MINUTE_US = 60_000_000
# Recent enough that the TTL does not drop the rows as they are inserted; on a minute.
T0 = (int(time.time()) // 3600 - 30) * 3600 * 1_000_000
QUANTILES = (0.5, 0.95, 0.99)


def make_batch(tag: str, n: int, seed: int) -> dict[str, list[Any]]:
    """n calls over three hours with the shapes dashboards group by: several orgs,
    models, providers, statuses and error codes, some streamed, rate-limited or flagged."""
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    rows: dict[str, list[Any]] = {c: [] for c in CALL_LOG_COLUMNS}
    for i in range(n):
        status = rnd.choice((200,) * 12 + (429, 500, 400))
        streamed = rnd.random() < 0.4
        row = {
            "ts": T0 + rnd.randrange(180 * MINUTE_US),
            "request_id": f"{tag}-{i:06d}",
            "org_id": rnd.choice(("org_a", "org_a", "org_a", "org_b", "org_c")),
            "account_id": f"acc_{rnd.randrange(5)}",
            "key_id": f"key_{rnd.randrange(7)}",
            "path": "/v1/chat/completions",
            "model_requested": "gpt",
            "model_served": rnd.choice(("gpt-4o", "gpt-4o-mini", "claude-3-5")),
            "provider": rnd.choice(("prov_1", "prov_2")),
            "prompt_tokens": rnd.randrange(4000),
            "completion_tokens": rnd.randrange(1000) if status == 200 else 0,
            "cached_tokens": rnd.randrange(100),
            "usage_source": "upstream",
            "cost": rnd.randrange(10**9) if status == 200 else 0,
            "status": status,
            "error_code": {200: "", 429: "rate_limit_exceeded", 500: "upstream_error",
                           400: "invalid_request_error"}[status],
            "latency_us": int(rnd.lognormvariate(13, 0.6)),
            "ttfb_us": int(rnd.lognormvariate(12, 0.5)) if streamed else 0,
            "streamed": int(streamed),
            "source_ip": "10.0.0.1",
            "user_agent": "pytest",
            "rate_limit": "limited" if status == 429 else "pass",
            "attempts": 1,
            "guard_flags": "phone:1" if rnd.random() < 0.05 else "",
            "application_id": "",
            "images": 0,
            "audio_ms": 0,
            "characters": 0,
            "search_units": 0,
        }
        for c in CALL_LOG_COLUMNS:
            rows[c].append(row[c])
    return rows


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("rollup"), call_log_ttl_days=30)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    # One chDB engine for the module (~250 MB, one path per process).
    client = ch.open_client(settings)
    yield client
    client.close()


@pytest.fixture(scope="module")
def filled(settings: Settings, client: Client) -> dict[str, int]:
    """Three batches into the shared database and two into a pool's, through the sink as
    the ingestor writes them; one batch of each re-sent with its token (a crash after the
    insert, before the journal cursor moved). Returns the rows per database."""
    sink = CallLogSink(settings, client=client)
    written = {"onetoken": 0, POOL_DB: 0}
    try:
        for n, (database, batches) in enumerate((("onetoken", 3), (POOL_DB, 2))):
            for b in range(batches):
                columns = make_batch(f"{database}-{b}", 700, seed=10 * n + b)
                block, rows = encode(columns)
                token = f"calllog:{database}:{b}"
                assert sink.insert(block, rows, token, database)
                if b == 0:
                    assert sink.insert(block, rows, token, database)
                written[database] += rows
    finally:
        sink.close()
    return written


GROUPS = "org_id, hour, model_served, provider, status, error_code"


def raw_and_rollup(client: Client, database: str) -> tuple[list[Any], list[Any]]:
    """Per (org, hour, model, provider, status, error code): calls, errors, streamed,
    rate-limited, flagged, tokens and cost, from call_log FINAL and from the rollup."""
    raw = client.query(
        "SELECT org_id, toStartOfHour(toDateTime(ts, 'UTC')) AS hour, model_served, provider, "  # noqa: S608
        "status, error_code, count(), "
        "countIf(status >= 400), countIf(streamed = 1), countIf(rate_limit = 'limited'), "
        "countIf(guard_flags != ''), sum(prompt_tokens), sum(completion_tokens), "
        f"sum(cached_tokens), sum(cost) FROM {call_log_table(database)} FINAL "
        f"GROUP BY {GROUPS} ORDER BY ALL"
    ).result_rows
    rolled = client.query(
        "SELECT org_id, toStartOfHour(minute) AS hour, model_served, provider, status, "  # noqa: S608
        "error_code, sum(calls), "
        "sumIf(calls, status >= 400), sum(streamed_calls), sum(rate_limited), "
        "sum(guard_flagged), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), "
        f"sum(cost) FROM {call_stats_table(database)} GROUP BY {GROUPS} ORDER BY ALL"
    ).result_rows
    return raw, rolled


@pytest.mark.parametrize("database", ["onetoken", POOL_DB])
def test_rollup_equals_raw_aggregates_of_call_log_final(
    client: Client, filled: dict[str, int], database: str
) -> None:
    raw, rolled = raw_and_rollup(client, database)
    assert sum(r[6] for r in raw) == filled[database], "call_log FINAL holds each call once"
    assert len(raw) > 100 and any(r[7] for r in raw) and any(r[8] for r in raw)
    assert rolled == raw


@pytest.mark.parametrize("database", ["onetoken", POOL_DB])
def test_rollup_quantiles_are_close_to_the_exact_ones(
    client: Client, filled: dict[str, int], database: str
) -> None:
    exact = client.query(
        f"SELECT provider, quantilesExact{QUANTILES}(latency_us), "  # noqa: S608
        f"quantilesExactIf{QUANTILES}(ttfb_us, streamed = 1) "
        f"FROM {call_log_table(database)} FINAL GROUP BY provider ORDER BY provider"
    ).result_rows
    merged = client.query(
        f"SELECT provider, quantilesTDigestMerge{QUANTILES}(latency_us_q), "  # noqa: S608
        f"quantilesTDigestMerge{QUANTILES}(ttfb_us_q) "
        f"FROM {call_stats_table(database)} GROUP BY provider ORDER BY provider"
    ).result_rows
    assert [r[0] for r in merged] == [r[0] for r in exact] == ["prov_1", "prov_2"]
    for (_, lat, ttfb), (_, lat_q, ttfb_q) in zip(exact, merged, strict=True):
        for want, got in ((lat, lat_q), (ttfb, ttfb_q)):
            # t-digest: within a few percent in the body, wider at p99 on ~1000 values.
            for q, w, g in zip(QUANTILES, want, got, strict=True):
                assert abs(g - w) <= (0.03 if q < 0.99 else 0.08) * w, (q, w, g)


def test_reads_across_databases_add_the_pool_rollups(
    client: Client, filled: dict[str, int]
) -> None:
    ((calls, cost),) = client.query(
        f"SELECT sum(calls), sum(cost) FROM {CALL_STATS_READ}"  # noqa: S608
    ).result_rows
    ((raw_cost,),) = client.query(
        f"SELECT sum(cost) FROM {CALL_LOG_READ} FINAL"  # noqa: S608
    ).result_rows
    assert calls == filled["onetoken"] + filled[POOL_DB]
    assert cost == raw_cost


def test_a_resent_batch_reaches_the_rollup_once_only_with_dependent_dedup(
    settings: Settings, client: Client
) -> None:
    """The sink asks for deduplicate_blocks_in_dependent_materialized_views: without it
    (the default of older servers) call_log drops the re-sent block and the view counts it
    a second time."""
    columns = make_batch("resent", 50, seed=7)
    columns["org_id"] = ["org_resent"] * 50
    block, rows = encode(columns)

    class OlderServer:
        """The module's client with the setting defaulting to 0, as older servers have it
        (chDB's own default is 1): only what the sink asks for turns it on."""

        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def raw_insert(self, *args: Any, settings: dict[str, Any], **kwargs: Any) -> Any:
            settings = {"deduplicate_blocks_in_dependent_materialized_views": 0, **settings}
            return client.raw_insert(*args, settings=settings, **kwargs)

    sink = CallLogSink(settings, client=OlderServer())  # type: ignore[arg-type]
    try:
        assert sink.insert(block, rows, "calllog:resent:0")
        assert sink.insert(block, rows, "calllog:resent:0")
    finally:
        sink.close()

    def counts() -> tuple[int, int]:
        log = client.command("SELECT count() FROM onetoken.call_log WHERE org_id = 'org_resent'")
        stats = client.command(
            "SELECT sum(calls) FROM onetoken.call_stats_1m WHERE org_id = 'org_resent'"
        )
        return int(log), int(stats)

    assert counts() == (50, 50)
    client.raw_insert(
        "onetoken.call_log", column_names=CALL_LOG_COLUMNS, insert_block=block, fmt="Native",
        settings={"insert_deduplication_token": "calllog:resent:0",
                  "deduplicate_blocks_in_dependent_materialized_views": 0},
    )
    assert counts() == (50, 100)


def test_rollup_ttl_follows_the_call_log_setting(client: Client, settings: Settings) -> None:
    def ttls() -> dict[str, str]:
        return {t: ch.current_ttl(client, t) for t in (
            "onetoken.call_log", "onetoken.call_stats_1m",
            call_log_table(POOL_DB), call_stats_table(POOL_DB),
        )}

    ch.ensure_pool_database(client, POOL_DB, settings.call_log_ttl_days)
    # Every rule skips the rows of orgs under a legal hold (docs/retention.md).
    unless = f" WHERE {ch.NOT_HELD_CONDITION}"
    assert set(ttls().values()) == {
        f"ts + toIntervalDay(30){unless}", f"minute + toIntervalDay(30){unless}"
    }
    ch.ensure_ttls(client, Settings(data_dir=settings.data_dir, call_log_ttl_days=12))
    assert ttls() == {
        "onetoken.call_log": f"ts + toIntervalDay(12){unless}",
        "onetoken.call_stats_1m": f"minute + toIntervalDay(12){unless}",
        call_log_table(POOL_DB): f"ts + toIntervalDay(12){unless}",
        call_stats_table(POOL_DB): f"minute + toIntervalDay(12){unless}",
    }
    ch.ensure_ttls(client, settings)
    assert ch.current_ttl_days(client, "onetoken.call_stats_1m") == 30


def test_rollup_holds_no_account_key_or_request_ids(client: Client) -> None:
    """Account erasure rewrites call_log rows by account and key (docs/retention.md); the
    rollup has no such column to rewrite, nor any other per-person value."""
    for database in ("onetoken", POOL_DB):
        described = client.query(f"DESCRIBE TABLE {call_stats_table(database)}")
        columns = {str(r[0]) for r in described.result_rows}
        assert columns.isdisjoint(
            {"account_id", "key_id", "request_id", "source_ip", "user_agent"}
        )


def test_every_new_column_has_a_comment(client: Client) -> None:
    missing = client.query(
        "SELECT database, table, name FROM system.columns WHERE database = 'onetoken' "
        "AND (table LIKE 'dim\\_%' OR table = 'call_stats_1m') AND comment = ''"
    ).result_rows
    tables = client.query(
        "SELECT count(DISTINCT table) FROM system.columns WHERE database = 'onetoken' "
        "AND (table LIKE 'dim\\_%' OR table = 'call_stats_1m')"
    ).result_rows
    assert missing == []
    assert tables == [(6,)]
