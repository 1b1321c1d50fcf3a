"""A real onetoken server in a subprocess, driven the way an operator would drive it.

The server runs `onetoken serve --demo` with its own data dir, its listeners (metrics
included) on port 0: the harness learns the addresses from `<data_dir>/control.json`. The
fake provider runs in the test process (onetoken._core.MockUpstream) so tests can count the
calls it receives. Its stdout and stderr go to files under the data dir's logs, so the privacy
audit scans them too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from onetoken.ops import control_file
from tests.support import wait_until

READY_TIMEOUT_S = 90.0


def control_endpoint(data_dir: Path, pid: int) -> control_file.ControlEndpoint | None:
    """The listeners `onetoken serve` (process `pid`) announced in control.json."""
    found = control_file.read(data_dir)
    return found if found is not None and found.pid == pid else None


def cli(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "ONETOKEN_DATA_DIR": str(data_dir), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "onetoken.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"onetoken {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc


@dataclass
class Server:
    data_dir: Path
    upstream: str
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    # Learned from control.json once the server is ready.
    gateway_url: str = ""
    control_url: str = ""
    # The gateway's metrics listener (/metrics is not on the gateway listener).
    metrics_url: str = ""

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ONETOKEN_DATA_DIR": str(self.data_dir),
            "ONETOKEN_GATEWAY_LISTEN": "127.0.0.1:0",
            "ONETOKEN_CONTROL_LISTEN": "127.0.0.1:0",
            "ONETOKEN_METRICS_LISTEN": "127.0.0.1:0",
            "ONETOKEN_DEMO_UPSTREAM": self.upstream,
            "ONETOKEN_FLUSH_INTERVAL_MS": "50",
            # The fake provider is on loopback: platform providers may reach it there.
            "ONETOKEN_UPSTREAM_PRIVATE_CIDRS": "127.0.0.0/8",
            **self.extra_env,
        }

    def start(self) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        out = open(logs / f"serve-{self.runs}.stdout", "wb")
        err = open(logs / f"serve-{self.runs}.stderr", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onetoken.cli", "serve", "--demo"],
            env=self.env(),
            stdout=out,
            stderr=err,
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited early with {proc.returncode}: {self.stderr_tail()}"
                )
            found = control_endpoint(self.data_dir, proc.pid)
            if found is None or found.gateway is None or found.metrics is None:
                return False
            self.gateway_url, self.control_url = found.gateway, found.url
            self.metrics_url = f"{found.metrics}/metrics"
            g = httpx.get(f"{self.gateway_url}/healthz", timeout=1)
            c = httpx.get(f"{self.control_url}/api/openapi.json", timeout=1)
            return g.status_code == 200 and c.status_code == 200

        wait_until(ready, READY_TIMEOUT_S, 0.1, ignore=(httpx.HTTPError,),
                   message=lambda: f"server ready: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        path = self.data_dir / "logs" / f"serve-{self.runs}.stderr"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


class Admin:
    """The control API as an org admin sees it."""

    def __init__(self, server: Server, email: str, password: str) -> None:
        self.http = httpx.Client(base_url=server.control_url, timeout=30)
        r = self.http.post("/api/v1/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        self.http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        # The admin has read the terms of service: accepting the version the server asks
        # for opens the rest of the control API (docs/terms.md).
        self.post("/api/v1/me/terms/accept",
                  {"version": self.get("/api/v1/me/terms")["version"]})

    def get(self, path: str, **kw: Any) -> Any:
        r = self.http.get(path, **kw)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = self.http.post(path, json=body)
        assert r.status_code in (200, 201), f"{path}: {r.status_code} {r.text}"
        return r.json()


@contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()


@contextmanager
def deployed(
    data_dir: Path, upstream: str, extra_env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """A bootstrapped data dir with a running server: {"server", "creds", "data_dir"}."""
    creds = bootstrap(data_dir)
    server = Server(data_dir=data_dir, upstream=upstream, extra_env=extra_env or {})
    server.start()
    try:
        yield {"server": server, "creds": creds, "data_dir": data_dir}
    finally:
        server.kill()


def bootstrap(data_dir: Path) -> dict[str, Any]:
    out = cli(data_dir, "bootstrap", "--json")
    return dict(json.loads(out.stdout))
