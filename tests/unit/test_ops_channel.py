"""The ops channel (/internal/ops/): the reads a running control process performs for the
CLI, its token, control.json, and the CLI's message when neither path works."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import SecretStr

from onetoken.analytics import queries
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.analytics.sink import CallLogSink
from onetoken.control import build_state, create_app
from onetoken.kit import channel
from onetoken.ops import PREFIX, control_file
from onetoken.ops.control_file import ControlEndpoint
from onetoken.settings import Settings
from tests.support import TEST_SECRET

from .test_analytics_sink import T0, insert, make_batch

NEEDLE = "ops-needle-7c1f0a9e3b"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("ops"), secret_key=SecretStr(TEST_SECRET))


@pytest.fixture(scope="module")
def ch(settings: Settings) -> Iterator[Client]:
    # One chDB engine for the module (one path per process).
    client = open_client(settings)
    yield client
    client.close()


@pytest.fixture(scope="module")
def sink(settings: Settings, ch: Client) -> Iterator[CallLogSink]:
    sink = CallLogSink(settings, client=ch)
    planted = make_batch("org-ops-a", 25)
    planted["user_agent"][3] = f"agent {NEEDLE}"
    assert insert(sink, planted)
    assert insert(sink, make_batch("org-ops-b", 4, ts0=T0 + 10**9))
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def http(settings: Settings, sink: CallLogSink) -> Iterator[TestClient]:
    state = build_state(settings)
    # The control process's runtime: the ops channel needs only its ClickHouse reader.
    app = create_app(settings, SimpleNamespace(sink=sink), state=state)  # type: ignore[arg-type]
    with TestClient(app) as client:
        yield client
    state.db_engine.dispose()


@pytest.fixture(scope="module")
def ops(settings: Settings) -> dict[str, str]:
    token = channel.channel_token(settings.secret_key_bytes(), channel.OPS)
    return {"Authorization": f"Bearer {token}"}


def _ops_routes(http: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) under the ops prefix, read from the app (a new route cannot be
    missed)."""
    app: Any = http.app
    return [
        (method, str(context.path))
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute) and str(context.path).startswith(PREFIX)
        for method in sorted(set(context.methods or ()) - {"HEAD"})
    ]


def test_every_ops_route_refuses_a_missing_or_wrong_token(
    http: TestClient, settings: Settings
) -> None:
    routes = _ops_routes(http)
    assert len(routes) == 6
    wrong = {
        "Authorization": "Bearer "
        + channel.channel_token(settings.secret_key_bytes(), channel.GATEWAY)
    }
    for method, path in routes:
        for headers in ({}, wrong, {"Authorization": "Basic x"}):
            r = http.request(method, path, headers=headers, json={"needle": NEEDLE})
            assert r.status_code == 401, (method, path, r.text)
            assert r.json() == {"error": {
                "message": "A valid ops channel token is required.",
                "type": "authentication_error", "param": None, "code": "invalid_token",
            }}
            assert NEEDLE not in r.text


def test_ops_routes_are_not_in_the_openapi_document(http: TestClient) -> None:
    doc = http.get("/api/openapi.json").json()
    assert not [p for p in doc["paths"] if p.startswith("/internal")]


