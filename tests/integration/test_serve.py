"""`onetoken serve --demo` end to end in a subprocess (needs the Rust extension)."""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import TEST_SECRET, wait_until

from .harness import cli

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}


class Served:
    def __init__(
        self, proc: subprocess.Popen[str], info: dict[str, str], env: dict[str, str]
    ) -> None:
        self.proc = proc
        self.env = env
        self.info = info
        self.gateway = info["gateway"]
        self.control = info["control"]


def _start(data_dir: Path) -> Served:
    env = {
        **os.environ,
        "ONETOKEN_DATA_DIR": str(data_dir),
        "ONETOKEN_SECRET_KEY": TEST_SECRET,
        "ONETOKEN_GATEWAY_LISTEN": "127.0.0.1:0",
        "ONETOKEN_CONTROL_LISTEN": "127.0.0.1:0",
        "ONETOKEN_FLUSH_INTERVAL_MS": "50",
        "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("ONETOKEN_DATABASE_URL", "ONETOKEN_CLICKHOUSE_DSN", "ONETOKEN_DEMO_UPSTREAM"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "onetoken.cli", "serve", "--demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    info: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while "try" not in info:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"serve printed {info} before timing out") from None
        name, _, value = line.partition(": ")
        info[name.strip()] = value.strip()
    return Served(proc, info, env)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = _start(tmp_path)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


def _chat(s: Served, key: str) -> httpx.Response:
    return httpx.post(
        f"{s.gateway}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def _within_a_second(s: Served, key: str, status: int) -> httpx.Response:
    r: httpx.Response = wait_until(
        lambda: (r := _chat(s, key)).status_code == status and r, 1.0, 0.02,
        message=f"answer {status} within a second",
    )
    return r


def test_serve_demo_end_to_end(served: Served) -> None:
    s = served
    assert s.gateway.startswith("http://127.0.0.1:") and s.control.startswith("http://127.0.0.1:")
    r = _chat(s, s.info["api_key"])
    assert r.status_code == 200, r.text
    assert httpx.get(f"{s.control}/healthz").status_code == 200
    # The console's address is announced, and its sign-in page answers there.
    assert s.info["console"] == f"{s.control}/"
    assert httpx.get(f"{s.control}/signin").status_code == 200

    login = httpx.post(
        f"{s.control}/api/v1/auth/login",
        json={"email": s.info["admin_email"], "password": s.info["admin_password"]},
    )
    assert login.status_code == 200
    h = {"Authorization": f"Bearer {login.json()['access_token']}"}
    # The bootstrap account has not accepted the terms of service yet: its session is held
    # to its profile and the terms, while its API key served the call above all the same.
    held = httpx.get(f"{s.control}/api/v1/billing/balance", headers=h)
    assert held.status_code == 403 and held.json()["error"]["code"] == "terms_not_accepted"
    terms = httpx.get(f"{s.control}/api/v1/me/terms", headers=h).json()
    accepted = httpx.post(f"{s.control}/api/v1/me/terms/accept", headers=h,
                          json={"version": terms["version"]})
    assert accepted.status_code == 200, accepted.text

    # The control process ingests the gateway's journal into the ledger shortly after.
    wait_until(
        lambda: httpx.get(f"{s.control}/api/v1/billing/balance", headers=h).json()["balance"]
        != "100.000000000",
        10,
        message="the demo call charged",
    )
    ledger = httpx.get(f"{s.control}/api/v1/billing/ledger", headers=h).json()["data"]
    # Usage is entered per org, key, model and day, not per request.
    assert [e["kind"] for e in ledger].count("usage") == 1

    # A key created through the API works within a second (the gateway's next snapshot
    # poll); revoked, it stops within a second.
    created = httpx.post(f"{s.control}/api/v1/keys", json={"name": "new"}, headers=h).json()
    _within_a_second(s, created["key"], 200)
    httpx.post(f"{s.control}/api/v1/keys/{created['id']}/revoke", headers=h)
    refused = _within_a_second(s, created["key"], 401)
    assert refused.json()["error"]["code"] == "key_revoked"

    # A key made by another process (the CLI) reaches the gateway at its next poll.
    made = cli(
        Path(s.env["ONETOKEN_DATA_DIR"]),
        *("keys", "create", "--org", "Default", "--name", "from-cli", "--json"),
        env=s.env,
    )
    cli_key = json.loads(made.stdout)["api_key"]
    wait_until(lambda: _chat(s, cli_key).status_code == 200, 5, 0.1,
               message="the CLI's key served")

    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=60) == 0
    assert time.monotonic() - started < 15


def test_second_demo_run_prints_a_fresh_working_key(tmp_path: Path) -> None:
    first = _start(tmp_path)
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=60) == 0
    second = _start(tmp_path)
    try:
        assert "admin_password" not in second.info
        key = second.info["api_key"]
        assert key != first.info["api_key"]
        assert _chat(second, key).status_code == 200
        # The bootstrap key stays valid; only an earlier "demo session" key is revoked.
        assert _chat(second, first.info["api_key"]).status_code == 200
    finally:
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=60) == 0
    third = _start(tmp_path)
    try:
        assert _chat(third, third.info["api_key"]).status_code == 200
        old = _chat(third, second.info["api_key"])
        assert old.status_code == 401
        assert old.json()["error"]["code"] == "key_revoked"
    finally:
        third.proc.send_signal(signal.SIGTERM)
        assert third.proc.wait(timeout=60) == 0


def _shared_modes(root: Path) -> list[str]:
    """Everything under root (root included) that group or others may use. Symbolic
    links (chDB's metadata has some) have no mode of their own: their targets are in the
    tree and checked there."""
    paths = [root, *root.rglob("*")]
    return [
        f"{p.relative_to(root)} {stat.filemode(p.lstat().st_mode)}"
        for p in paths
        if not p.is_symlink() and p.lstat().st_mode & 0o077
    ]


def test_data_dir_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Started with umask 022, the server still creates nothing group or others can read:
    the data dir, SQLite and its WAL, chDB's tables, the engine's journal, logs, secrets."""
    data_dir = tmp_path / "data"
    previous = os.umask(0o022)  # inherited by the child
    try:
        s = _start(data_dir)
    finally:
        os.umask(previous)
    try:
        assert _chat(s, s.info["api_key"]).status_code == 200
        login = httpx.post(
            f"{s.control}/api/v1/auth/login",
            json={"email": s.info["admin_email"], "password": s.info["admin_password"]},
        )
        assert login.status_code == 200
        names = {p.name for p in data_dir.rglob("*")}
        # What the check below must cover, as the running server has it.
        assert {"control.db", "control.db-wal", "clickhouse", "spool", "onetoken.log"} <= names
        assert any(n.startswith("journal-") for n in names), names
        assert _shared_modes(data_dir) == []
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0
        assert _shared_modes(data_dir) == []
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_gateway_that_cannot_start_stops_serve_with_its_reason(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "ONETOKEN_SECRET_KEY": TEST_SECRET,
            "ONETOKEN_GATEWAY_LISTEN": f"127.0.0.1:{port}",
            "ONETOKEN_CONTROL_LISTEN": "127.0.0.1:0",
        }
        proc = cli(tmp_path, "serve", "--demo", env=env, check=False)
    assert proc.returncode == 2
    assert "onetoken: error: gateway failed to start:" in proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr
    assert "gateway:" not in proc.stdout
