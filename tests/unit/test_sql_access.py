"""Read-only SQL (onetoken.analytics.sqlaccess, docs/sql.md) in real chDB: each org reads
its own rows only, however the query reaches a table; what could escape the row filters
or write anything is refused by ClickHouse; the limits hold; ingestion's client is left
as it was."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from onetoken.analytics.clickhouse import apply_migrations, open_client
from onetoken.analytics.sqlaccess import (
    SqlLimits,
    SqlQueryError,
    query_fingerprint,
    run_sql,
)
from onetoken.settings import Settings

POOL = "onetoken_p1"
LIMITS = SqlLimits(
    max_execution_time_s=20,
    max_memory_bytes=1 << 30,
    max_result_rows=1000,
    max_result_bytes=16 << 20,
    max_rows_to_read=10_000_000,
)


def _insert_calls(client: Client, database: str, org: str, n: int, *, tag: str) -> None:
    client.command(
        f"INSERT INTO {database}.call_log (ts, request_id, org_id, model_served, cost) "  # noqa: S608
        f"SELECT now64(6) - number, concat('{tag}-', toString(number)), '{org}', 'm1', 7 "
        f"FROM numbers({n})"
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("sql-access"))
    client = open_client(settings)
    apply_migrations(client, POOL)
    client.command(
        "CREATE VIEW IF NOT EXISTS onetoken.all_calls AS SELECT * FROM onetoken.call_log"
    )
    _insert_calls(client, "onetoken", "org_a", 3, tag="a")
    _insert_calls(client, "onetoken", "org_b", 5, tag="b")
    _insert_calls(client, POOL, "org_p", 4, tag="p")
    _insert_calls(client, POOL, "org_b", 2, tag="bp")
    client.command(
        "INSERT INTO onetoken.dim_providers (provider_id, org_id, name) VALUES "
        "('p-shared', '', 'Platform'), ('p-a', 'org_a', 'A own'), ('p-b', 'org_b', 'B own')"
    )
    client.command(
        "INSERT INTO onetoken.security_log (ts, event_id, kind, severity, org_id) VALUES "
        "(now64(6), 'e1', 'auth.login', 'info', 'org_a'), "
        "(now64(6), 'e2', 'auth.login', 'info', 'org_b')"
    )
    yield client
    client.close()


def sql(client: Client, query: str, org: str | None = "org_a",
        limits: SqlLimits = LIMITS) -> list[list[object]]:
    return run_sql(client, query, org_id=org, limits=limits).rows


def refused(client: Client, query: str, code: str = "sql_refused",
            org: str | None = "org_a", limits: SqlLimits = LIMITS) -> str:
    with pytest.raises(SqlQueryError) as caught:
        run_sql(client, query, org_id=org, limits=limits)
    assert caught.value.code == code, caught.value.message
    return caught.value.message


# -- the org filter -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "SELECT DISTINCT org_id FROM onetoken.call_log",
        "SELECT DISTINCT org_id FROM onetoken.call_log FINAL",
        "SELECT DISTINCT org_id FROM (SELECT org_id FROM onetoken.call_log)",
        "SELECT DISTINCT c.org_id FROM onetoken.call_log AS c "
        "JOIN onetoken.call_log AS d ON c.request_id = d.request_id",
        "SELECT org_id FROM onetoken.call_log UNION DISTINCT SELECT org_id FROM onetoken.call_log",
        "WITH x AS (SELECT org_id FROM onetoken.call_log FINAL) SELECT DISTINCT org_id FROM x",
        "SELECT DISTINCT org_id FROM onetoken.call_log WHERE org_id = 'org_b' OR 1",
        "SELECT DISTINCT org_id FROM onetoken.call_stats_1m",
        "SELECT DISTINCT org_id FROM onetoken.security_log",
    ],
)
def test_an_org_reads_only_its_own_rows_however_it_reaches_the_table(
    client: Client, query: str
) -> None:
    assert sql(client, query) == [["org_a"]]


def test_scalar_and_in_subqueries_see_only_the_org(client: Client) -> None:
    assert sql(client, "SELECT (SELECT count() FROM onetoken.call_log)") == [[3]]
    assert sql(
        client, "SELECT 'org_b' IN (SELECT org_id FROM onetoken.call_log)"
    ) == [[0]]


def test_pool_database_rows_are_read_through_its_own_tables(client: Client) -> None:
    """An org whose calls live in a pool's database reads them there, through the same
    allow-listed names; another org's rows in that database stay out of sight."""
    assert sql(client, "SELECT count() FROM onetoken_p1.call_log FINAL", org="org_p") == [[4]]
    # The rollup is filled from call_log by its materialized view (migration 008).
    assert sql(client, "SELECT sum(calls) FROM onetoken_p1.call_stats_1m", org="org_p") == [[4]]
    assert sql(client, "SELECT count() FROM onetoken_p1.call_log", org="org_b") == [[2]]
    assert sql(
        client,
        "SELECT count() FROM (SELECT request_id FROM onetoken.call_log UNION ALL "
        "SELECT request_id FROM onetoken_p1.call_log)",
        org="org_b",
    ) == [[7]]


