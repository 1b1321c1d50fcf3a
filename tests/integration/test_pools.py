"""A dedicated gateway pool next to the shared gateways, as processes of one deployment: the
control process, `onetoken gateway` and `onetoken gateway --pool`, driven with the openai
SDK (docs/pools.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from .harness import Admin, Server, bootstrap, control_endpoint
from .records import exported_calls, reconcile
from .test_processes import _health, _printed, _spawn, _until

CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


def _gateway(env: dict[str, str], log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = _spawn(["gateway", *args], env, log)
    url = _until(lambda: _printed(log, "gateway"))
    _until(lambda: _health(url))
    return proc, url


def _client(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def _refusal(url: str, key: str) -> Any:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _client(url, key).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    return refused.value


_BY_DATABASE = """
import json, sys
from pathlib import Path
from onetoken.analytics.clickhouse import open_client
from onetoken.settings import Settings
client = open_client(Settings(data_dir=Path(sys.argv[1])), migrate=False)
out = {}
for db in ("onetoken", "onetoken_eu_1"):
    rows = client.query(
        f"SELECT request_id FROM {db}.call_log FINAL WHERE org_id = {{o:String}}",
        parameters={"o": sys.argv[2]},
    ).result_rows
    out[db] = [r[0] for r in rows]
print(json.dumps(out))
"""


def _request_ids_by_database(data_dir: Path, org_id: str) -> dict[str, set[str]]:
    """The org's call_log request ids in the shared and the pool's database, read in a
    process of their own (chDB: one data path per process)."""
    out = subprocess.run(
        [sys.executable, "-c", _BY_DATABASE, str(data_dir), org_id],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return {db: set(ids) for db, ids in json.loads(out).items()}


def test_a_pool_serves_only_its_orgs_and_the_shared_gateways_only_theirs(
    tmp_path: Path, mock_addr: str
) -> None:
    creds = bootstrap(tmp_path)
    # The demo's platform provider and models, set up once by serve --demo.
    setup = Server(data_dir=tmp_path, upstream=mock_addr)
    setup.start()
    assert setup.stop() == 0
    env = {**setup.env(), "ONETOKEN_SECRET_KEY": (tmp_path / "secret.key").read_text().strip()}
    env.pop("ONETOKEN_METRICS_LISTEN")
    logs = tmp_path / "logs"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        control = _spawn(["control"], env, logs / "control.out")
        procs.append(control)
        setup.control_url = _until(lambda: control_endpoint(tmp_path, control.pid)).url
        _until(lambda: httpx.get(f"{setup.control_url}/api/openapi.json").status_code == 200)
        env["ONETOKEN_CONTROL_URL"] = setup.control_url
        shared, shared_url = _gateway(env, logs / "shared.out")
        procs.append(shared)
        pooled, pool_url = _gateway(env, logs / "pool.out", "--pool", "eu-1")
        procs.append(pooled)

        # The bootstrap account is an operator: a pool, and the bootstrap org pinned to it.
        op = Admin(setup, creds["admin_email"], creds["admin_password"])
        op.post("/api/v1/pools", {"name": "eu-1", "clickhouse_database": "onetoken_eu_1"})
        org_id = creds["org_id"]
        pinned = op.http.patch(f"/api/v1/orgs/{org_id}/terms", json={"pool": "eu-1"})
        assert pinned.status_code == 200, pinned.text
        # Another org, on the shared gateways.
        other = op.post("/api/v1/orgs", {"name": "Other", "owner": {
            "email": "owner@other.test", "password": "a long enough password", "role": "owner"}})
        other_admin = Admin(setup, "owner@other.test", "a long enough password")
        other_key = other_admin.post("/api/v1/keys", {"name": "k"})["key"]
        assert other["pool"] is None and op.get("/api/v1/org")["pool"] == "eu-1"

        # The pinning has taken effect when the API call returned: the pool serves the
        # pinned org's key...
        served = _client(pool_url, creds["api_key"]).chat.completions.with_raw_response.create(
            **CHAT)  # type: ignore[call-overload]
        assert served.status_code == 200
        pool_ids = {served.headers["x-request-id"]}
        # ...and refuses the other org's key with the clear error, saying nothing of it.
        away = _refusal(pool_url, other_key)
        assert away.status_code == 403 and away.code == "wrong_gateway_pool"
        assert "shared gateways" in away.message
        # The shared gateway refuses the pinned org's key.
        home = _refusal(shared_url, creds["api_key"])
        assert home.code == "wrong_gateway_pool" and "dedicated gateway pool" in home.message
        for text in (away.message, home.message):
            assert org_id not in text and other["id"] not in text
        # An unknown key is still just invalid on both.
        for url in (pool_url, shared_url):
            with pytest.raises(openai.AuthenticationError):
                _client(url, "ot-not-a-key").chat.completions.create(**CHAT)  # type: ignore[call-overload]
        for _ in range(4):
            r = _client(pool_url, creds["api_key"]).chat.completions.with_raw_response.create(
                **CHAT)  # type: ignore[call-overload]
            pool_ids.add(r.headers["x-request-id"])

        # The pool gateway journals into its pool's spool dir, which the control ingests.
        assert (tmp_path / "spool" / "pools" / "eu-1").is_dir()
        for proc in (pooled, shared, control):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    # Exports and reconcile read every log database...
    rows = exported_calls(tmp_path)
    assert {r["request_id"] for r in rows if r["org_id"] == org_id} >= pool_ids
    # ...while the pinned org's rows are stored in the pool's database only.
    stored = _request_ids_by_database(tmp_path, org_id)
    assert stored["onetoken_eu_1"] >= pool_ids
    assert stored["onetoken"] == set()
    code, lines = reconcile(tmp_path)
    assert code == 0 and sum(x["call_log_cost"] for x in lines) > 0
    assert not list((tmp_path / "spool" / "pools" / "eu-1").glob("journal-*.jsonl"))
