"""Cluster DDL (onetoken.analytics.cluster) against chDB: every generated statement parses,
every analytics query answers the same over two stand-in shards as over one table, inserts
through a Distributed table fail while the shards cannot take them, the audit reports a
finding once, and account erasure reaches the rows of every stand-in server.

No ClickHouse cluster or Keeper runs here, so the Replicated and Distributed parts are
validated, not run: chDB parses them (formatQuery) and runs them without their Keeper parts
(the Distributed tables are real, over a cluster declared in chDB's configuration, but
cannot reach a shard: chDB has no TCP server), and the sharding they describe is
reproduced with plain tables from the single-node schema, one database per shard, rows
routed by the generated shard key evaluated in chDB, read through a Merge table under the
analytics name. A Merge table applies FINAL per underlying table, as a Distributed table
applies it per shard.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client

from onetoken import cli
from onetoken.analytics import clickhouse as ch
from onetoken.analytics import cluster, queries
from onetoken.analytics.columns import CALL_LOG_COLUMNS, CALL_LOG_DOCS
from onetoken.analytics.sink import CallLogSink
from onetoken.audit import AuditReport, scan_clickhouse
from onetoken.billing import statements
from onetoken.rights import erasure, export
from onetoken.security.log import SECURITY_LOG_COLUMNS
from onetoken.security.log import insert_rows as insert_security_rows
from onetoken.settings import Settings
from onetoken.web.routes import security as security_route

CLUSTER = "prod"
SHARDS = ("shard_0", "shard_1")
NEEDLE = "needle-7f3a"
# Recent enough for the 30-day TTL of the module's tables not to drop rows at insert.
START = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=25)
ORGS = ("org_a", "org_b", "org_c")


# The cluster of the generated DDL, declared to chDB so that its Distributed tables can be
# created for real. Nothing listens on these ports; no test reads through them.
CLUSTER_CONFIG = f"""<clickhouse><remote_servers><{CLUSTER}>
<shard><replica><host>127.0.0.1</host><port>1</port></replica></shard>
<shard><replica><host>127.0.0.1</host><port>1</port></replica></shard>
</{CLUSTER}></remote_servers></clickhouse>"""


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    # One chDB engine for the module: opening costs ~250 MB and a process holds one path.
    # Opened as ch.open_client does, plus the cluster configuration.
    root = tmp_path_factory.mktemp("ch")
    (root / "config.xml").write_text(CLUSTER_CONFIG)
    settings = Settings(data_dir=root, call_log_ttl_days=30)
    client = clickhouse_connect.get_client(
        interface="chdb",
        path=str(root / "clickhouse"),
        chdb_options={"config-file": str(root / "config.xml")},
    )
    ch.apply_migrations(client)
    ch.ensure_ttls(client, settings)
    yield client
    client.close()


def generated_statements() -> list[str]:
    """The statements of `onetoken analytics-ddl --cluster`, split as a file of them is."""
    text = "\n".join(cluster.cluster_ddl(CLUSTER))
    return ch.Migration(0, "cluster.sql", text).statements()


def formatted(client: Client, statement: str) -> str:
    """chDB's parser on one statement, without running it: a syntax error raises."""
    return str(
        client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": statement})
        .result_rows[0][0]
    )


# ---------------------------------------------------------------------------------------
# The DDL itself


def test_every_cluster_statement_parses(client: Client) -> None:
    generated = generated_statements()
    creates = [s for s in generated if s.startswith("CREATE TABLE")]
    # A local Replicated table and a Distributed one per table of the single-node schema.
    assert len(creates) == 2 * len(cluster.SHARD_KEYS)
    for statement in generated:
        assert formatted(client, statement)


def test_a_statement_that_does_not_parse_fails(client: Client) -> None:
    (distributed,) = [s for s in generated_statements() if "cityHash64(request_id))" in s]
    broken = distributed.replace("cityHash64(request_id))", "cityHash64(request_id)")
    assert broken.count("(") > broken.count(")")
    with pytest.raises(Exception, match="Syntax error"):
        formatted(client, broken)


def executable_here(statement: str) -> str:
    """A generated statement as chDB can run it: without ON CLUSTER (the DDL queue is in
    Keeper) and without the Replicated engine's Keeper path and replica name. Nothing else
    changes."""
    statement = statement.replace(f" ON CLUSTER {CLUSTER}", "")
    return re.sub(
        r"ENGINE = Replicated(\w+)\('/clickhouse/tables/\{shard\}/\w+/\w+', '\{replica\}'(, )?",
        r"ENGINE = \1(",
        statement,
    )


@pytest.fixture(scope="module")
def clus(client: Client) -> str:
    """Every generated statement executed, in order, in database `clus`: local tables,
    Distributed tables over the declared cluster, later migrations' ALTERs and the
    migration records."""
    text = "\n".join(cluster.cluster_ddl(CLUSTER, "clus"))
    for statement in ch.Migration(0, "c.sql", text).statements():
        runnable = executable_here(statement)
        assert "Replicated" not in runnable and "ON CLUSTER" not in runnable
        client.command(runnable)
    return "clus"


