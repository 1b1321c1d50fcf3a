"""The `onetoken` command line in a subprocess, as operators and scripts run it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support import TEST_SECRET, free_port

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"


def run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ONETOKEN_DATA_DIR": str(data_dir),
        "ONETOKEN_SECRET_KEY": TEST_SECRET,
        "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("ONETOKEN_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "onetoken.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bootstrap_is_idempotent_and_keys_create(tmp_path: Path) -> None:
    first = run(tmp_path, "bootstrap", "--json")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["created"] is True
    assert out["admin_email"].startswith("admin@")
    assert out["api_key"].startswith("ot-") and len(out["admin_password"]) >= 16

    again = run(tmp_path, "bootstrap", "--json")
    assert again.returncode == 0
    out2 = json.loads(again.stdout)
    assert out2 == {"created": False, "org_id": out["org_id"], "admin_email": out["admin_email"]}

    # Neither secret was written anywhere under the data dir.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert "control.db" in {p.name for p in files}, files
    for path in files:
        data = path.read_bytes()
        assert out["api_key"].encode() not in data, path
        assert out["admin_password"].encode() not in data, path

    for org in (out["org_id"], "Default"):
        created = run(tmp_path, "keys", "create", "--org", org, "--name", "ci", "--json")
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)
        assert key["api_key"].startswith("ot-") and key["org_id"] == out["org_id"]


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    r = run(tmp_path, "keys", "create", "--org", "nope", "--name", "x")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("onetoken: error:")


def test_invalid_configuration_is_reported_clearly(tmp_path: Path) -> None:
    env_bad = {"ONETOKEN_FLUSH_INTERVAL_MS": "not-a-number"}
    r = subprocess.run(
        [sys.executable, "-m", "onetoken.cli", "migrate"],
        env={
            **os.environ,
            **env_bad,
            "ONETOKEN_DATA_DIR": str(tmp_path),
            "PYTHONPATH": str(PYTHON_DIR),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "ONETOKEN_FLUSH_INTERVAL_MS" in r.stderr and "Traceback" not in r.stderr
    assert "not-a-number" not in r.stderr


def test_migrate(tmp_path: Path) -> None:
    r = run(tmp_path, "migrate")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "control.db").exists()


@pytest.mark.parametrize("found", [True, False])
def test_audit_retention_exit_codes(tmp_path: Path, found: bool) -> None:
    needle = "NEEDLE-audit-5e1"
    if found:
        (tmp_path / "logs").mkdir(parents=True)
        (tmp_path / "logs" / "onetoken.log").write_text(f"x {needle} y\n")
    r = run(tmp_path, "audit-retention", "--needle", needle)
    assert r.returncode == (1 if found else 0), r.stderr


def test_ingest_refuses_embedded_chdb(tmp_path: Path) -> None:
    # Only the control process may open the embedded chDB path; it ingests there itself.
    r = run(tmp_path, "ingest", "--once")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "needs a ClickHouse server" in r.stderr


def test_ingest_once_charges_the_ledger_while_clickhouse_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import SecretStr

    from onetoken.billing import service as billing
    from onetoken.control import build_state
    from onetoken.orgs import service as orgs
    from onetoken.settings import Settings
    from tests.unit.journal_files import append, dead, record

    state = build_state(Settings(data_dir=tmp_path, secret_key=SecretStr(TEST_SECRET)))
    with state.session_factory() as s:
        org_id = orgs.create_org(s, "A").id
        s.commit()
    spool = tmp_path / "spool"
    segment = append(spool, "i1", 1, [record("r1", org_id=org_id, cost=42)])
    dead(spool, "i1")
    down = f"http://default:pw@127.0.0.1:{free_port()}/onetoken"
    monkeypatch.setenv("ONETOKEN_CLICKHOUSE_DSN", down)
    r = run(tmp_path, "ingest", "--once")
    assert r.returncode == 0, r.stderr
    assert "1 record(s) ingested" in r.stderr
    with state.session_factory() as s:
        assert billing.balance(s, org_id) == -42
    # call_log is behind while ClickHouse is unreachable: the journal keeps the record.
    assert segment.exists()
    state.db_engine.dispose()


def test_ingest_says_when_its_metrics_address_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import SecretStr

    from onetoken.control import build_state
    from onetoken.settings import Settings

    build_state(Settings(data_dir=tmp_path, secret_key=SecretStr(TEST_SECRET))).db_engine.dispose()
    monkeypatch.setenv("ONETOKEN_CLICKHOUSE_DSN", f"http://127.0.0.1:{free_port()}/onetoken")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        r = run(tmp_path, "ingest", "--metrics-listen", address)
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on {address}" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_serve_without_secret_fails_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONETOKEN_")}
    env["ONETOKEN_DATA_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onetoken.cli", "serve"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "ONETOKEN_SECRET_KEY is not set" in proc.stderr and "--demo" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Nothing was created: it stopped before opening any store.
    assert not (tmp_path / "control.db").exists() and not (tmp_path / "secret.key").exists()


def test_cli_actions_are_spooled_for_the_next_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONETOKEN_")}
    env["ONETOKEN_DATA_DIR"] = str(tmp_path)
    for args in (["bootstrap", "--json"], ["keys", "create", "--org", "Default", "--name", "ci"]):
        proc = subprocess.run([sys.executable, "-m", "onetoken.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    lines = [orjson.loads(line) for f in sorted((tmp_path / "spool").glob("seclog-*.jsonl"))
             for line in f.read_bytes().splitlines()]
    created = [e for e in lines if e["kind"] == "admin.key_created"]
    assert len(created) == 1 and created[0]["user_agent"] == "onetoken-cli"
    key = proc.stdout.split()[0]
    assert key.startswith("ot-") and key not in str(lines)


# -- the CLI when chDB is locked and no control process answers -------------------------

_HOLDER = """
import sys
from pathlib import Path
from onetoken.analytics.clickhouse import open_client
from onetoken.settings import Settings
client = open_client(Settings(data_dir=Path(sys.argv[1])))
print("ready", flush=True)
sys.stdin.read()
client.close()
"""


OPS_NEEDLE = "ops-needle-7c1f0a9e3b"


def test_locked_chdb_without_a_control_process_is_a_clear_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "ONETOKEN_DATA_DIR": str(tmp_path),
        "ONETOKEN_CONTROL_LISTEN": f"127.0.0.1:{free_port()}",
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "onetoken.cli", *args],
                                  capture_output=True, env=env, text=True, timeout=120)

        results = {name: cli(*args) for name, args in {
            "reconcile": ("billing", "reconcile"),
            "export": ("calls", "export"),
            "stats": ("calls", "stats", "--org", "org-x"),
            "audit": ("audit-retention", "--needle", OPS_NEEDLE),
        }.items()}
    finally:
        holder.communicate(timeout=60)
    for name in ("reconcile", "export", "stats"):
        r = results[name]
        assert r.returncode == 2, (name, r.stderr)
        assert r.stdout == ""
        assert f"locked by process {holder.pid}" in r.stderr, r.stderr
        assert "No control process answered at http://127.0.0.1:" in r.stderr
        assert "Traceback" not in r.stderr
    audit = results["audit"]
    assert audit.returncode == 2, audit.stderr
    assert "NOT SCANNED ClickHouse: " in audit.stdout
    assert "No control process answered" in audit.stdout
    assert "incomplete" in audit.stderr
    assert OPS_NEEDLE not in audit.stdout + audit.stderr


def _head() -> str:
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    from onetoken.db.migrate import alembic_config

    return ",".join(sorted(ScriptDirectory.from_config(
        alembic_config(create_engine("sqlite://"))).get_heads()))


def _tables(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]


def test_ingest_never_migrates_and_once_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a rollout the ingest sidecar of a new release can start before the control
    plane's migrate step: it must not run alembic beside it."""
    monkeypatch.setenv("ONETOKEN_CLICKHOUSE_DSN", f"http://default:pw@127.0.0.1:{free_port()}/x")
    r = run(tmp_path, "ingest", "--once")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"the control database has no schema yet; this release needs {_head()}" in r.stderr
    assert "run `onetoken migrate` first (ingest never migrates)" in r.stderr
    assert _tables(tmp_path / "control.db") == []
    assert run(tmp_path, "migrate").returncode == 0
    r = run(tmp_path, "ingest", "--once")
    assert r.returncode == 0, r.stderr
    assert "0 record(s) ingested" in r.stderr


