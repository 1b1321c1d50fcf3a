"""Every request leaves exactly one call_log row, even when ClickHouse was unreachable
during the traffic and the server restarted afterwards; the ledger still equals call_log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.support import free_port

from .harness import Server, bootstrap
from .records import exported_calls, reconcile


def drive(server: Server, key: str, n: int) -> set[str]:
    ids = set()
    with httpx.Client(
        base_url=server.gateway_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as gw:
        for i in range(n):
            body: dict[str, Any] = {
                "model": "demo-chat",
                "messages": [{"role": "user", "content": f"q{i}"}],
                "stream": i % 2 == 0,
            }
            if i % 5 == 0:
                body["model"] = "missing-model"  # failures are recorded too
            r = gw.post("/v1/chat/completions", json=body)
            ids.add(r.headers["x-request-id"])
    return ids


def test_clickhouse_outage_then_restart_loses_nothing(tmp_path: Path, mock_addr: str) -> None:
    creds = bootstrap(tmp_path)
    dead = f"http://default:@127.0.0.1:{free_port()}/onetoken"
    outage = Server(
        data_dir=tmp_path, upstream=mock_addr, extra_env={"ONETOKEN_CLICKHOUSE_DSN": dead}
    )
    outage.start()
    ids = drive(outage, creds["api_key"], 40)
    assert outage.stop() == 0
    spooled = list((tmp_path / "spool").glob("*.jsonl"))
    assert spooled, "records should have been spooled while ClickHouse was down"

    healthy = Server(data_dir=tmp_path, upstream=mock_addr)
    healthy.start()
    more = drive(healthy, creds["api_key"], 10)
    assert healthy.stop() == 0
    assert not list((tmp_path / "spool").glob("*.jsonl")), "spool should be empty after replay"

    rows = exported_calls(tmp_path)
    assert sorted(r["request_id"] for r in rows) == sorted(ids | more), "lost or doubled records"
    code, lines = reconcile(tmp_path)
    assert code == 0
    assert sum(x["call_log_cost"] for x in lines) == sum(int(r["cost"]) for r in rows) > 0