def test_cluster_ddl_runs_in_chdb_but_for_keeper(client: Client, clus: str) -> None:
    """The executed DDL has the single-node tables' columns, keys, partitioning, TTL and
    indexes."""

    def tables(db: str) -> dict[str, tuple[Any, ...]]:
        return {
            str(r[0]): tuple(r[1:])
            for r in client.query(
                "SELECT name, engine, sorting_key, partition_key, primary_key "
                "FROM system.tables WHERE database = {db:String}",
                parameters={"db": db},
            ).result_rows
        }

    def described(table: str) -> list[tuple[Any, ...]]:
        return [tuple(r[:3]) for r in client.query(f"DESCRIBE TABLE {table}").result_rows]

    def indexes(db: str) -> set[tuple[Any, ...]]:
        return set(client.query(
            "SELECT table, name, type_full, expr, granularity FROM system.data_skipping_indices "
            "WHERE database = {db:String}", parameters={"db": db},
        ).result_rows)

    def ttl(table: str) -> str:
        return ch.current_ttl(client, table)

    # The table of legal holds is the control process's, made beside the TTLs that read
    # it, on a single node only (docs/retention.md).
    single, clus = tables("onetoken"), tables("clus")
    single.pop("legal_holds", None)
    views = {t for t, shape in single.items() if shape[0] == "MaterializedView"}
    assert views == {"call_stats_1m_mv"}
    assert set(clus) == views | {
        f"{t}{suffix}" for t in single.keys() - views for suffix in ("", "_local")
    }
    single_ttl_defaults = {
        "call_log": "ts + toIntervalDay(180)",
        "security_log": "ts + toIntervalDay(365)",
        "call_stats_1m": "minute + toIntervalDay(180)",
    }
    # One view per shard, on its local call_log, writing to its local rollup.
    (view,) = client.query(
        "SELECT engine, dependencies_table FROM system.tables "
        "WHERE database = 'clus' AND name = 'call_stats_1m_local'"
    ).result_rows
    assert view == ("AggregatingMergeTree", [])
    (source,) = client.query(
        "SELECT dependencies_table FROM system.tables "
        "WHERE database = 'clus' AND name = 'call_log_local'"
    ).result_rows
    assert source == (["call_stats_1m_mv"],)
    create_view = str(client.command("SHOW CREATE TABLE clus.call_stats_1m_mv"))
    assert "TO clus.call_stats_1m_local" in create_view
    assert "FROM clus.call_log_local" in create_view
    for table, shape in single.items():
        if table in views:
            continue
        assert clus[f"{table}_local"] == shape
        assert clus[table][0] == "Distributed"
        assert described(f"clus.{table}") == described(f"clus.{table}_local")
        assert described(f"clus.{table}") == described(f"onetoken.{table}")
        if table in single_ttl_defaults:
            assert ttl(f"clus.{table}_local") == single_ttl_defaults[table]
    assert {(t.removesuffix("_local"), *r) for t, *r in indexes("clus")} == indexes("onetoken")
    assert len(indexes("onetoken")) == 5


def test_cluster_ddl_comments_call_log_so_startup_alters_nothing(
    client: Client, clus: str, caplog: pytest.LogCaptureFixture
) -> None:
    def comments(table: str) -> dict[str, str]:
        return {str(r[0]): str(r[4]) for r in client.query(f"DESCRIBE TABLE {table}").result_rows}

    assert comments(f"{clus}.call_log") == comments(f"{clus}.call_log_local") == CALL_LOG_DOCS
    assert ch.ensure_call_log_comments(client, clus) == 0
    # A reworded comment is set ON CLUSTER, which chDB refuses as a server without the
    # right would: the service logs it and carries on.
    client.command(f"ALTER TABLE {clus}.call_log_local COMMENT COLUMN cost 'old words'")
    assert ch.ensure_call_log_comments(client, clus) == 0
    assert "analytics.comment_refused" in caplog.text
    client.command(
        f"ALTER TABLE {clus}.call_log_local COMMENT COLUMN cost "
        f"{ch.sql_string(CALL_LOG_DOCS['cost'])}"
    )


