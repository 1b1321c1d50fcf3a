"""ClickHouse client, DSN parsing, migrations and TTL (against embedded chDB)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from onetoken import cli
from onetoken.analytics import clickhouse as ch
from onetoken.analytics.columns import (
    CALL_LOG_COLUMNS,
    CALL_LOG_DOCS,
    CALL_LOG_SCHEMA,
    SECURITY_LOG_TABLE,
)
from onetoken.security.log import SECURITY_LOG_COLUMNS
from onetoken.settings import Settings


def test_parse_chdb_dsn_keeps_relative_paths_as_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    dsn = ch.parse_dsn("chdb://.onetoken/clickhouse")
    assert dsn.kind == "chdb"
    assert dsn.chdb_path == tmp_path.resolve() / ".onetoken" / "clickhouse"
    assert ch.parse_dsn("chdb:///abs/dir/").chdb_path == Path("/abs/dir")
    assert ch.parse_dsn("chdb://:memory:").chdb_path is None
    assert ch.parse_dsn("", tmp_path).chdb_path == tmp_path.resolve() / "clickhouse"


def test_parse_http_dsn_drops_database_and_hides_password() -> None:
    dsn = ch.parse_dsn("https://user:s3cret@ch.example:8443/onetoken?compress=1")
    assert dsn.kind == "http"
    assert dsn.url == "https://user:s3cret@ch.example:8443?compress=1"
    assert dsn.display == "https://ch.example:8443"
    assert "s3cret" not in dsn.display
    with pytest.raises(ch.AnalyticsError):
        ch.parse_dsn("clickhouse://host:9000")


def test_migration_files_are_ordered_and_split() -> None:
    migrations = ch.load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    first = migrations[0]
    assert first.version == 1
    statements = first.statements()
    assert statements[0] == "CREATE DATABASE IF NOT EXISTS onetoken"
    assert all("--" not in s and not s.endswith(";") for s in statements)


def test_every_migration_statement_is_idempotent() -> None:
    """Two processes may apply the migrations at once (the control process and an ingest
    process opening ClickHouse first, docs/deploy.md "Upgrades and migrations"): every
    statement must end in the same schema however often it runs."""
    idempotent = re.compile(
        r"^(CREATE (DATABASE|TABLE|MATERIALIZED VIEW) IF NOT EXISTS |ALTER TABLE \S+ ("
        r"ADD (COLUMN|INDEX) IF NOT EXISTS |MODIFY SETTING |COMMENT COLUMN ))"
    )
    statements = [s for m in ch.load_migrations() for s in m.statements()]
    assert [s for s in statements if not idempotent.match(s)] == []
    assert not idempotent.match("ALTER TABLE onetoken.call_log ADD COLUMN x UInt8")


def test_the_package_holds_the_only_clickhouse_migrations() -> None:
    """deploy/clickhouse says how to apply the package's migrations; a copy of them there
    would drift from what the service applies."""
    root = Path(__file__).resolve().parents[2]
    assert (root / "deploy" / "clickhouse" / "README.md").is_file()
    assert sorted(str(p.relative_to(root)) for p in (root / "deploy").rglob("*.sql")) == []


def test_analytics_ddl_prints_every_migration_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["analytics-ddl"]) == 0
    printed = capsys.readouterr().out
    migrations = ch.load_migrations()
    assert migrations
    assert printed == "".join(f"-- {m.name}\n{m.sql.rstrip(chr(10))}\n" for m in migrations)
    # Each file's statements survive the concatenation as they are.
    assert ch.Migration(0, "all.sql", printed).statements() == [
        s for m in migrations for s in m.statements()
    ]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("ch"), call_log_ttl_days=30)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    # One chDB engine for the module: opening costs ~250 MB and a process holds one path.
    client = ch.open_client(settings)
    yield client
    client.close()


def test_call_log_has_exactly_the_engines_columns(client: Client) -> None:
    # The engine's declaration (the Native block it encodes) against the table the
    # migrations create: names, order and types.
    rows = client.query("DESCRIBE TABLE onetoken.call_log").result_rows
    assert [(r[0], r[1]) for r in rows] == list(CALL_LOG_SCHEMA)
    assert tuple(r[0] for r in rows) == CALL_LOG_COLUMNS


def _comments(client: Client, database: str, table: str) -> dict[str, str]:
    rows = client.query(
        "SELECT name, comment FROM system.columns WHERE database = {db:String} "
        "AND table = {t:String}", parameters={"db": database, "t": table},
    ).result_rows
    return {str(name): str(comment) for name, comment in rows}


def test_call_log_comments_are_the_declarations_in_every_log_database(client: Client) -> None:
    assert set(CALL_LOG_DOCS) == set(CALL_LOG_COLUMNS)
    assert all(CALL_LOG_DOCS.values())
    assert _comments(client, "onetoken", "call_log") == CALL_LOG_DOCS
    ch.ensure_pool_database(client, "onetoken_docs", 30)
    assert _comments(client, "onetoken_docs", "call_log") == CALL_LOG_DOCS
    # Quotes and backslashes reach ClickHouse as written.
    odd = "\\'x"
    client.command(f"ALTER TABLE onetoken.call_log COMMENT COLUMN cost {ch.sql_string(odd)}")
    assert _comments(client, "onetoken", "call_log")["cost"] == odd
    # A reworded declaration reaches a database that already has every migration.
    assert ch.ensure_call_log_comments(client) == 1
    assert ch.ensure_call_log_comments(client) == 0
    assert _comments(client, "onetoken", "call_log") == CALL_LOG_DOCS
    client.command("DROP DATABASE onetoken_docs SYNC")


def test_every_column_of_the_other_tables_has_a_comment(client: Client) -> None:
    for table in ("security_log", "schema_migrations"):
        comments = _comments(client, "onetoken", table)
        assert comments
        assert [c for c, text in comments.items() if not text] == [], table


def test_security_log_table_has_exactly_the_writers_columns(client: Client) -> None:
    """SECURITY_LOG_COLUMNS is the one declaration; the migrations must create just that."""
    rows = client.query(f"DESCRIBE TABLE {SECURITY_LOG_TABLE}").result_rows
    assert tuple(r[0] for r in rows) == SECURITY_LOG_COLUMNS


def test_call_log_engine_is_replacing_and_partitioned(client: Client) -> None:
    create = str(client.command("SHOW CREATE TABLE onetoken.call_log"))
    assert "ENGINE = ReplacingMergeTree" in create
    assert "PARTITION BY toYYYYMM(ts)" in create
    assert "ORDER BY (org_id, ts, request_id)" in create
    assert "non_replicated_deduplication_window" in create


def test_configured_ttl_is_applied_at_open(client: Client) -> None:
    create = str(client.command("SHOW CREATE TABLE onetoken.call_log"))
    assert "TTL ts + toIntervalDay(30)" in create


def test_ttl_follows_the_setting(client: Client) -> None:
    assert ch.set_ttl_days(client, "onetoken.call_log", 45) is True
    assert "TTL ts + toIntervalDay(45)" in str(
        client.command("SHOW CREATE TABLE onetoken.call_log")
    )
    assert ch.set_ttl_days(client, "onetoken.call_log", 45) is False
    with pytest.raises(ch.AnalyticsError):
        ch.set_ttl_days(client, "onetoken.call_log", 0)
    assert ch.set_ttl_days(client, "onetoken.call_log", 30) is True


def test_migrations_are_idempotent(client: Client, settings: Settings) -> None:
    versions = [m.version for m in ch.load_migrations()]
    assert ch.apply_migrations(client) == []
    # Re-running every statement of every migration (as after a crash mid-migration)
    # must not fail either.
    for migration in ch.load_migrations():
        for statement in migration.statements():
            client.command(statement)
    # A second client on the same path in this process (as the CLI and sink would) opens
    # and finds nothing to do.
    second = ch.open_client(settings)
    try:
        assert ch.apply_migrations(second) == []
    finally:
        second.close()
    recorded = client.query(
        "SELECT version, count() FROM onetoken.schema_migrations FINAL "
        "GROUP BY version ORDER BY version"
    ).result_rows
    assert recorded == [(v, 1) for v in versions]
    assert ch.applied_migrations(client) == {m.version: m.checksum for m in ch.load_migrations()}


def test_second_path_in_one_process_is_a_clear_error(client: Client, tmp_path: Path) -> None:
    other = Settings(data_dir=tmp_path)
    with pytest.raises(ch.ChdbPathConflictError, match="one data path per process"):
        ch.open_client(other)
