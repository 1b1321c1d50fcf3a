"""The control process's side of the gateways: ControlRuntime (ingestion, snapshots,
upkeep) and GatewayProcess (the supervised `onetoken gateway` child), the latter with a
stand-in child that speaks the ready-pipe protocol."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from onetoken import _core
from onetoken.gateway import supervisor as supervisor_mod
from onetoken.gateway.supervisor import ControlRuntime, GatewayProcess, engine_config
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.support import wait_until
from tests.unit.conftest import contract

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"

# A stand-in for `onetoken gateway`: reports on the ready pipe like the real one, records
# its pid and environment, and exits 0 on SIGTERM (FAKE_GATEWAY=error: fails to start).
FAKE_CHILD = r"""
import os, signal, sys
log = sys.argv[1]
listen = os.environ["ONETOKEN_GATEWAY_LISTEN"]
metrics = os.environ.get("ONETOKEN_METRICS_LISTEN", "")
with open(log, "a") as f:
    f.write(f"{os.getpid()} {listen} {'ONETOKEN_SECRET_KEY' in os.environ} "
            f"{os.environ['ONETOKEN_GATEWAY_TOKEN']} {os.environ['ONETOKEN_CONTROL_URL']} "
            f"{metrics or '-'}\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
fd = int(os.environ["ONETOKEN_GATEWAY_READY_FD"])
if os.environ.get("FAKE_GATEWAY") == "error":
    os.write(fd, b"error another gateway is serving data dir /x\n")
    sys.exit(2)
def bound(addr, port_zero):
    host, _, port = addr.rpartition(":")
    return f"{host}:{port if port != '0' else port_zero}"
report = f"ready {bound(listen, '45678')}"
if metrics:
    report += f" {bound(metrics, '45679')}"
os.write(fd, f"{report}\n".encode())
os.close(fd)
while True:
    signal.pause()
"""


class Events:
    def __init__(self) -> None:
        self.ready: list[tuple[str, str | None]] = []
        self.failed: list[str] = []
        self.changed = threading.Condition()

    def on_ready(self, address: str, metrics_address: str | None) -> None:
        with self.changed:
            self.ready.append((address, metrics_address))
            self.changed.notify_all()

    def on_failed(self, message: str) -> None:
        with self.changed:
            self.failed.append(message)
            self.changed.notify_all()

    def wait(self, until: Callable[[], bool], timeout: float = 20) -> None:
        with self.changed:
            assert self.changed.wait_for(until, timeout=timeout)


def _children(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def fast_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_mod, "RESTART_FIRST_S", 0.05)


def _process(settings: Settings, log: Path, events: Events) -> GatewayProcess:
    settings.gateway_listen = "127.0.0.1:0"
    return GatewayProcess(
        settings,
        control_url="http://127.0.0.1:9",
        token="tok",
        on_ready=events.on_ready,
        on_failed=events.on_failed,
        command=[sys.executable, "-c", FAKE_CHILD, str(log)],
    )


def test_engine_config_has_the_contract_shape(settings: Settings, state: AppState) -> None:
    config = engine_config(settings, state.secrets)
    assert set(config) == set(contract("engine_config.json"))
    assert config["spool_dir"] == str(settings.spool_dir.resolve())
    assert config["shared"] is None


def test_a_redis_url_shares_money_through_it(settings: Settings, state: AppState) -> None:
    settings.redis_url = SecretStr("redis://:pw@10.0.0.5:6379/0")
    config = engine_config(settings, state.secrets)
    assert config["shared"] == {"redis_url": "redis://:pw@10.0.0.5:6379/0", "key_prefix": "ot:"}
    # The engine takes it, its other shared knobs at their defaults.
    _core.Engine(orjson.dumps({**config, "listen": "127.0.0.1:0"}))


def test_child_is_started_with_the_channel_and_without_the_master_secret(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONETOKEN_SECRET_KEY", "x" * 40)
    log, events = tmp_path / "children", Events()
    gw = _process(settings, log, events)
    gw.start()
    try:
        events.wait(lambda: bool(events.ready))
        assert events.ready == [("127.0.0.1:45678", None)]
        ((pid, listen, has_secret, token, url, _metrics),) = _children(log)
        # Its own process group: a terminal's signal reaches only serve, which orders the stop.
        assert os.getpgid(int(pid)) == int(pid) != os.getpgid(0)
        assert (listen, has_secret, token, url) == (
            "127.0.0.1:0",
            "False",
            "tok",
            "http://127.0.0.1:9",
        )
    finally:
        assert gw.stop(1) == 0


def test_dead_child_is_restarted_on_the_address_it_bound(
    settings: Settings, tmp_path: Path, fast_restarts: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONETOKEN_METRICS_LISTEN", "127.0.0.1:0")
    log, events = tmp_path / "children", Events()
    gw = _process(settings, log, events)
    gw.start()
    try:
        events.wait(lambda: bool(events.ready))
        first = int(_children(log)[0][0])
        os.kill(first, signal.SIGKILL)
        wait_until(
            lambda: len(_children(log)) == 2 and gw.pid is not None and gw.pid != first, 20, 0.02
        )
        first_listen, second = _children(log)[0], _children(log)[1]
        assert (first_listen[1], first_listen[5]) == ("127.0.0.1:0", "127.0.0.1:0")
        # Port 0 was resolved once: clients (and scrapers) keep finding the gateway where
        # it was.
        assert (second[1], second[5]) == ("127.0.0.1:45678", "127.0.0.1:45679")
        assert events.ready == [("127.0.0.1:45678", "127.0.0.1:45679")]  # announced once
        assert gw.starts == 2 and not events.failed
    finally:
        gw.stop(1)
    assert not _alive(int(_children(log)[1][0]))


def test_first_start_failure_is_reported_not_retried(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_restarts: None
) -> None:
    monkeypatch.setenv("FAKE_GATEWAY", "error")
    log, events = tmp_path / "children", Events()
    gw = _process(settings, log, events)
    gw.start()
    events.wait(lambda: bool(events.failed))
    assert events.failed == ["another gateway is serving data dir /x"]
    gw.stop(1)
    assert len(_children(log)) == 1 and not events.ready


def test_stop_sigterms_and_waits_then_kills_a_stuck_child(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, events = tmp_path / "children", Events()
    stuck = FAKE_CHILD.replace("lambda *_: sys.exit(0)", "signal.SIG_IGN")
    gw = _process(settings, log, events)
    gw._command = [sys.executable, "-c", stuck, str(log)]
    gw.start()
    events.wait(lambda: bool(events.ready))
    monkeypatch.setattr(supervisor_mod, "STOP_MARGIN_S", 0.2)
    began = time.monotonic()
    assert gw.stop(0.3) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - began < 10


PARENT = r"""
import signal, sys, threading
sys.path.insert(0, sys.argv[1])
from onetoken.gateway.supervisor import GatewayProcess
from onetoken.settings import Settings
ready = threading.Event()
gw = GatewayProcess(
    Settings(data_dir=sys.argv[3], gateway_listen="127.0.0.1:0"),
    control_url="http://127.0.0.1:9", token="tok",
    on_ready=lambda *_: ready.set(), on_failed=print,
    command=[sys.executable, "-c", sys.argv[2], sys.argv[4]],
)
gw.start()
ready.wait()
print(gw.pid, flush=True)
signal.pause()  # until the test kills it
"""


def test_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A serve killed with SIGKILL must not leave its gateway holding the data dir."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PARENT,
            str(PYTHON_DIR),
            FAKE_CHILD,
            str(tmp_path / "d"),
            str(tmp_path / "log"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(timeout=10)
        wait_until(lambda: not _alive(child), 10, 0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child and _alive(child):  # the test failed: leave no orphan behind
            os.kill(child, signal.SIGKILL)


# -- ControlRuntime ------------------------------------------------------------------------


class FakeIngestor:
    """The Ingestor's interface (onetoken.ingest) as ControlRuntime uses it."""

    def __init__(self) -> None:
        self.mark_lock = threading.Lock()
        self.batch_observers: list[Callable[[dict[str, list[Any]]], None]] = []
        self.flush_hooks: list[Callable[[], None]] = []
        self.sink = object()
        self.rows_ingested = 0
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def catch_up(self) -> int:
        return 0

    def stop(self) -> None:
        self.calls.append("stop")


@pytest.fixture
def runtime(settings: Settings, state: AppState) -> Iterator[tuple[ControlRuntime, FakeIngestor]]:
    ingestor = FakeIngestor()
    rt = ControlRuntime(settings, state.secrets, state.session_factory, ingestor)  # type: ignore[arg-type]
    yield rt, ingestor
    rt.stop()


def test_runtime_serves_snapshots_under_the_ingestors_mark_lock(
    runtime: tuple[ControlRuntime, FakeIngestor],
) -> None:
    rt, ingestor = runtime
    assert rt.snapshots.mark_lock is ingestor.mark_lock
    assert rt.sink is ingestor.sink


def test_runtime_starts_and_stops_ingestion_once(
    runtime: tuple[ControlRuntime, FakeIngestor],
) -> None:
    rt, ingestor = runtime
    rt.start()
    rt.stop()
    rt.stop()
    assert ingestor.calls == ["start", "stop"]


def test_runtime_runs_billing_upkeep_while_started(
    settings: Settings, state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Due prices and lapsing packages are applied in the background (each commits a new
    config revision, which the gateways' next poll picks up)."""
    settings.config_watch_interval_ms = 50
    rt = ControlRuntime(settings, state.secrets, state.session_factory, FakeIngestor())  # type: ignore[arg-type]
    ticks = threading.Semaphore(0)
    monkeypatch.setattr(rt._billing, "tick", lambda: bool(ticks.release()))
    rt.start()
    try:
        assert ticks.acquire(timeout=5) and ticks.acquire(timeout=5)
    finally:
        rt.stop()