def test_startup_ttl_check_reads_and_alters_the_local_tables(client: Client, clus: str) -> None:
    """The control plane's TTL check (ensure_ttls) on a cluster: a Distributed table has no
    TTL, so it reads the local tables' and changes theirs, ON CLUSTER."""
    assert ch.current_ttl_days(client, f"{clus}.call_log") == 180
    assert ch.current_ttl(client, f"{clus}.security_log") == "ts + toIntervalDay(365)"
    assert ch.set_ttl_days(client, f"{clus}.call_log", 180) is False
    sent: list[str] = []
    command = client.command

    def recording(statement: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(statement)
        return command(statement, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client, "command", recording)
        # chDB runs no DDL queue (that is Keeper's), so it refuses ON CLUSTER.
        with pytest.raises(Exception, match="Replicated DDL queries are disabled"):
            ch.set_ttl_days(client, f"{clus}.call_log", 90)
    assert sent == [f"ALTER TABLE {clus}.call_log_local ON CLUSTER {CLUSTER} "
                    "MODIFY TTL ts + INTERVAL 90 DAY"]
    # A single-node table is still its own TTL target (the fixture set 365 and 180 days).
    assert ch.ensure_security_log_ttl(client, 365, 180) is False
    assert ch.ensure_security_log_ttl(client, 365, 90) is True
    assert ch.ensure_security_log_ttl(client, 365, 90) is False
    assert "toIntervalDay(if(startsWith(kind, 'auth.'), 90, 365))" in ch.current_ttl(
        client, "onetoken.security_log"
    )


def _single_node_creates() -> dict[str, str]:
    return {
        m[1]: s
        for mig in ch.load_migrations()
        for s in mig.statements()
        if (m := re.match(r"CREATE TABLE IF NOT EXISTS onetoken\.(\w+)", s))
    }


def test_local_tables_carry_columns_keys_partitioning_ttl_and_settings(client: Client) -> None:
    """Parsed and normalised by chDB, a local table is the single-node table with only the
    name, ON CLUSTER and the engine's Replicated arguments changed."""
    generated = {
        m[1]: s
        for s in generated_statements()
        if (m := re.match(r"CREATE TABLE IF NOT EXISTS onetoken\.(\w+)_local ", s))
    }
    single = _single_node_creates()
    assert generated.keys() == single.keys() == cluster.SHARD_KEYS.keys()
    for table, statement in single.items():
        want = formatted(client, statement)
        got = formatted(client, generated[table])
        engine = re.search(r"ENGINE = (\w+)(\(([^()]*)\))?", want)
        assert engine is not None
        replicated = (
            f"ENGINE = Replicated{engine[1]}('/clickhouse/tables/{{shard}}/onetoken/{table}', "
            f"'{{replica}}'{', ' + engine[3] if engine[3] else ''})"
        )
        assert got == (
            want.replace(f"onetoken.{table} ", f"onetoken.{table}_local ON CLUSTER {CLUSTER} ", 1)
            .replace(engine[0], replicated, 1)
            .replace("non_replicated_deduplication_window", "replicated_deduplication_window")
        )
        if table in ("call_log", "security_log", "call_stats_1m"):
            assert re.search(r" TTL (ts|minute) \+ toIntervalDay\(", got)
            assert "replicated_deduplication_window = 1000" in got


def test_later_migrations_reach_local_and_distributed_tables() -> None:
    generated = generated_statements()
    column = [s for s in generated if "ADD COLUMN IF NOT EXISTS guard_flags" in s]
    assert [s.split(" ON CLUSTER")[0] for s in column] == [
        "ALTER TABLE onetoken.call_log_local",
        "ALTER TABLE onetoken.call_log",
    ]
    # Indexes and settings are storage: only the Replicated tables have them.
    storage = [s for s in generated if " ADD INDEX " in s or " MODIFY SETTING " in s]
    assert storage and all("_local ON CLUSTER prod " in s for s in storage)
    # Each migration is recorded with the single-node checksum, so a control plane started
    # on the cluster does not run the single-node statements over it.
    recorded = [s for s in generated if s.startswith("INSERT INTO onetoken.schema_migrations")]
    assert recorded == [
        f"INSERT INTO onetoken.schema_migrations (version, name, checksum) VALUES "  # noqa: S608
        f"({m.version}, '{m.name}', '{m.checksum}')"
        for m in ch.load_migrations()
    ]


def test_unknown_statements_and_names_are_refused() -> None:
    with pytest.raises(cluster.ClusterDdlError, match="no cluster form"):
        cluster.cluster_statements("DROP TABLE onetoken.call_log", CLUSTER)
    with pytest.raises(cluster.ClusterDdlError, match="no shard key"):
        cluster.cluster_statements(
            "CREATE TABLE IF NOT EXISTS onetoken.other (a UInt8) ENGINE = MergeTree ORDER BY a",
            CLUSTER,
        )
    with pytest.raises(cluster.ClusterDdlError, match="plain identifier"):
        cluster.cluster_statements("CREATE DATABASE IF NOT EXISTS onetoken", "prod; DROP")


def test_cli_prints_the_cluster_ddl_and_says_it_was_not_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["analytics-ddl", "--cluster", CLUSTER, "--database", "pool_a"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("-- Validated, not run:")
    statements = ch.Migration(0, "out.sql", printed).statements()
    assert statements == [
        s for text in cluster.cluster_ddl(CLUSTER, "pool_a")
        for s in ch.Migration(0, "m.sql", text).statements()
    ]
    assert "onetoken." not in printed
    assert (
        "ENGINE = Distributed(prod, pool_a, call_log_local, cityHash64(request_id))" in printed
    )
    with pytest.raises(SystemExit):
        cli.main(["analytics-ddl", "--help"])
    assert "validated, not run" in capsys.readouterr().out.replace("\n", " ")
    assert cli.main(["analytics-ddl", "--cluster", "bad-name"]) != 0


def test_single_node_ddl_for_another_database(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analytics-ddl", "--database", "pool_a"]) == 0
    printed = capsys.readouterr().out
    assert "onetoken." not in printed
    assert "CREATE TABLE IF NOT EXISTS pool_a.call_log\n" in printed


# ---------------------------------------------------------------------------------------
# The analytics queries over two stand-in shards


def shard_key(table: str) -> str:
    """The shard key expression as generated in the Distributed table of `table`."""
    for statement in generated_statements():
        m = re.match(
            rf"CREATE TABLE IF NOT EXISTS onetoken\.{table} ON CLUSTER \w+ AS .*"
            rf"ENGINE = Distributed\({CLUSTER}, onetoken, {table}_local, (.*)\)$",
            statement,
            re.DOTALL,
        )
        if m:
            return m[1]
    raise AssertionError(f"no Distributed table for {table}")


def call_rows() -> list[list[Any]]:
    rows = []
    for i in range(180):
        row = {
            "ts": START + timedelta(hours=3 * i, microseconds=i),
            "request_id": f"req_{i:04d}",
            "org_id": ORGS[i % 3],
            "account_id": f"acct_{i % 5}",
            "key_id": f"key_{i % 4}",
            "path": "/v1/chat/completions",
            "model_requested": ("gpt-4o", "gpt-4o-mini", "claude")[i % 3 - (i % 2)],
            "model_served": "served",
            "provider": "mock",
            "prompt_tokens": 10 + i,
            "completion_tokens": 3 * i,
            "cached_tokens": i % 7,
            "usage_source": "upstream",
            "cost": 0 if i % 11 == 0 else 1_000_003 * (i + 1),
            "status": 429 if i % 13 == 0 else 200,
            "error_code": "",
            "latency_us": 1000 + 37 * i,
            "ttfb_us": 500 + i,
            "streamed": i % 2,
            "source_ip": f"10.0.0.{i % 9}",
            "user_agent": NEEDLE if i % 17 == 0 else "openai-python",
            "rate_limit": "",
            "attempts": 1,
            "guard_flags": "",
            "application_id": "",
            "images": 0,
            "audio_ms": 0,
            "characters": 0,
            "search_units": 0,
        }
        rows.append([row[c] for c in CALL_LOG_COLUMNS])
    return rows


def security_rows() -> list[list[Any]]:
    kinds = ("auth.login", "key.created", "risk.spike", "auth.failed")
    rows = []
    for i in range(90):
        row = {
            "ts": START + timedelta(hours=6 * i, microseconds=i),
            "event_id": f"evt_{i:04d}",
            "kind": kinds[i % 4],
            "severity": ("info", "low", "high", "critical")[i % 4 - (i % 3 == 0)],
            "org_id": ORGS[i % 3],
            "actor_id": f"acct_{i % 5}",
            "subject_id": f"acct_{(i + 1) % 5}",
            "source_ip": f"10.0.1.{i % 9}",
            "user_agent": NEEDLE if i % 19 == 0 else "browser",
            "detail": f'{{"n": {i}}}',
        }
        rows.append([row[c] for c in SECURITY_LOG_COLUMNS])
    return rows


# Every tenth record is written twice, by a second insert (a batch re-sent after a crash):
# two physical rows in one part each, that only FINAL (or a merge) reads as one.
def batches(rows: list[list[Any]]) -> list[list[list[Any]]]:
    half = len(rows) // 2
    return [rows[:half], rows[half:], rows[::10]]


TABLES = {
    "call_log": (CALL_LOG_COLUMNS, call_rows, "request_id"),
    "security_log": (SECURITY_LOG_COLUMNS, security_rows, "event_id"),
}


@pytest.fixture(scope="module")
def shards(client: Client) -> dict[str, dict[str, int]]:
    """Single-node tables (onetoken.*) and two shards (shard_N.*) of the same rows; for
    each table, {id: shard}, the shard the generated key picks (key % 2, as a Distributed
    table of two shards of weight 1 does)."""
    for db in SHARDS:
        for migration in ch.load_migrations():
            for statement in migration.statements():
                client.command(cluster.rename_database(statement, db))
    client.command("CREATE DATABASE IF NOT EXISTS sharded")
    placement: dict[str, dict[str, int]] = {}
    for table, (columns, make, id_column) in TABLES.items():
        for batch in batches(make()):
            client.insert(f"onetoken.{table}", batch, column_names=list(columns))
        # The generated expression, evaluated by chDB over the single-node rows.
        pairs = client.query(
            f"SELECT DISTINCT {id_column}, ({shard_key(table)}) % {len(SHARDS)} "  # noqa: S608
            f"FROM onetoken.{table}"
        ).result_rows
        placement[table] = {str(rid): int(shard) for rid, shard in pairs}
        # One shard per id, whichever copy of the record the key is computed on.
        assert len(placement[table]) == len(pairs)
        at = list(columns).index(id_column)
        for batch in batches(make()):
            for n, db in enumerate(SHARDS):
                part = [row for row in batch if placement[table][row[at]] == n]
                if part:
                    client.insert(f"{db}.{table}", part, column_names=list(columns))
        client.command(
            f"CREATE TABLE sharded.{table} AS {SHARDS[0]}.{table} "
            f"ENGINE = Merge(REGEXP('^shard_[0-9]+$'), '^{table}$')"
        )
    return placement


@contextlib.contextmanager
def serving_sharded(client: Client) -> Iterator[None]:
    """The Merge tables under the names the analytics queries read, then back."""
    for table in TABLES:
        client.command(f"EXCHANGE TABLES onetoken.{table} AND sharded.{table}")
    try:
        yield
    finally:
        for table in TABLES:
            client.command(f"EXCHANGE TABLES onetoken.{table} AND sharded.{table}")


def _walk(page: Callable[[str | None], Any]) -> list[Any]:
    out, cursor = [], None
    while True:
        result = page(cursor)
        out.append(result.rows)
        cursor = result.next_cursor
        if cursor is None:
            return out


class _Borrowed:
    """The module's client lent to `onetoken calls export`, which closes its reader."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def close(self) -> None:
        pass


def cli_calls_export(client: Client, capsys: pytest.CaptureFixture[str]) -> list[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_call_log_reader", lambda _settings: _Borrowed(client))
        capsys.readouterr()
        assert cli.main(["calls", "export"]) == 0
    return capsys.readouterr().out.splitlines()


def every_analytics_query(client: Client, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Each ClickHouse read the code has, over whatever onetoken.* is now."""
    lo, hi = START + timedelta(days=1), START + timedelta(days=40)
    org = "org_b"
    out: dict[str, Any] = {
        "count_calls": queries.count_calls(client),
        "count_calls_window": queries.count_calls(client, org_id=org, start=lo, end=hi),
        "distinct_requests": queries.count_distinct_requests(client),
        "duplicates": queries.duplicate_request_ids(client),
        "cost_by_org": queries.cost_by_org(client, lo, hi),
        # billing.reconcile compares this with the ledger
        "charged_by_org_day": queries.charged_by_org_day(client, START, hi),
        "cost_for_org": queries.cost_for_org(client, org, lo, hi),
        "org_calls": _walk(lambda c: queries.org_calls(client, org, limit=7, cursor=c)),
        "org_calls_window": _walk(
            lambda c: queries.org_calls(client, org, limit=5, cursor=c, start=lo, end=hi)
        ),
        "export": _walk(lambda c: queries.export_page(client, after=c, limit=13)),
        "export_org": _walk(lambda c: queries.export_page(client, org_id=org, after=c, limit=9)),
    }
    for group in statements.GROUPS:
        out[f"statement_{group}"] = statements.usage_rows(client, org, START, hi, group)
        out[f"call_stats_{group}"] = statements.call_stats(client, org, START, hi, group)
    for account in ("acct_1", "acct_3"):
        out[f"rights_calls_{account}"] = export.call_statistics(client, org, account)
        out[f"rights_security_{account}"] = export.security_events(client, org, account)
    operator = SimpleNamespace(org_id="org_a", is_operator=True)
    for name, kwargs in {
        "all": {},
        "org": {"org_id": org, "start": lo, "end": hi},
        "filtered": {"kind": ["auth.login", "risk.spike"], "min_severity": "low"},
        "actor": {"actor_id": "acct_2", "subject_id": "acct_3"},
    }.items():
        pages, cursor = [], None
        while True:
            page = security_route.list_events(
                operator, lambda f: f(client), limit=6, cursor=cursor,  # type: ignore[arg-type]
                **{"kind": None, "min_severity": None, "actor_id": None, "subject_id": None,
                   "org_id": None, "start": None, "end": None, **kwargs},
            )
            pages.append(page.model_dump())
            cursor = page.next_cursor
            if cursor is None:
                break
        out[f"security_events_{name}"] = pages
    out["cli_calls_export"] = cli_calls_export(client, capsys)
    # The privacy audit's scan (a server scan reads the onetoken database).
    report = AuditReport()
    scan_clickhouse(client, NEEDLE, report, ("onetoken",))
    out["audit_scan"] = (report.findings, report.problems, report.columns_scanned)
    return out


def test_every_analytics_query_answers_the_same_over_two_shards(
    client: Client, shards: dict[str, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Both shards hold rows, and every retried record's copies sit on one shard.
    for table, placement in shards.items():
        assert set(placement.values()) == {0, 1}, table
    per_shard = [
        int(client.command(f"SELECT count() FROM {db}.call_log")) for db in SHARDS  # noqa: S608
    ]
    assert sum(per_shard) == 180 + 18 and min(per_shard) > 50
    single = every_analytics_query(client, capsys)
    with serving_sharded(client):
        assert str(client.command(
            "SELECT engine FROM system.tables WHERE database = 'onetoken' AND name = 'call_log'"
        )) == "Merge"
        sharded = every_analytics_query(client, capsys)
    assert single["count_calls"] == single["distinct_requests"] == 180
    assert single["duplicates"] == []
    assert single["audit_scan"][0], "the needle rows were found"
    assert len(single["cli_calls_export"]) == 180
    assert all(single[k] for k in single if k != "duplicates"), "every query read rows"
    assert all(
        pages[0]["data"] for k, pages in single.items() if k.startswith("security_events_")
    )
    for name in single:
        assert sharded[name] == single[name], name


def test_duplicates_split_across_shards_would_count_twice(
    client: Client, shards: dict[str, dict[str, int]]
) -> None:
    """Why the shard key is the request id: a copy of a record on another shard than its
    first copy is not collapsed by FINAL, and the counts go wrong."""
    rows = call_rows()
    stray = next(r for r in rows if shards["call_log"][r[1]] == 0)
    client.command("CREATE DATABASE IF NOT EXISTS shard_9")
    for migration in ch.load_migrations():
        for statement in migration.statements():
            client.command(cluster.rename_database(statement, "shard_9"))
    client.insert("shard_9.call_log", [stray], column_names=list(CALL_LOG_COLUMNS))
    try:
        with serving_sharded(client):
            assert queries.count_calls(client) == 181
            assert queries.duplicate_request_ids(client) == [stray[1]]
    finally:
        client.command("DROP DATABASE shard_9 SYNC")
    with serving_sharded(client):
        assert queries.count_calls(client) == 180


def test_the_rollup_adds_up_over_two_shards(
    client: Client, shards: dict[str, dict[str, int]]
) -> None:
    """Each stand-in shard's view rolls up the rows its call_log takes; the shards' partial
    aggregates, read together, are the single node's rollup."""
    query = (
        "SELECT org_id, toStartOfDay(minute) AS day, status, sum(calls), sum(cost), "
        "sum(prompt_tokens), sum(streamed_calls), "
        "arrayMap(q -> round(q), quantilesTDigestMerge(0.5, 0.99)(latency_us_q)) "
        "FROM {table} GROUP BY org_id, day, status ORDER BY ALL"
    )
    single = client.query(query.format(table="onetoken.call_stats_1m")).result_rows
    sharded = client.query(
        query.format(table="merge(REGEXP('^shard_[0-9]+$'), '^call_stats_1m$')")
    ).result_rows
    assert len(single) > 20
    assert [r[:7] for r in sharded] == [r[:7] for r in single]
    for got, want in zip(sharded, single, strict=True):
        assert all(abs(g - w) <= 0.05 * w for g, w in zip(got[7], want[7], strict=True))
    # The fixture re-inserts every tenth record without a deduplication token: call_log
    # FINAL reads it once, the rollup counts it twice (docs/retention.md says so).
    assert sum(r[3] for r in single) == 180 + 18


def test_stand_in_shards_are_the_single_node_schema_renamed() -> None:
    renamed = [
        cluster.rename_database(s, "shard_0") for m in ch.load_migrations() for s in m.statements()
    ]
    assert renamed[0] == "CREATE DATABASE IF NOT EXISTS shard_0"
    assert not any("onetoken" in s for s in renamed)


# ---------------------------------------------------------------------------------------
# Writes through the Distributed tables, and the audit over them


@contextlib.contextmanager
def serving_cluster(client: Client, tables: tuple[str, ...] = tuple(TABLES)) -> Iterator[None]:
    """The Distributed tables of the executed cluster DDL under the names the code uses
    (onetoken.<t> is then Distributed(prod, clus, <t>_local, key)), then back."""
    for table in tables:
        client.command(f"EXCHANGE TABLES onetoken.{table} AND clus.{table}")
    try:
        yield
    finally:
        for table in tables:
            client.command(f"EXCHANGE TABLES onetoken.{table} AND clus.{table}")


def test_inserts_through_distributed_wait_for_the_shards(
    client: Client, clus: str, shards: dict[str, dict[str, int]]
) -> None:
    """No shard of the declared cluster is reachable. An insert queued on this server's
    disk for sending later would report success and the journal cursor would move on, so
    the sink must report failure (the batch stays in the journal) and the security log's
    insert must raise (the rows stay spooled). On a single node the same inserts work and
    a retried batch is still dropped by its deduplication token."""
    columns = ", ".join(CALL_LOG_COLUMNS)
    block = client.raw_query(
        f"SELECT {columns} FROM onetoken.call_log ORDER BY request_id LIMIT 3",  # noqa: S608
        fmt="Native",
    )
    events = security_rows()[:2]
    sink = CallLogSink(Settings(), client=client)
    with serving_cluster(client):
        assert str(client.command(
            "SELECT engine FROM system.tables WHERE database = 'onetoken' AND name = 'call_log'"
        )) == "Distributed"
        assert sink.insert(block, 3, "cluster-batch") is False
        assert sink.last_error == "DatabaseError:210"  # NETWORK_ERROR: no shard reached
        with pytest.raises(Exception, match="NETWORK_ERROR"):
            insert_security_rows(lambda f: f(client), events)
    assert int(client.command("SELECT count() FROM clus.call_log_local")) == 0

    def physical() -> int:
        return int(client.command("SELECT count() FROM onetoken.call_log"))

    before = physical()
    assert sink.insert(block, 3, "single-batch") is True
    assert sink.insert(block, 3, "single-batch") is True
    assert physical() == before + 3
    insert_security_rows(lambda f: f(client), events)


def test_audit_reports_a_cluster_finding_once(client: Client, clus: str) -> None:
    """A needle in a shard's local table is read both through the Distributed table and
    from the local table itself; the scan reports it once."""
    planted = "needle-cluster-5d1e"
    row = dict(zip(CALL_LOG_COLUMNS, call_rows()[0], strict=True))
    row.update(request_id="req_planted", user_agent=planted)
    client.insert(f"{clus}.call_log_local", [list(row.values())],
                  column_names=list(CALL_LOG_COLUMNS))

    class OneShardCluster:
        """The module's client, with a Distributed read answered by the local tables it
        reads (a cluster of one shard, this server): chDB cannot reach a shard itself."""

        def __init__(self, inner: Client) -> None:
            self._inner = inner

        def query(self, sql: str, *args: Any, **kwargs: Any) -> Any:
            sql = re.sub(rf"`{clus}`\.`(\w+)`",
                         lambda m: m[0] if m[1].endswith("_local") else f"`{clus}`.`{m[1]}_local`",
                         sql)
            return self._inner.query(sql, *args, **kwargs)

    report = AuditReport()
    scan_clickhouse(OneShardCluster(client), planted, report, (clus,))
    assert report.findings == [f"ClickHouse {clus}.call_log.user_agent: 1 row(s)"]
    assert report.problems == []
    # As chDB is: the Distributed table cannot be read, so the local one still is, and
    # the failure is reported.
    report = AuditReport()
    scan_clickhouse(client, planted, report, (clus,))
    assert report.findings == [f"ClickHouse {clus}.call_log_local.user_agent: 1 row(s)"]
    distributed = [
        str(r[0]) for r in client.query(
            "SELECT name FROM system.tables WHERE database = {db:String} "
            "AND engine = 'Distributed' ORDER BY name", parameters={"db": clus},
        ).result_rows
    ]
    assert {"call_log", "call_stats_1m", "dim_keys", "security_log"} <= set(distributed)
    assert [p.split(":")[0] for p in report.problems] == [
        f"ClickHouse table {clus}.{t}" for t in distributed
    ]
    # A single node is its own local table.
    client.insert("onetoken.call_log", [list(row.values())], column_names=list(CALL_LOG_COLUMNS))
    report = AuditReport()
    scan_clickhouse(client, planted, report, ("onetoken",))
    assert report.findings == ["ClickHouse onetoken.call_log.user_agent: 1 row(s)"]


# ---------------------------------------------------------------------------------------
# Account erasure on the cluster

SERVERS = ("e_0", "e_1")  # one database per server: two shards of one replica each


class EveryServer:
    """The module's client standing in for the servers of cluster `prod`, one database
    each (e_0 is the server the control plane is connected to). What chDB cannot do is
    done here the way the cluster would: a statement ON CLUSTER runs on every server; an
    insert into clusterAllReplicas goes to the server its copy number routes it to (slot
    `copy % 2`, two servers of weight 1); clusterAllReplicas(system.parts) reads every
    server's parts. The tables of the cluster DDL (clus.*) and the work tables
    (onetoken.erasure_*) are the server's own. Everything sent is recorded."""

    def __init__(self, inner: Client) -> None:
        self.inner = inner
        self.sent: list[str] = []

    @staticmethod
    def on(sql: str, server: str) -> str:
        sql = sql.replace(f" ON CLUSTER {CLUSTER}", "")
        sql = sql.replace("onetoken.erasure_", "clus.erasure_")
        return re.sub(r"\bclus\.", f"{server}.", sql)

    def command(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(sql)
        fan_out = re.match(
            rf"INSERT INTO FUNCTION clusterAllReplicas\('{CLUSTER}', onetoken, (\w+), copy\) "
            r"(SELECT .*) SETTINGS distributed_foreground_insert = 1$", sql,
        )
        if fan_out:
            table, select = fan_out.groups()
            for n, server in reversed(list(enumerate(SERVERS))):
                self.inner.command(
                    f"INSERT INTO {server}.{table} SELECT * FROM "  # noqa: S608
                    f"({self.on(select, SERVERS[0])}) WHERE n % {len(SERVERS)} = {n}"
                )
            return None
        if f" ON CLUSTER {CLUSTER}" in sql:
            for server in SERVERS:
                self.inner.command(self.on(sql, server), *args, **kwargs)
            return None
        return self.inner.command(self.on(sql, SERVERS[0]), *args, **kwargs)

    def query(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(sql)
        every = ", ".join(f"'{s}'" for s in SERVERS)
        sql = sql.replace(
            f"clusterAllReplicas('{CLUSTER}', system.parts)",
            f"(SELECT * REPLACE (if(database IN ({every}), 'clus', database) AS database) "  # noqa: S608
            "FROM system.parts)",
        )
        return self.inner.query(self.on(sql, SERVERS[0]) if "erasure_" in sql else sql,
                                *args, **kwargs)

    def insert(self, table: str, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(f"INSERT INTO {table}")
        return self.inner.insert(self.on(table, SERVERS[0]), *args, **kwargs)


def test_account_erasure_reaches_every_shard(client: Client, clus: str) -> None:
    """The erasure's mutations go to the local tables ON CLUSTER (a Distributed table
    refuses them), and what they read (the erased ids and values) is on every server,
    where each runs them on its own rows. Run twice, the second run changes nothing."""
    text = "\n".join(cluster.cluster_ddl(CLUSTER, "clus"))
    for server in SERVERS:
        for statement in ch.Migration(0, "c.sql", text).statements():
            client.command(executable_here(statement.replace("clus.", f"{server}.").replace(
                "EXISTS clus", f"EXISTS {server}")))
    email, name = "ann.erased@example.test", "Ann Erasedname"
    ids = erasure.Identifiers(
        account_id="acct_erased", org_id="org_a", key_ids=["key_erased"],
        global_needles=[email], account_needles=[name],
    )
    base = dict(zip(CALL_LOG_COLUMNS, call_rows()[0], strict=True))
    event = dict(zip(SECURITY_LOG_COLUMNS, security_rows()[0], strict=True))
    for n, server in enumerate(SERVERS):
        calls = [
            {**base, "request_id": f"r{n}a", "account_id": "acct_erased", "key_id": "key_x",
             "source_ip": "198.51.100.7", "user_agent": "Erased/1"},
            {**base, "request_id": f"r{n}b", "account_id": "acct_other", "key_id": "key_erased",
             "source_ip": "198.51.100.8", "user_agent": "Erased/2"},
            {**base, "request_id": f"r{n}c", "account_id": "acct_other", "key_id": "key_other",
             "source_ip": "203.0.113.5", "user_agent": "Bystander/1"},
        ]
        client.insert(f"{server}.call_log_local", [list(r.values()) for r in calls],
                      column_names=list(CALL_LOG_COLUMNS))
        events = [
            {**event, "event_id": f"e{n}a", "actor_id": "acct_erased",
             "source_ip": "198.51.100.7", "user_agent": "Erased/1",
             "detail": f'{{"name": "{name}", "email": "{email}"}}'},
            # Someone else's event naming the erased email: the email goes, the rest stays.
            {**event, "event_id": f"e{n}b", "actor_id": "acct_other", "subject_id": "acct_x",
             "source_ip": "203.0.113.5", "user_agent": "Bystander/1",
             "detail": f'{{"invited": "{email}", "name": "{name}"}}'},
        ]
        client.insert(f"{server}.security_log_local", [list(r.values()) for r in events],
                      column_names=list(SECURITY_LOG_COLUMNS))

    servers = EveryServer(client)

    def runner(query: Callable[[Any], Any]) -> Any:
        return query(servers)

    def state() -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for server in SERVERS:
            rows += client.query(
                f"SELECT request_id, source_ip, user_agent FROM {server}.call_log_local "  # noqa: S608
                "ORDER BY request_id").result_rows
            rows += client.query(
                f"SELECT event_id, source_ip, user_agent, detail FROM {server}.security_log_local "  # noqa: S608
                "ORDER BY event_id").result_rows
        return rows

    # A profile may have ClickHouse run a mutation's subqueries once and write their
    # results into its text (a way to keep replicas alike); erasure must not let it.
    client.command("SET mutations_execute_subqueries_on_initiator = 1")
    with serving_cluster(client), contextlib.ExitStack() as restore:
        restore.callback(client.command, "SET mutations_execute_subqueries_on_initiator = 0")
        for _ in range(2):
            with erasure.replaced_parts_deleted(runner, timeout_s=30):
                runner(lambda c: erasure.anonymize_clickhouse(c, [ids]))
            after = state()
            for n in range(len(SERVERS)):
                assert (f"r{n}a", "", "") in after and (f"r{n}b", "", "") in after
                assert (f"r{n}c", "203.0.113.5", "Bystander/1") in after
                assert (f"e{n}a", "", "", '{"name": "[erased]", "email": "[erased]"}') in after
                assert (f"e{n}b", "203.0.113.5", "Bystander/1",
                        f'{{"invited": "[erased]", "name": "{name}"}}') in after
    # As sent (ON CLUSTER, clusterAllReplicas and all), each statement parses.
    for statement in servers.sent:
        if not statement.startswith("INSERT INTO onetoken."):  # data inserts: no SQL text
            assert formatted(client, statement)
    assert any(s.startswith("SYSTEM START CLEANUP ON CLUSTER prod ") for s in servers.sent)
    mutations = [
        s for s in servers.sent if s.startswith("ALTER TABLE") and " UPDATE " in s
    ]
    assert [m.split(" UPDATE")[0] for m in mutations] == 2 * [
        f"ALTER TABLE clus.call_log_local ON CLUSTER {CLUSTER}",
        f"ALTER TABLE clus.security_log_local ON CLUSTER {CLUSTER}",
    ]
    kept = str(client.query(
        "SELECT groupArray(command) FROM system.mutations WHERE database IN ('e_0', 'e_1')"
    ).result_rows[0][0])
    for value in (email, name, ids.account_id, *ids.key_ids):
        assert value not in kept and not any(value in s for s in servers.sent)
    for server in SERVERS:
        for table in ("erasure_subjects", "erasure_needles"):
            assert int(client.command(f"SELECT count() FROM {server}.{table}")) == 0  # noqa: S608
        assert int(client.command(  # the replaced parts are gone from every server
            "SELECT count() FROM system.parts WHERE NOT active AND database = {d:String} "
            "AND table IN ('call_log_local', 'security_log_local')", parameters={"d": server},
        )) == 0
