"""A server killed with SIGKILL in the middle of traffic and started again: every request a
client saw complete is in call_log once and charged once, and the ledger still reconciles
with call_log exactly (the control process ingests the killed gateway's journal)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.support import wait_until

from .billing_world import charged_calls, control_db, ledger_usage
from .harness import Server, bootstrap
from .records import exported_calls, reconcile

WORKERS = 16


def _traffic(server: Server, key: str, stop: threading.Event, done: dict[str, int]) -> None:
    """Requests until stopped or the server dies; `done` gets every request the client
    saw complete: a JSON reply with usage, or a stream that reached [DONE]."""
    i = 0
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal i
        with httpx.Client(base_url=server.gateway_url, timeout=10) as http:
            while not stop.is_set():
                with lock:
                    i += 1
                    seq = i
                body: dict[str, Any] = {
                    "model": "demo-chat",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": f"kill test {seq}"}],
                    "mock": {"chunks": 6, "delay_ms": 5},
                    "stream": seq % 2 == 0,
                }
                try:
                    if not body["stream"]:
                        r = http.post(
                            "/v1/chat/completions",
                            json=body,
                            headers={"Authorization": f"Bearer {key}"},
                        )
                        if r.status_code == 200 and r.json().get("usage"):
                            done[r.headers["x-request-id"]] = 1
                        continue
                    with http.stream(
                        "POST",
                        "/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    ) as r:
                        finished = any(line == "data: [DONE]" for line in r.iter_lines())
                        if r.status_code == 200 and finished:
                            done[r.headers["x-request-id"]] = 1
                except httpx.HTTPError:
                    # The server is down between the kill and the restart: back off a
                    # little instead of spinning on refused connections.
                    if stop.wait(0.01):
                        return

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_sigkill_during_traffic_loses_and_doubles_nothing(tmp_path: Path, mock_addr: str) -> None:
    creds = bootstrap(tmp_path)
    first = Server(data_dir=tmp_path, upstream=mock_addr)
    first.start()
    stop = threading.Event()
    done: dict[str, int] = {}
    traffic = threading.Thread(target=_traffic, args=(first, creds["api_key"], stop, done))
    traffic.start()
    wait_until(lambda: len(done) >= 200, 30, message="200 completed requests before the kill")
    before_kill = len(done)
    first.kill()  # SIGKILL: no drain, no flush; the gateway child dies with it
    stop.set()
    traffic.join(timeout=60)
    completed = set(done)
    assert before_kill >= 200 and len(completed) >= before_kill
    assert list((tmp_path / "spool").glob("journal-*.jsonl")), "the journal should hold records"

    second = Server(data_dir=tmp_path, upstream=mock_addr)
    second.start()  # ingests the dead instance's journal
    assert second.stop() == 0

    rows = exported_calls(tmp_path)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a request recorded twice"
    missing = completed - set(ids)
    assert not missing, f"{len(missing)} completed requests lost"
    by_id = {r["request_id"]: r for r in rows}
    with control_db(tmp_path) as state:
        charged = ledger_usage(state, creds["org_id"])
    for rid in completed:
        assert by_id[rid]["cost"] > 0
    # Every charged call once, at call_log's cost: nothing lost, nothing charged twice.
    assert charged == charged_calls(rows)
    code, lines = reconcile(tmp_path)
    assert code == 0 and all(x["difference"] == 0 for x in lines), lines
    assert not list((tmp_path / "spool").glob("journal-*.jsonl"))