def test_ingest_waits_for_the_migration_then_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support import wait_until

    monkeypatch.setenv("ONETOKEN_CLICKHOUSE_DSN", f"http://default:pw@127.0.0.1:{free_port()}/x")
    env = {
        **os.environ,
        "ONETOKEN_DATA_DIR": str(tmp_path),
        "ONETOKEN_SECRET_KEY": TEST_SECRET,
        "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("ONETOKEN_DATABASE_URL", None)
    err = tmp_path / "ingest.err"
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "onetoken.cli", "ingest"], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: "waiting for `onetoken migrate`" in err.read_text(), timeout=60,
                   message=lambda: err.read_text())
        lines = [orjson.loads(x) for x in err.read_text().splitlines() if x.startswith("{")]
        assert {"event": "db.waiting_for_migration", "kind": "empty", "version": "none",
                "revision": _head()}.items() <= lines[-1].items()
        # Waiting created nothing; the migration is the migrate command's alone.
        assert _tables(tmp_path / "control.db") == []
        assert proc.poll() is None
        assert run(tmp_path, "migrate").returncode == 0
        wait_until(lambda: '"db.schema_ready"' in err.read_text(), timeout=60,
                   message=lambda: err.read_text())
        proc.terminate()
        assert proc.wait(timeout=60) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
