"""Log isolation of gateway pools (docs/pools.md): a pool's call metadata go to its own
ClickHouse database, and everything that reads or rewrites call metadata (reconcile, the
canary scan, retention TTLs, erasure) covers every such database. Real chDB, real journal
files, the real ingestor."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from onetoken import audit
from onetoken.analytics import queries
from onetoken.analytics.clickhouse import (
    MigrationError,
    apply_migrations,
    call_log_tables,
    current_ttl_days,
    ensure_ttls,
    log_databases,
    open_client,
)
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.analytics.sink import CallLogSink
from onetoken.billing import service as billing
from onetoken.billing.reconcile import reconcile
from onetoken.ingest import journal
from onetoken.ingest.ingestor import Ingestor
from onetoken.ingest.journal import pool_spool_dir
from onetoken.orgs import service as orgs
from onetoken.orgs import terms
from onetoken.rights.erasure import Identifiers, anonymize_clickhouse
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.unit.journal_files import append, record

POOL_DB = "onetoken_p1"


@pytest.fixture(scope="module")
def ch_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("pool-logs"))


@pytest.fixture(scope="module")
def client(ch_settings: Settings) -> Iterator[Client]:
    # One chDB engine for the module (one path per process).
    client = open_client(ch_settings)
    yield client
    client.close()


def _rows(client: Client, database: str, org_id: str) -> set[str]:
    result = client.query(
        f"SELECT request_id FROM {database}.call_log FINAL WHERE org_id = {{o:String}}",  # noqa: S608
        parameters={"o": org_id},
    )
    return {str(r[0]) for r in result.result_rows}


@pytest.fixture
def world(
    settings: Settings, state: AppState, ch_settings: Settings, client: Client
) -> dict[str, str]:
    """Org A pinned to pool p1 (database onetoken_p1), org B on the shared gateways; one
    journal of each kind of gateway, ingested."""
    with state.session_factory() as s:
        a = orgs.create_org(s, "A")
        b = orgs.create_org(s, "B")
        for org in (a, b):
            billing.credit(s, org.id, amount=10**12, kind="grant", idempotency_key=org.id)
        terms.create_pool(s, "p1", "", POOL_DB)
        terms.set_terms(s, a, {"pool": "p1"})
        s.commit()
        ids = {"a": a.id, "b": b.id}
    tag = uuid.uuid4().hex[:8]
    settings.ensure_dirs()
    append(pool_spool_dir(settings.spool_dir, "p1"), f"gwpool{tag}", 0,
           [record(f"a-{tag}-{i}", org_id=ids["a"], cost=700 + i) for i in range(3)])
    append(settings.spool_dir, f"gwshared{tag}", 0,
           [record(f"b-{tag}-{i}", org_id=ids["b"], cost=900 + i) for i in range(2)])
    sink = CallLogSink(ch_settings, client=client)
    ingestor = Ingestor(settings, state.session_factory, sink=sink)
    ingestor.catch_up()
    assert ingestor.rows_logged == 5
    return {**ids, "tag": tag}


def test_a_pinned_orgs_calls_land_in_its_pool_database_only(
    world: dict[str, str], client: Client
) -> None:
    tag = world["tag"]
    assert _rows(client, POOL_DB, world["a"]) == {f"a-{tag}-{i}" for i in range(3)}
    assert _rows(client, "onetoken", world["a"]) == set()
    assert _rows(client, "onetoken", world["b"]) == {f"b-{tag}-{i}" for i in range(2)}
    assert _rows(client, POOL_DB, world["b"]) == set()
    # The pool's table is the shared one's, column for column.
    columns = client.query(
        "SELECT name FROM system.columns WHERE database = {db:String} AND table = 'call_log' "
        "ORDER BY position",
        parameters={"db": POOL_DB},
    ).result_rows
    assert tuple(str(c[0]) for c in columns) == CALL_LOG_COLUMNS
    # Reads see both: an org's calls wherever they are.
    assert queries.count_calls(client, org_id=world["a"]) == 3
    assert queries.count_calls(client, org_id=world["b"]) == 2


def test_reconcile_is_zero_across_both_databases(
    world: dict[str, str], state: AppState, client: Client
) -> None:
    with state.session_factory() as s:
        lines = [x for x in reconcile(s, client) if x.org_id in (world["a"], world["b"])]
    assert {x.org_id: x.call_log_cost for x in lines} == {
        world["a"]: 700 + 701 + 702, world["b"]: 900 + 901}
    assert all(x.difference == 0 and x.calls_difference == 0 for x in lines)


def test_the_canary_scan_finds_a_needle_in_a_pool_database(
    world: dict[str, str], ch_settings: Settings, client: Client
) -> None:
    needle = f"canary-{uuid.uuid4().hex}"
    client.command(
        f"ALTER TABLE {POOL_DB}.call_log UPDATE user_agent = '{needle}' "
        f"WHERE request_id = 'a-{world['tag']}-0' SETTINGS mutations_sync = 2"
    )
    expected = f"ClickHouse {POOL_DB}.call_log.user_agent: 1 row(s)"
    assert expected in audit.scan(ch_settings, needle, client=client)
    # As on a ClickHouse server, where only the log databases are scanned.
    assert POOL_DB in log_databases(client)
    report = audit.AuditReport()
    audit.scan_clickhouse(client, needle, report, log_databases(client))
    assert expected in report.findings


def test_retention_ttls_cover_every_pool_database(
    world: dict[str, str], ch_settings: Settings, client: Client
) -> None:
    assert f"{POOL_DB}.call_log" in call_log_tables(client)
    assert current_ttl_days(client, f"{POOL_DB}.call_log") == ch_settings.call_log_ttl_days
    shorter = ch_settings.model_copy(update={"call_log_ttl_days": 30})
    try:
        ensure_ttls(client, shorter)
        assert {t: current_ttl_days(client, t) for t in call_log_tables(client)} == {
            "onetoken.call_log": 30, f"{POOL_DB}.call_log": 30}
    finally:
        ensure_ttls(client, ch_settings)


def test_erasure_rewrites_an_accounts_calls_in_every_database(
    world: dict[str, str], client: Client
) -> None:
    # journal_files.record writes account "acc" with key "key_a" in both orgs' rows.
    anonymize_clickhouse(client, [Identifiers(account_id="acc", org_id=world["a"],
                                              key_ids=["key_a"])])
    for database, org in ((POOL_DB, world["a"]), ("onetoken", world["b"])):
        left = client.query(
            f"SELECT count() FROM {database}.call_log FINAL "  # noqa: S608
            "WHERE org_id = {o:String} AND (source_ip != '' OR user_agent != '')",
            parameters={"o": org},
        ).result_rows[0][0]
        assert left == 0, database


def test_only_a_pool_database_name_takes_the_call_log_schema(client: Client) -> None:
    with pytest.raises(MigrationError):
        apply_migrations(client, "system")


def test_pool_directories_without_journals_hold_no_instance(tmp_path: Path) -> None:
    (tmp_path / "pools" / "p1").mkdir(parents=True)
    (tmp_path / "pools" / "Not-A-Pool").mkdir()
    assert journal.scan(tmp_path) == {}
