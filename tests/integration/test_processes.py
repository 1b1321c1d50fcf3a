"""The processes of a deployment: `serve` supervising its gateway child, `control` and
`gateway` run apart, one gateway per data dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support import wait_until

from .harness import READY_TIMEOUT_S, Server, bootstrap, cli, control_endpoint, deployed
from .records import exported_calls, reconcile
from .test_pipeline_durability import drive


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _until(check: Callable[[], Any], timeout: float = READY_TIMEOUT_S) -> Any:
    return wait_until(check, timeout, ignore=(httpx.HTTPError, OSError))


def _health(url: str) -> dict[str, Any] | None:
    r = httpx.get(f"{url}/healthz", timeout=2)
    return dict(r.json()) if r.status_code == 200 else None


def test_killed_gateway_is_restarted_and_its_journal_ingested(
    tmp_path: Path, mock_addr: str
) -> None:
    with deployed(tmp_path, mock_addr) as d:
        server, key = d["server"], d["creds"]["api_key"]
        assert server.proc is not None
        pid = server.proc.pid
        (gateway,) = _children(pid)
        before = drive(server, key, 20)
        os.kill(gateway, signal.SIGKILL)
        # A new child, on the same address, with a new engine instance.
        restarted = _until(lambda: [p for p in _children(pid) if p != gateway])
        assert len(restarted) == 1
        _until(lambda: _health(server.gateway_url))
        after = drive(server, key, 10)
        assert server.stop() == 0
    # Nothing of the killed instance's journal is lost or counted twice.
    rows = exported_calls(tmp_path)
    assert sorted(r["request_id"] for r in rows) == sorted(before | after)
    code, lines = reconcile(tmp_path)
    assert code == 0 and sum(x["call_log_cost"] for x in lines) > 0
    assert not list((tmp_path / "spool").glob("journal-*"))


def test_second_gateway_on_the_same_data_dir_is_refused(tmp_path: Path, mock_addr: str) -> None:
    with deployed(tmp_path, mock_addr) as d:
        server = d["server"]
        env = {**server.env(), "ONETOKEN_METRICS_LISTEN": "127.0.0.1:0"}
        env["ONETOKEN_CONTROL_URL"] = server.control_url
        second = cli(tmp_path, "gateway", env=env, check=False)
        assert second.returncode == 2
        assert "another gateway is serving data dir" in second.stderr
        # The first one keeps serving.
        assert _health(server.gateway_url) is not None
        assert server.stop() == 0


def _printed(log: Path, listener: str) -> str | None:
    """The URL `onetoken gateway` printed for `listener` (gateway or metrics)."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(f"{listener}: "):
            return line.removeprefix(f"{listener}: ").strip()
    return None


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "onetoken.cli", *args], env=env, stdout=out, stderr=out
        )


def test_gateway_keeps_serving_while_the_control_process_is_down(
    tmp_path: Path, mock_addr: str
) -> None:
    creds = bootstrap(tmp_path)
    # The demo's models and provider, set up once by serve --demo.
    setup = Server(data_dir=tmp_path, upstream=mock_addr)
    setup.start()
    assert setup.stop() == 0
    secret = (tmp_path / "secret.key").read_text().strip()
    env = {**setup.env(), "ONETOKEN_SECRET_KEY": secret}
    logs = tmp_path / "logs"
    control = _spawn(["control"], env, logs / "control.out")
    gateway: subprocess.Popen[bytes] | None = None
    try:
        setup.control_url = _until(lambda: control_endpoint(tmp_path, control.pid)).url
        _until(lambda: httpx.get(f"{setup.control_url}/api/openapi.json").status_code == 200)
        gateway = _spawn(
            ["gateway"], {**env, "ONETOKEN_CONTROL_URL": setup.control_url}, logs / "gw.out"
        )
        # Run on its own, the gateway prints where it listens.
        setup.gateway_url = _until(lambda: _printed(logs / "gw.out", "gateway"))
        # Its metrics listener too (ONETOKEN_METRICS_LISTEN says port 0).
        setup.metrics_url = f"{_until(lambda: _printed(logs / 'gw.out', 'metrics'))}/metrics"
        health = _until(lambda: _health(setup.gateway_url))
        assert health["control"] == "ok"
        ids = drive(setup, creds["api_key"], 6)

        control.send_signal(signal.SIGKILL)
        control.wait(timeout=30)
        # Still serving on its last snapshot, and saying so.
        health = _until(
            lambda: (h := _health(setup.gateway_url)) and h["control"] == "unreachable" and h
        )
        assert health["snapshot_version"] >= 1
        ids |= drive(setup, creds["api_key"], 6)
        with httpx.Client(
            base_url=setup.gateway_url, headers={"Authorization": f"Bearer {creds['api_key']}"}
        ) as gw:
            r = gw.post(
                "/v1/chat/completions",
                json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200
            ids.add(r.headers["x-request-id"])
        metrics = httpx.get(setup.metrics_url).text
        assert "onetoken_control_reachable 0" in metrics

        # Back on the address the gateway polls.
        control_listen = setup.control_url.removeprefix("http://")
        control = _spawn(
            ["control"], {**env, "ONETOKEN_CONTROL_LISTEN": control_listen}, logs / "control.out"
        )
        _until(lambda: (h := _health(setup.gateway_url)) and h["control"] == "ok")
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=60) == 0
        control.send_signal(signal.SIGTERM)
        assert control.wait(timeout=60) == 0
    finally:
        for proc in (gateway, control):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    # What was served while the control process was down is ingested after all.
    rows = exported_calls(tmp_path)
    assert {r["request_id"] for r in rows} >= ids