def test_platform_wide_names_are_shared_and_other_orgs_names_are_not(client: Client) -> None:
    rows = sql(client, "SELECT provider_id FROM onetoken.dim_providers ORDER BY provider_id")
    assert rows == [["p-a"], ["p-shared"]]


def test_all_orgs_for_operators_who_ask(client: Client) -> None:
    rows = sql(client, "SELECT DISTINCT org_id FROM onetoken.call_log ORDER BY org_id", org=None)
    assert rows == [["org_a"], ["org_b"]]


def test_an_unknown_org_reads_nothing(client: Client) -> None:
    assert sql(client, "SELECT count() FROM onetoken.call_log", org="x' OR '1") == [[0]]


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM system.tables",
        "SELECT * FROM system.query_log",
        "SELECT name FROM system.databases",
        "SELECT (SELECT count() FROM system.tables)",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT file('/etc/hostname')",
        "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
        "SELECT * FROM remote('127.0.0.1', 'onetoken', 'call_log')",
        "SELECT * FROM s3('http://127.0.0.1:9/b/x.csv')",
        "SELECT count() FROM merge('onetoken', '^call_log$')",
        "SELECT (SELECT count() FROM merge(REGEXP('^onetoken'), '^call_log$'))",
        "SELECT count() FROM numbers(10)",
        "SELECT * FROM onetoken.all_calls",
        "SELECT * FROM onetoken.schema_migrations",
        "SELECT dictGet('onetoken.names', 'name', 1)",
        "INSERT INTO onetoken.call_log (org_id) VALUES ('org_a')",
        "ALTER TABLE onetoken.call_log DELETE WHERE 1",
        "DROP TABLE onetoken.call_log",
        "SET readonly = 0",
        "SELECT 1 INTO OUTFILE '/tmp/onetoken-sql-outfile'",
        "SELECT 1 FORMAT JSON",
        "SELECT count() FROM onetoken.call_log SETTINGS readonly = 0",
        "SELECT count() FROM onetoken.call_log SETTINGS additional_table_filters = {}",
        "SELECT count() FROM onetoken.call_log SETTINGS max_execution_time = 0",
        "SELECT 1; SELECT * FROM system.tables",
        "SELECT 1; DROP TABLE onetoken.call_log",
    ],
)
def test_what_escapes_the_filters_or_writes_is_refused(client: Client, query: str) -> None:
    refused(client, query)
    # Refused for operators reading every org too: the CLI's path is no wider.
    refused(client, query, org=None)


def test_refusals_never_ran_the_statement(client: Client) -> None:
    assert not os.path.exists("/tmp/onetoken-sql-outfile")
    assert client.command("EXISTS TABLE onetoken.call_log") == 1
    count = client.query("SELECT count() FROM onetoken.call_log FINAL").result_rows[0][0]
    assert count == 8


def test_a_syntax_error_is_an_sql_error_with_clickhouse_words(client: Client) -> None:
    message = refused(client, "SELEC 1", code="sql_error")
    assert "Syntax error" in message
    refused(client, "SELECT nope FROM onetoken.call_log", code="sql_error")


