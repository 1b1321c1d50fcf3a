"""`onetoken gateway`: the Rust engine in a process of its own.

It takes its engine config and its snapshots from the control process over the gateway
channel (`/internal/gateway/*`, bearer token `kit.channel.GATEWAY`), serves `/v1` on the
engine's own tokio workers, and journals every record into the data dir's spool, where
the control process ingests it. It never opens the control DB or ClickHouse.

While the control process is unreachable it keeps serving on the last snapshot it loaded
and tells the engine (`/healthz` and `/metrics` say so). SIGTERM/SIGINT: the engine stops
with its grace period, exit 0.

Imports only the standard library, orjson, the extension and stdlib-only onetoken
modules: FastAPI, SQLAlchemy, pydantic and the ClickHouse clients would make this process
as big as the control plane (tests/unit/test_gateway_runner.py checks it).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import orjson

from onetoken.kit import channel
from onetoken.kit.logging import configure_logging

log = logging.getLogger("onetoken.gateway")

DEFAULT_CONTROL_LISTEN = "127.0.0.1:8081"
DEFAULT_WATCH_INTERVAL_MS = 500
# One channel request; a control process slower than this counts as unreachable.
REQUEST_TIMEOUT_S = 5.0
# A snapshot poll waits this long at the control process for a change (long poll), so
# a change made through the API reaches the engine at once. Each answer (304 included)
# confirms the serving snapshot: /healthz's snapshot_age_seconds stays below this while
# the control process is up.
LONG_POLL_S = 5.0
# Waiting for the control process at start: first retry, then doubling up to the cap.
_RETRY_FIRST_S = 0.1
_RETRY_MAX_S = 5.0
# Same rule as Settings.secret_key_bytes (the generated per-data-dir secret).
SECRET_KEY_FILE = "secret.key"  # noqa: S105 (a file name)
# Set by `onetoken serve` for its child: where to report "ready <address> [<metrics
# address>]" or "error <message>" instead of printing the address on stdout.
READY_FD_ENV = "ONETOKEN_GATEWAY_READY_FD"
TOKEN_ENV = "ONETOKEN_GATEWAY_TOKEN"  # noqa: S105 (a variable name)
POOL_ENV = "ONETOKEN_GATEWAY_POOL"
# onetoken.orgs.terms.POOL_NAME (not imported: it would bring SQLAlchemy into this process).
_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class GatewayError(Exception):
    """A start failure with a message fit for the operator."""


class EngineLike(Protocol):
    def start(self) -> str: ...
    def load_snapshot(self, snapshot_json: bytes) -> int: ...
    def set_control_status(self, reachable: bool) -> None: ...
    def stop(self, grace_seconds: float | None = None) -> None: ...
    @property
    def instance_id(self) -> str: ...
    @property
    def metrics_address(self) -> str | None: ...


class ChannelError(Exception):
    """The control process did not answer a channel request with what was asked."""


@dataclass(frozen=True)
class GatewayEnv:
    """What the gateway process reads from its environment."""

    control_url: str
    token: str
    listen: str | None
    metrics_listen: str | None
    data_dir: Path | None
    watch_interval_s: float
    ca_file: str | None
    log_level: str
    ready_fd: int | None
    # ONETOKEN_REDIS_URL of this process, over the one the control plane sends.
    redis_url: str | None = None
    # The dedicated gateway pool served (docs/pools.md); None: the shared gateways.
    pool: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pool: str | None = None) -> GatewayEnv:
        """`pool` (`--pool`) wins over ONETOKEN_GATEWAY_POOL."""
        pool = pool or environ.get(POOL_ENV) or None
        if pool is not None and not _POOL_NAME.fullmatch(pool):
            raise GatewayError(
                "a gateway pool name is lowercase letters, digits and dashes, at most 32"
            )
        tls_cert = environ.get("ONETOKEN_TLS_CERT") or None
        control_url = environ.get("ONETOKEN_CONTROL_URL") or "{}://{}".format(
            "https" if tls_cert else "http",
            environ.get("ONETOKEN_CONTROL_LISTEN") or DEFAULT_CONTROL_LISTEN,
        )
        data_dir = Path(environ.get("ONETOKEN_DATA_DIR") or "./.onetoken")
        token = environ.get(TOKEN_ENV) or channel.channel_token(
            _master_secret(environ, data_dir), channel.GATEWAY
        )
        try:
            interval_ms = int(
                environ.get("ONETOKEN_CONFIG_WATCH_INTERVAL_MS") or DEFAULT_WATCH_INTERVAL_MS
            )
            ready_fd = int(environ[READY_FD_ENV]) if environ.get(READY_FD_ENV) else None
        except ValueError:
            raise GatewayError(
                f"ONETOKEN_CONFIG_WATCH_INTERVAL_MS and {READY_FD_ENV} must be whole numbers"
            ) from None
        return cls(
            control_url=control_url.rstrip("/"),
            token=token,
            listen=environ.get("ONETOKEN_GATEWAY_LISTEN") or None,
            metrics_listen=environ.get("ONETOKEN_METRICS_LISTEN") or None,
            data_dir=data_dir if environ.get("ONETOKEN_DATA_DIR") else None,
            watch_interval_s=max(interval_ms, 50) / 1000,
            ca_file=tls_cert,
            log_level=(environ.get("ONETOKEN_LOG_LEVEL") or "INFO").upper(),
            ready_fd=ready_fd,
            redis_url=environ.get("ONETOKEN_REDIS_URL") or None,
            pool=pool,
        )


def _master_secret(environ: Mapping[str, str], data_dir: Path) -> bytes:
    """ONETOKEN_SECRET_KEY, else the secret the control process generated in the data
    dir (the gateway never generates one: it would not match the control's)."""
    if value := environ.get("ONETOKEN_SECRET_KEY"):
        return value.encode()
    path = data_dir / SECRET_KEY_FILE
    try:
        return path.read_text().strip().encode()
    except FileNotFoundError:
        raise GatewayError(
            f"no gateway token: set {TOKEN_ENV} or ONETOKEN_SECRET_KEY, or share the "
            f"control process's data dir ({path} does not exist)"
        ) from None


def _pinned_context(ca_file: str | None) -> ssl.SSLContext:
    """Without `ca_file`, the system's CAs. With it (ONETOKEN_TLS_CERT, the certificate the
    control listener serves), that certificate is the one trust anchor: itself accepted
    as the end of the chain, and not checked against the host name, which for `serve`'s
    child is a loopback address the certificate does not name."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if ca_file is not None:
        ctx.check_hostname = False
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


class ControlChannel:
    """The gateway's end of the gateway channel (plain HTTP(S), one request at a time)."""

    def __init__(self, base_url: str, token: str, *, ca_file: str | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise GatewayError(f"ONETOKEN_CONTROL_URL must be an http(s) URL, not {base_url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._ssl = _pinned_context(ca_file) if self._https else None

    def _get(
        self, path: str, headers: Mapping[str, str], wait_s: float = 0.0
    ) -> tuple[int, Mapping[str, str], bytes]:
        conn: http.client.HTTPConnection
        timeout = REQUEST_TIMEOUT_S + wait_s
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            conn.request("GET", self._prefix + path, headers={**self._headers, **headers})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ChannelError(type(exc).__name__) from None
        finally:
            conn.close()

    def config(self) -> dict[str, Any]:
        status, _, body = self._get("/internal/gateway/config", {})
        if status != 200:
            raise ChannelError(f"config answered {status}")
        config = orjson.loads(body)
        if not isinstance(config, dict):
            raise ChannelError("config is not an object")
        return config

    def snapshot(
        self, instance: str, etag: str | None, wait_s: float = 0.0, pool: str | None = None
    ) -> tuple[str | None, bytes | None]:
        """(etag, snapshot JSON) for the gateways of `pool` (None: the shared ones), or
        (etag, None) when the one tagged `etag` is current (after waiting up to `wait_s`
        at the control process for a change)."""
        query = f"instance={quote(instance, safe='')}"
        if pool is not None:
            query += f"&pool={quote(pool, safe='')}"
        if wait_s > 0:
            query += f"&wait={wait_s:g}"
        status, headers, body = self._get(
            f"/internal/gateway/snapshot?{query}",
            {"If-None-Match": etag} if etag else {},
            wait_s,
        )
        if status == 304:
            return etag, None
        if status != 200:
            raise ChannelError(f"snapshot answered {status}")
        return headers.get("etag"), body


class GatewayRunner:
    """Fetch the config, start the engine, keep its snapshot current; `run` until stopped."""

    def __init__(
        self,
        env: GatewayEnv,
        *,
        channel_client: ControlChannel | None = None,
        engine_factory: Callable[[bytes], EngineLike] | None = None,
    ) -> None:
        self.env = env
        self.channel = channel_client or ControlChannel(
            env.control_url, env.token, ca_file=env.ca_file
        )
        self._engine_factory = engine_factory or _default_engine_factory
        self.engine: EngineLike | None = None
        self.address: str | None = None
        # The metrics listener's bound address (metrics_listen may say port 0).
        self.metrics_address: str | None = None
        self.tls = False
        self._etag: str | None = None
        # Snapshots loaded so far.
        self.loads = 0
        self._reachable: bool | None = None
        self.stopping = threading.Event()

    def engine_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The control's config with what this process's environment says about itself:
        where it listens, which data dir it journals into, and which Redis it shares
        limits and money through (a gateway may reach Redis by another address than the control
        plane)."""
        out = dict(config)
        if self.env.listen is not None:
            out["listen"] = self.env.listen
        if self.env.metrics_listen is not None:
            out["metrics_listen"] = self.env.metrics_listen
        if self.env.data_dir is not None:
            spool = self.env.data_dir / "spool"
            if self.env.pool is not None:
                # A pool's journals apart from the shared gateways'; the ingestor finds them here
                # (onetoken.ingest.journal.pool_spool_dir, not imported: SQLAlchemy).
                spool = spool / "pools" / self.env.pool
            out["spool_dir"] = str(spool.resolve())
        if self.env.redis_url is not None:
            out["shared"] = {**(config.get("shared") or {}), "redis_url": self.env.redis_url}
        return out

    def start(self) -> str:
        """Wait for the control process, start the engine on its config and load the first
        snapshot; returns the address served. GatewayError: the engine refused the config
        or the address, another gateway serves the data dir, or stopped while waiting."""
        config = self._until_answered(self.channel.config, "config")
        self.tls = config.get("tls") is not None
        engine = self._engine_factory(orjson.dumps(self.engine_config(config)))
        try:
            self.address = engine.start()
        except Exception as exc:
            raise GatewayError(f"{type(exc).__name__}: {exc}") from None
        self.engine = engine
        self.metrics_address = engine.metrics_address
        # Serving needs a snapshot: ask until one loads (or stopped).
        while not self.poll() or self.loads == 0:
            if self.stopping.wait(self.env.watch_interval_s):
                break
        log.info(
            "gateway.started",
            extra={"address": self.address, "instance_id": engine.instance_id,
                   "pool": self.env.pool},
        )
        return self.address

    def _until_answered(self, fetch: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
        delay = _RETRY_FIRST_S
        while True:
            try:
                return fetch()
            except (ChannelError, ValueError) as exc:
                log.warning(
                    "gateway.control_unreachable",
                    extra={"exc_type": type(exc).__name__, "kind": what},
                )
            if self.stopping.wait(delay):
                raise GatewayError("stopped before the control process answered")
            delay = min(delay * 2, _RETRY_MAX_S)

    def poll(self, wait_s: float = 0.0) -> bool:
        """Ask for a newer snapshot (waiting up to `wait_s` for one) and load it; tell the
        engine whether the control process answered. True when it did."""
        engine = self.engine
        if engine is None:
            return False
        try:
            etag, body = self.channel.snapshot(
                engine.instance_id, self._etag, wait_s if self._etag else 0.0, self.env.pool
            )
        except ChannelError as exc:
            self._set_reachable(engine, False, exc)
            return False
        if body is not None:
            try:
                version = engine.load_snapshot(body)
            except Exception as exc:
                # The previous snapshot keeps serving; the message may name config values.
                log.error("snapshot.rejected", extra={"exc_type": type(exc).__name__})
                self._set_reachable(engine, True, None)
                return False
            self._etag = etag
            self.loads += 1
            log.debug("snapshot.loaded", extra={"version": version})
            _log_dropped(engine, version)
        self._set_reachable(engine, True, None)
        return True

    def _set_reachable(self, engine: EngineLike, reachable: bool, exc: Exception | None) -> None:
        engine.set_control_status(reachable)
        if reachable != self._reachable:
            if reachable:
                log.info("gateway.control_reachable")
            else:
                log.warning(
                    "gateway.control_unreachable",
                    extra={"exc_type": type(exc).__name__ if exc else None},
                )
        self._reachable = reachable

    def run(self) -> None:
        """Poll until `stopping` is set, then stop the engine with its configured grace. The
        polls run on a thread of their own: a long poll must not hold up the stop."""
        poller = threading.Thread(target=self._poll_loop, name="onetoken-poll", daemon=True)
        poller.start()
        self.stopping.wait()
        self.stop()

    def _poll_loop(self) -> None:
        while not self.stopping.is_set():
            began, loads = time.monotonic(), self.loads
            try:
                answered = self.poll(LONG_POLL_S)
            except Exception as exc:
                log.error("gateway.poll_failed", extra={"exc_type": type(exc).__name__})
                answered = False
            # A new snapshot: poll again at once (that poll confirms it to the control
            # process). Nothing new: never sooner than the watch interval after the last
            # poll began (a control process that answers without waiting is not polled in
            # a busy loop). A failure: the watch interval before the next try.
            pause = self.env.watch_interval_s
            if answered and self.loads != loads:
                pause = 0.0
            elif answered:
                pause -= time.monotonic() - began
            if pause > 0 and self.stopping.wait(pause):
                return

    def stop(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            log.info("gateway.stopping")
            engine.stop()
            log.info("gateway.stopped")


_ID_FIELD = {"org": "org_id", "guard": "org_id", "key": "key_id", "provider": "provider_id"}


def _log_dropped(engine: EngineLike, version: int) -> None:
    """Entries the engine left out of the snapshot it now serves (the rest serves):
    kind, reason code and the id when it is one the log may carry; names are left out."""
    report = getattr(engine, "snapshot_dropped", None)
    for entry in report() if report is not None else []:
        extra = {"kind": entry["kind"], "error_code": entry["reason"], "version": version}
        if (field := _ID_FIELD.get(entry["kind"])) is not None:
            extra[field] = entry["id"]
        log.warning("snapshot.entry_dropped", extra=extra)


def _default_engine_factory(config_json: bytes) -> EngineLike:
    from onetoken import _core

    engine: EngineLike = _core.Engine(config_json)
    return engine


def http_url(address: str, tls: bool = False) -> str:
    """`host:port` as the URL clients use (IPv6 hosts in brackets)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def ready_line(address: str, metrics_address: str | None) -> str:
    """What a started gateway reports on the ready pipe (read by [`parse_ready`])."""
    return f"ready {address} {metrics_address}" if metrics_address else f"ready {address}"


def parse_ready(detail: str) -> tuple[str, str | None]:
    """The served address and the metrics address (None without a metrics listener) of
    a ready report without its verb."""
    address, _, metrics_address = detail.partition(" ")
    return address, metrics_address or None


def _report(ready_fd: int | None, line: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, (line + "\n").encode())
    finally:
        os.close(ready_fd)


def main(environ: Mapping[str, str] | None = None, pool: str | None = None) -> int:
    """The `onetoken gateway [--pool NAME]` command; returns the exit code (2: could not
    start)."""
    env_map = os.environ if environ is None else environ
    try:
        env = GatewayEnv.from_environ(env_map, pool)
    except GatewayError as exc:
        print(f"onetoken: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(env.data_dir / "logs" if env.data_dir else None, env.log_level)
    try:
        runner = GatewayRunner(env)
    except GatewayError as exc:
        _report(env.ready_fd, f"error {exc}")
        print(f"onetoken: error: {exc}", file=sys.stderr)
        return 2

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        runner.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        address = runner.start()
    except GatewayError as exc:
        _report(env.ready_fd, f"error {exc}")
        print(f"onetoken: error: gateway failed to start: {exc}", file=sys.stderr)
        return 2
    if env.ready_fd is not None:
        _report(env.ready_fd, ready_line(address, runner.metrics_address))
    else:
        print(f"gateway: {http_url(address, runner.tls)}", flush=True)
        if runner.metrics_address is not None:
            print(f"metrics: {http_url(runner.metrics_address)}", flush=True)
    runner.run()
    return 0