def test_export_pages_through_every_row_oldest_first(
    http: TestClient, ops: dict[str, str], ch: Client
) -> None:
    rows: list[list[Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"org": "org-ops-a", "limit": 10}
        if after:
            params["after"] = after
        r = http.get(f"{PREFIX}/calls/export", headers=ops, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["columns"] == list(CALL_LOG_COLUMNS)
        rows += page["rows"]
        after = page["next_cursor"]
        if after is None:
            break
    ids = [row[CALL_LOG_COLUMNS.index("request_id")] for row in rows]
    assert ids == [f"org-ops-a-req-{i:06d}" for i in range(25)]
    # Same rows, same values as the query the CLI streams from its own client.
    assert rows == queries.export_page(ch, org_id="org-ops-a", limit=100).rows
    everything = http.get(f"{PREFIX}/calls/export", headers=ops).json()
    assert len(everything["rows"]) == 29 and everything["next_cursor"] is None

    bad = http.get(f"{PREFIX}/calls/export", headers=ops, params={"after": "garbage"})
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "after"


def test_call_stats_are_the_control_apis(http: TestClient, ops: dict[str, str]) -> None:
    window = {"org": "org-ops-a", "start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}
    r = http.get(f"{PREFIX}/calls/stats", headers=ops, params=window)
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [{
        "group": "gpt-4o-mini", "calls": 25, "errors": 0,
        "prompt_tokens": sum(10 + i for i in range(25)), "completion_tokens": 125,
        "cached_tokens": 0, "cost": sum(1_000 + i for i in range(25)),
        "latency_p50_us": 1500, "latency_p99_us": 1500,
    }]
    by_key = http.get(f"{PREFIX}/calls/stats", headers=ops, params={**window, "group_by": "key"})
    assert [row["group"] for row in by_key.json()["rows"]] == ["ot-ab12...9f3c"]
    early = {**window, "end": "2000-01-02T00:00:00Z"}
    assert http.get(f"{PREFIX}/calls/stats", headers=ops, params=early).json()["rows"] == []
    bad = http.get(f"{PREFIX}/calls/stats", headers=ops, params={**window, "group_by": "x"})
    assert bad.status_code == 422


def test_reconcile_runs_the_cli_function(http: TestClient, ops: dict[str, str]) -> None:
    r = http.get(f"{PREFIX}/billing/reconcile", headers=ops)
    assert r.status_code == 200, r.text
    # One line per org and UTC day; each planted batch lies within one day.
    lines = {line["org_id"]: line for line in r.json()["lines"]}
    assert len(lines) == len(r.json()["lines"])
    # call_log rows without ledger entries: every cost and call is a difference.
    assert lines["org-ops-a"] == {
        "org_id": "org-ops-a",
        "day": datetime.fromtimestamp(T0 / 1e6, UTC).date().isoformat(),
        "ledger_usage": 0,
        "call_log_cost": sum(1_000 + i for i in range(25)),
        "ledger_calls": 0,
        "call_log_calls": 25,
    }
    assert lines["org-ops-b"]["call_log_cost"] == sum(1_000 + i for i in range(4))
    assert lines["org-ops-b"]["call_log_calls"] == 4
    only = http.get(f"{PREFIX}/billing/reconcile", headers=ops, params={"org": "org-ops-b"})
    assert [line["org_id"] for line in only.json()["lines"]] == ["org-ops-b"]


def test_audit_scan_finds_the_needle_and_never_logs_or_echoes_it(
    http: TestClient, ops: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    found = http.post(f"{PREFIX}/audit/clickhouse", headers=ops, json={"needle": NEEDLE})
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["findings"] == ["ClickHouse onetoken.call_log.user_agent: 1 row(s)"]
    assert body["problems"] == [] and body["columns_scanned"] > 0

    clean = http.post(f"{PREFIX}/audit/clickhouse", headers=ops, json={"needle": "nowhere-5d2"})
    assert clean.json()["findings"] == []

    for bad in ({"needle": ""}, {"needle": [NEEDLE]}, {"needle": NEEDLE, NEEDLE: 1}):
        r = http.post(f"{PREFIX}/audit/clickhouse", headers=ops, json=bad)
        assert r.status_code in (200, 422)
        if r.status_code == 422:
            assert NEEDLE not in r.text
    assert NEEDLE not in found.text
    assert NEEDLE not in caplog.text
    assert not [rec for rec in caplog.records if NEEDLE in repr(rec.__dict__)]


# -- control.json -----------------------------------------------------------------------


def test_control_file_is_private_and_names_a_live_process(tmp_path: Path) -> None:
    control_file.write(tmp_path, ControlEndpoint("http://127.0.0.1:8081", os.getpid()))
    path = tmp_path / "control.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": "http://127.0.0.1:8081", "pid": os.getpid()}
    found = control_file.read(tmp_path)
    assert found is not None and found.url == "http://127.0.0.1:8081"

    served = ControlEndpoint(
        url="http://127.0.0.1:8081", pid=os.getpid(),
        gateway="http://127.0.0.1:8080", metrics="http://127.0.0.1:9090",
    )
    control_file.write(tmp_path, served)
    assert control_file.read(tmp_path) == served

    # Another process's file is not ours to remove.
    control_file.remove(tmp_path, os.getpid() + 1)
    assert path.exists()
    control_file.remove(tmp_path, os.getpid())
    assert not path.exists()
    assert control_file.read(tmp_path) is None


def test_control_file_of_a_dead_process_or_garbage_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    control_file.write(tmp_path, ControlEndpoint("http://127.0.0.1:1", int(dead.stdout)))
    assert control_file.read(tmp_path) is None
    (tmp_path / "control.json").write_text("{not json")
    assert control_file.read(tmp_path) is None
    for field in ("gateway", "metrics"):
        doc = {"url": "http://127.0.0.1:1", "pid": os.getpid(), field: 9090}
        (tmp_path / "control.json").write_text(json.dumps(doc))
        assert control_file.read(tmp_path) is None
