"""The call log's CLI readers work while `onetoken serve` holds chDB: reconcile,
audit-retention, calls export, calls stats and sql go through the running control process over
the ops channel, and print what they print once it stopped, with the same exit codes.

The tests share one server and run in file order; the last one stops it."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import wait_until

from .harness import Admin, Server, bootstrap, cli
from .records import wait_for_calls

# Sent as a User-Agent, which call_log keeps: the audit must find it in ClickHouse.
PLANTED = "readers-planted-4e8b1d70c2"
# Only ever sent to audit-retention (and once with a wrong token): never persisted, never
# logged by the control process.
CLEAN = "readers-clean-9a3f52e617"
REFUSED = "readers-refused-0b7c4d9e21"
# Quoted in an `onetoken sql` query: the audit keeps the query's hash, never its text.
SQL_QUOTED = "readers-sql-quoted-5d1e8a3b77"
SQL_TOTALS = (
    "SELECT count() AS calls, sum(cost) AS cost, uniqExact(request_id) AS ids "
    "FROM onetoken.call_log FINAL WHERE user_agent != 'readers-sql-quoted-5d1e8a3b77'"
)
SETTLE_TIMEOUT_S = 30.0
READERS = {
    "reconcile": ("billing", "reconcile", "--json"),
    "export": ("calls", "export"),
    # A fixed window: the default one ends at the moment the command runs.
    "stats": ("calls", "stats", "--json", "--from", "2000-01-01", "--to", "2100-01-01"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, mock_addr: str) -> Iterator[dict[str, Any]]:
    data_dir: Path = tmp_path_factory.mktemp("readers")
    creds = bootstrap(data_dir)
    server = Server(data_dir=data_dir, upstream=mock_addr)
    server.start()
    admin = Admin(server, creds["admin_email"], creds["admin_password"])
    ids = set()
    with httpx.Client(base_url=server.gateway_url, timeout=30,
                      headers={"Authorization": f"Bearer {creds['api_key']}"}) as gw:
        for i in range(6):
            body = {"model": "demo-chat", "messages": [{"role": "user", "content": f"q{i}"}],
                    "stream": i % 2 == 1}
            headers = {"User-Agent": f"client {PLANTED}"} if i == 0 else {}
            r = gw.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            ids.add(r.headers["x-request-id"])
    wait_for_calls(admin, ids)
    try:
        yield {"server": server, "data_dir": data_dir, "ids": ids, "serving": {},
               "org_args": ("--org", creds["org_id"])}
    finally:
        server.kill()


def test_control_file_names_the_serving_process(world: dict[str, Any]) -> None:
    server: Server = world["server"]
    path = world["data_dir"] / "control.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert server.proc is not None
    assert json.loads(path.read_text()) == {
        "url": server.control_url,
        "pid": server.proc.pid,
        "gateway": server.gateway_url,
        "metrics": server.metrics_url.removesuffix("/metrics"),
    }


def test_reconcile_while_serving(world: dict[str, Any]) -> None:
    # The ledger and call_log land from the same records, not in the same instant.
    proc = wait_until(
        lambda: (p := cli(world["data_dir"], *READERS["reconcile"], check=False)).returncode == 0
        and p,
        SETTLE_TIMEOUT_S,
        0.1,
        message="reconcile finding no difference",
    )
    lines = json.loads(proc.stdout)
    assert len(lines) == 1 and lines[0]["difference"] == 0 and lines[0]["call_log_cost"] > 0
    world["serving"]["reconcile"] = proc


def test_calls_export_and_stats_while_serving(world: dict[str, Any]) -> None:
    export = cli(world["data_dir"], *READERS["export"])
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    assert {r["request_id"] for r in rows} == world["ids"]
    stats = cli(world["data_dir"], *READERS["stats"], *world["org_args"])
    [line] = json.loads(stats.stdout)["data"]
    assert line["group"] == "demo-chat" and line["calls"] == 6 and line["errors"] == 0
    assert line["cost"] == sum(r["cost"] for r in rows) > 0
    world["serving"]["export"] = export
    world["serving"]["stats"] = stats


def test_sql_while_serving(world: dict[str, Any]) -> None:
    """`onetoken sql` answers through the running control process, in each format, with
    the refusals of the control API: an operator at the shell is read-only too."""
    assert SQL_QUOTED in SQL_TOTALS
    data_dir: Path = world["data_dir"]
    export = [json.loads(line) for line in world["serving"]["export"].stdout.splitlines()]
    as_json = cli(data_dir, "sql", SQL_TOTALS, "--format", "json", *world["org_args"])
    answer = json.loads(as_json.stdout)
    assert answer["columns"] == ["calls", "cost", "ids"]
    assert answer["rows"] == [[6, sum(r["cost"] for r in export), 6]]
    assert answer["truncated"] is False
    every = cli(data_dir, "sql", SQL_TOTALS, "--format", "csv", "--all-orgs")
    assert every.stdout.splitlines()[1].startswith("6,")
    other = cli(data_dir, "sql", SQL_TOTALS, "--org", "no-such-org")
    assert other.stdout.splitlines()[-1].split()[0] == "0"
    for query in ("SELECT * FROM system.tables", "SELECT file('/etc/hostname')",
                  "SELECT count() FROM merge('onetoken', '^call_log$')"):
        refused = cli(data_dir, "sql", query, "--all-orgs", check=False)
        assert refused.returncode == 2 and "sql_refused" in refused.stderr, refused.stderr
    world["serving"]["sql"] = cli(data_dir, "sql", SQL_TOTALS, *world["org_args"])


def test_audit_retention_finds_a_planted_needle_in_clickhouse_while_serving(
    world: dict[str, Any],
) -> None:
    proc = cli(world["data_dir"], "audit-retention", "--needle", PLANTED, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FOUND ClickHouse onetoken.call_log.user_agent: 1 row(s)" in proc.stdout.splitlines()
    assert "NOT SCANNED" not in proc.stdout


def test_audit_retention_is_clean_while_serving(world: dict[str, Any]) -> None:
    proc = cli(world["data_dir"], "audit-retention", "--needle", CLEAN, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clean: not found in any persisted data" in proc.stderr
    # ClickHouse was scanned (through the server), not skipped.
    assert " 0 ClickHouse columns" not in proc.stdout


def test_the_ops_channel_refuses_a_wrong_token(world: dict[str, Any]) -> None:
    server: Server = world["server"]
    r = httpx.post(f"{server.control_url}/internal/ops/audit/clickhouse",
                   headers={"Authorization": "Bearer " + "0" * 64},
                   json={"needle": REFUSED}, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_token"
    assert REFUSED not in r.text
    # A CLI holding another master secret gets a clear refusal, not a traceback.
    other = cli(world["data_dir"], *READERS["reconcile"], check=False,
                env={"ONETOKEN_SECRET_KEY": "another-secret-" + "k3Y9q" * 8})
    assert other.returncode == 2
    assert "refused the ops channel token" in other.stderr
    assert "Traceback" not in other.stderr


def test_same_output_and_exit_codes_once_stopped_and_nothing_logged(
    world: dict[str, Any],
) -> None:
    """Runs last: stops the server, then the CLI opens the stores itself."""
    server: Server = world["server"]
    data_dir: Path = world["data_dir"]
    assert server.stop() == 0
    assert not (data_dir / "control.json").exists()
    for name, args in READERS.items():
        if name == "stats":
            args = (*args, *world["org_args"])
        stopped = cli(data_dir, *args, check=False)
        serving = world["serving"][name]
        assert (stopped.returncode, stopped.stdout, stopped.stderr) == (
            serving.returncode, serving.stdout, serving.stderr
        ), name
    # sql's stderr says how long the query took, which differs.
    stopped = cli(data_dir, "sql", SQL_TOTALS, *world["org_args"])
    assert stopped.stdout == world["serving"]["sql"].stdout
    refused = cli(data_dir, "sql", "SELECT * FROM system.tables", "--all-orgs", check=False)
    assert refused.returncode == 2 and "sql_refused" in refused.stderr
    # The needles the control process saw (in an ops request body) are in none of its logs,
    # nor anywhere else it persisted.
    for needle in (CLEAN, REFUSED, SQL_QUOTED):
        proc = cli(data_dir, "audit-retention", "--needle", needle, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = [p for p in (data_dir / "logs").rglob("*") if p.is_file()]
    assert logs
    for path in logs:
        content = path.read_bytes()
        for needle in (CLEAN, REFUSED, SQL_QUOTED):
            assert needle.encode() not in content, f"{needle} in {path.name}"
