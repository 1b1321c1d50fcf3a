"""The control process's side of the gateways: the engine config they are given, the
ingestion and billing upkeep that run beside the control API (ControlRuntime), and the
gateway child `onetoken serve` starts and restarts (GatewayProcess).

Money flow: a gateway's engine counts `spent` per org in memory and journals each record;
the ingestor (onetoken.ingest) writes the records' costs to the ledger and moves that
engine instance's spent marks in the same transaction. A snapshot carries balance =
SUM(ledger) and the instance's spent_mark read under the ingestor's mark lock, so the
engine's available = balance - (spent - spent_mark) - reserved never counts a cost twice
or misses one (SnapshotSource).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from onetoken.billing.upkeep import BillingUpkeep
from onetoken.db.session import SessionFactory
from onetoken.gateway import runner
from onetoken.gateway.snapshot import SnapshotSource
from onetoken.kit.crypto import Secrets
from onetoken.kit.net import networks
from onetoken.kit.worker import LoopThread
from onetoken.settings import Settings

if TYPE_CHECKING:
    from onetoken.analytics.sink import CallLogSink
    from onetoken.ingest.ingestor import Ingestor

log = logging.getLogger("onetoken.gateway")

# A gateway child that dies is restarted after this delay, doubling up to the cap; one
# that ran this long before dying starts the count again.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
RESTART_STABLE_S = 60.0
# Beyond the engine's grace period, before a stopping child is killed.
STOP_MARGIN_S = 5.0
# linux/prctl.h
_PR_SET_PDEATHSIG = 1


def _cidrs(spec: str) -> list[str]:
    """A CIDR-list setting as the engine takes it: one normalised network per entry."""
    return [str(n) for n in networks(spec)]


def _shared(settings: Settings) -> dict[str, Any] | None:
    """The engine's `shared` section: Redis for limits and money shared across gateways,
    or none."""
    if settings.redis_url is None:
        return None
    return {
        "redis_url": settings.redis_url.get_secret_value(),
        "key_prefix": settings.redis_prefix,
    }


def _otel(settings: Settings) -> dict[str, Any] | None:
    """The engine's OTLP export (docs/observability.md), when an endpoint is set."""
    if settings.otel_endpoint is None:
        return None
    return {
        "endpoint": settings.otel_endpoint,
        "ratio": settings.otel_ratio,
        "service_name": f"{settings.otel_service_name}-gateway",
        "export_interval_ms": settings.otel_export_interval_ms,
    }


def engine_config(settings: Settings, secrets: Secrets) -> dict[str, Any]:
    """The engine configuration (tests/contract/engine_config.json)."""
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = {"cert_path": str(settings.tls_cert), "key_path": str(settings.tls_key)}
    config: dict[str, Any] = {
        "listen": settings.gateway_listen,
        "key_hash_secret_hex": secrets.key_hash.hex(),
        "tls": tls,
        "worker_threads": settings.worker_threads,
        "spool_dir": str(settings.spool_dir.resolve()),
        "max_body_bytes": settings.max_body_bytes,
        "max_upload_bytes": settings.max_upload_bytes,
        "shutdown_grace_ms": int(settings.shutdown_grace_seconds * 1000),
        "upstream_private_cidrs": _cidrs(settings.upstream_private_cidrs),
        "trusted_proxies": _cidrs(settings.gateway_trusted_proxies),
        "proxy_protocol": settings.gateway_proxy_protocol,
        "metrics_listen": settings.metrics_listen,
        "max_connections": settings.gateway_max_connections,
        "header_read_timeout_ms": settings.gateway_header_read_timeout_ms,
        "idle_timeout_ms": settings.gateway_idle_timeout_ms,
        "max_header_bytes": settings.gateway_max_header_bytes,
        "max_upstream_event_bytes": settings.upstream_max_event_bytes,
        "max_upstream_body_bytes": settings.upstream_max_body_bytes,
        "upstream_deadline_ms": int(settings.upstream_deadline_seconds * 1000),
        "phase_timing": settings.gateway_phase_timing,
        "shared": _shared(settings),
        "otel": _otel(settings),
    }
    # Optional in docs/snapshot.md; sent only when they differ from the defaults.
    if secrets.key_hash_version != 1:
        config["key_hash_secret_version"] = secrets.key_hash_version
    if secrets.previous_key_hashes:
        config["previous_key_hash_secrets"] = [
            {"version": v, "secret_hex": s.hex()} for v, s in secrets.previous_key_hashes
        ]
    return config