# -- limits ---------------------------------------------------------------------------------


def _limits(**changes: int) -> SqlLimits:
    return dataclasses.replace(LIMITS, **changes)


def test_rows_beyond_the_result_limit_are_cut_and_said_so(client: Client) -> None:
    result = run_sql(
        client, "SELECT request_id FROM onetoken.call_log ORDER BY request_id",
        org_id=None, limits=_limits(max_result_rows=3),
    )
    assert result.truncated and result.row_count == 3
    assert [r[0] for r in result.rows] == ["a-0", "a-1", "a-2"]
    whole = run_sql(client, "SELECT request_id FROM onetoken.call_log", org_id="org_a",
                    limits=_limits(max_result_rows=3))
    assert not whole.truncated and whole.row_count == 3


def test_a_result_beyond_the_byte_limit_fails(client: Client) -> None:
    refused(client, "SELECT repeat('x', 100000) FROM onetoken.call_log",
            code="sql_limit_exceeded", limits=_limits(max_result_bytes=10_000))


def test_reading_beyond_max_rows_to_read_fails(client: Client) -> None:
    refused(client, "SELECT count() FROM onetoken.call_log WHERE cost > 0",
            code="sql_limit_exceeded", org=None, limits=_limits(max_rows_to_read=2))


def test_memory_beyond_the_limit_fails(client: Client) -> None:
    refused(
        client,
        "SELECT groupArray(repeat(request_id, 100000)) FROM onetoken.call_log "
        "ARRAY JOIN range(200) AS i",
        code="sql_limit_exceeded", org=None, limits=_limits(max_memory_bytes=8 << 20),
    )


def test_time_beyond_the_limit_fails(client: Client) -> None:
    message = refused(
        client,
        "SELECT count() FROM onetoken.call_log ARRAY JOIN range(5) AS i "
        "WHERE sleepEachRow(0.3) = 0",
        code="sql_limit_exceeded", org=None, limits=_limits(max_execution_time_s=1),
    )
    assert "limit" in message.lower() or "timeout" in message.lower()


# -- the shared client ----------------------------------------------------------------------


def test_ingestion_writes_right_after_an_analyst_query(client: Client) -> None:
    """The analyst's readonly session is its own: the shared client still inserts."""
    sql(client, "SELECT count() FROM onetoken.call_log")
    refused(client, "SELECT 1 SETTINGS readonly = 0")
    _insert_calls(client, "onetoken", "org_c", 1, tag="c")
    assert client.query("SELECT getSetting('readonly')").result_rows == [(0,)]
    assert client.query(
        "SELECT count() FROM onetoken.call_log WHERE org_id = 'org_c'"
    ).result_rows == [(1,)]


def test_result_shape_and_fingerprint() -> None:
    fingerprint = query_fingerprint("SELECT 'secret'")
    assert fingerprint["query_length"] == 15
    assert "secret" not in str(fingerprint)


def test_columns_and_types(client: Client) -> None:
    result = run_sql(
        client, "SELECT org_id, count() AS calls, max(ts) AS last FROM onetoken.call_log "
        "GROUP BY org_id", org_id="org_a", limits=LIMITS,
    )
    assert result.columns == ["org_id", "calls", "last"]
    assert result.types == ["String", "UInt64", "DateTime64(6, 'UTC')"]
    assert result.rows[0][:2] == ["org_a", 3]
    assert isinstance(result.rows[0][2], str)



def test_the_cluster_users_and_row_policies_in_the_docs_parse(client: Client) -> None:
    """docs/sql.md's statements for a real cluster: chDB has no access control to run
    them, so its parser validates each one."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "sql.md").read_text()
    block = doc.split("## On a ClickHouse cluster", 1)[1].split("```sql", 1)[1].split("```")[0]
    body = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
    statements = [s.strip() for s in body.split(";") if s.strip()]
    assert len(statements) >= 10
    assert any(s.startswith("CREATE ROW POLICY") for s in statements)
    for statement in statements:
        client.query("SELECT formatQuery({q:String})", parameters={"q": statement})
