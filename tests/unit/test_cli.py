from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.conftest import TEST_SECRET

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
    for path in tmp_path.rglob("*"):
        if path.is_file():
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
    import socket

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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("ONETOKEN_CLICKHOUSE_DSN", f"http://default:pw@127.0.0.1:{port}/onetoken")
    r = run(tmp_path, "ingest", "--once")
    assert r.returncode == 0, r.stderr
    assert "1 record(s) ingested" in r.stderr
    with state.session_factory() as s:
        assert billing.balance(s, org_id) == -42
    # call_log is behind while ClickHouse is unreachable: the journal keeps the record.
    assert segment.exists()
    state.db_engine.dispose()