class ControlRuntime:
    """What a serving control process runs beside its API: ingestion of the gateways'
    journals, the snapshots gateways poll, and billing upkeep (due prices and lapsing
    packages, which bump the config revision so the next poll gets a new snapshot)."""

    def __init__(
        self,
        settings: Settings,
        secrets: Secrets,
        session_factory: SessionFactory,
        ingestor: Ingestor,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        # Changes other processes commit reach waiting polls at the watch interval.
        self.snapshots = SnapshotSource(
            secrets,
            session_factory,
            ingestor.mark_lock,
            recheck_s=settings.config_watch_interval_ms / 1000,
        )
        # Due prices and lapsing packages (the ingestor raises the usage events itself).
        self._billing = BillingUpkeep(session_factory)
        self._upkeep = LoopThread("onetoken-upkeep", self._upkeep_loop)
        self._stopped = False

    @property
    def sink(self) -> CallLogSink:
        """The ClickHouse reader of call_log (and the security log): the ingestor's."""
        return self.ingestor.sink

    def start(self) -> None:
        self.ingestor.start()
        self._upkeep.start()

    def _upkeep_loop(self) -> None:
        interval = self.settings.config_watch_interval_ms / 1000
        while not self._upkeep.stopping.wait(interval):
            try:
                self._billing.tick()
            except Exception as exc:
                log.warning("billing.upkeep_failed", extra={"exc_type": type(exc).__name__})

    def stop(self) -> None:
        """After the gateways stopped: ingest to the end of every journal. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._upkeep.stop(timeout=30)
        self.ingestor.stop()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec function: the child gets SIGKILL when the thread that started it ends
    (the supervising thread lives as long as the child), so a `serve` killed with SIGKILL
    leaves no gateway holding the data dir. SIGKILL, not SIGTERM: the journal is durable
    before a response ends, and a draining orphan would keep the next serve's gateway
    from the data dir's lock for its grace period.

    Everything is resolved before the fork: between fork and exec the child of a
    threaded process may not take locks another thread held (malloc's among them), so it
    only makes the one call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    args = (_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    getppid, exit_now = os.getppid, os._exit

    def preexec() -> None:
        prctl(*args)
        if getppid() != parent_pid:  # the parent died before prctl took effect
            exit_now(1)

    return preexec


def gateway_command() -> list[str]:
    return [sys.executable, "-m", "onetoken.cli", "gateway"]


class GatewayProcess:
    """One `onetoken gateway` child of `onetoken serve`, restarted with backoff when it
    dies. The child reports "ready <address> [<metrics address>]" or "error <message>" on a
    pipe; after the first start it is restarted on the addresses it bound
    (ONETOKEN_GATEWAY_LISTEN and ONETOKEN_METRICS_LISTEN may say port 0). Its records
    survive it in the journal, which the ingestor reads."""

    def __init__(
        self,
        settings: Settings,
        *,
        control_url: str,
        token: str,
        on_ready: Callable[[str, str | None], None],
        on_failed: Callable[[str], None],
        command: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.control_url = control_url
        self.token = token
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._command = command or gateway_command()
        self._listen = settings.gateway_listen
        self._metrics_listen: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.address: str | None = None
        self.metrics_address: str | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def child_env(self, ready_fd: int) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            # The gateway authenticates with its channel token; it never needs the
            # master secret that derives every other key.
            if k not in ("ONETOKEN_SECRET_KEY", "ONETOKEN_PREVIOUS_SECRET_KEYS")
        }
        env.update(
            {
                "ONETOKEN_CONTROL_URL": self.control_url,
                runner.TOKEN_ENV: self.token,
                runner.READY_FD_ENV: str(ready_fd),
                "ONETOKEN_GATEWAY_LISTEN": self._listen,
                "ONETOKEN_DATA_DIR": str(self.settings.data_dir.resolve()),
                "ONETOKEN_CONFIG_WATCH_INTERVAL_MS": str(self.settings.config_watch_interval_ms),
                "ONETOKEN_LOG_LEVEL": self.settings.log_level,
            }
        )
        if self._metrics_listen is not None:
            env["ONETOKEN_METRICS_LISTEN"] = self._metrics_listen
        return env

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._supervise, name="onetoken-gateway", daemon=True
        )
        self._thread.start()

    def _spawn(self) -> tuple[subprocess.Popen[bytes], str] | None:
        """Start a child and wait for its report; None when stopping."""
        read_fd, write_fd = os.pipe()
        try:
            with self._lock:
                if self._stopping.is_set():
                    return None
                proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                    self._command,
                    env=self.child_env(write_fd),
                    pass_fds=(write_fd,),
                    preexec_fn=_die_with_parent(os.getpid()),
                    # Its own process group: a terminal's Ctrl-C or a `timeout` reaches the
                    # parent only, which stops the gateway first and ingests after it.
                    process_group=0,
                    stdin=subprocess.DEVNULL,
                )
                self._proc = proc
                self.starts += 1
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reader:
            report = reader.readline().decode(errors="replace").strip()
        return proc, report

    def _supervise(self) -> None:
        delay = RESTART_FIRST_S
        while not self._stopping.is_set():
            started = time.monotonic()
            spawned = self._spawn()
            if spawned is None:
                return
            proc, report = spawned
            verb, _, detail = report.partition(" ")
            if verb == "ready":
                log.info("gateway.child_ready", extra={"address": detail, "count": self.starts})
                if self.address is None:
                    self.address, self.metrics_address = runner.parse_ready(detail)
                    # Restarts bind the same addresses, whatever port the settings asked for.
                    self._listen, self._metrics_listen = self.address, self.metrics_address
                    self._on_ready(self.address, self.metrics_address)
            elif self.address is None and not self._stopping.is_set():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=STOP_MARGIN_S)
                self._on_failed(detail or f"the gateway exited with status {proc.poll()}")
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            log.error("gateway.child_died", extra={"status": code, "count": self.starts})
            if time.monotonic() - started >= RESTART_STABLE_S:
                delay = RESTART_FIRST_S
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_MAX_S)

    def stop(self, grace_seconds: float | None = None) -> int | None:
        """SIGTERM the child and wait for its drain (grace period, then SIGKILL).
        Returns its exit status (None when none was running). Idempotent."""
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._stopping.set()
        with self._lock:
            proc = self._proc
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                log.info("gateway.child_stopping", extra={"grace_seconds": grace})
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=grace + STOP_MARGIN_S)
            except subprocess.TimeoutExpired:
                log.error("gateway.child_killed", extra={"grace_seconds": grace})
                proc.kill()
                code = proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=STOP_MARGIN_S)
        return code
