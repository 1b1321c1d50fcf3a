"""`onetoken control` and `onetoken serve`: the control process.

The control process runs the control API (uvicorn) with the gateway channel, ingests the
gateways' journals into the ledger and ClickHouse, and does the background work. `serve`
also starts one `onetoken gateway` child (the Rust engine in a slim process) and restarts
it when it dies.

SIGTERM/SIGINT: the control API stops accepting, the gateway child drains with its grace
period, ingestion catches up to the end of every journal, exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from onetoken.control import (
    Background,
    build_state,
    control_metrics,
    create_app,
    start_background,
)
from onetoken.demo import setup_demo
from onetoken.gateway.runner import http_url
from onetoken.gateway.supervisor import ControlRuntime, GatewayProcess
from onetoken.ingest.ingestor import Ingestor
from onetoken.kit.logging import configure_logging
from onetoken.kit.metrics import Metric, MetricsServer, Registry
from onetoken.kit.telemetry import Export, MetricsExport
from onetoken.ops import control_file
from onetoken.settings import Settings
from onetoken.state import AppState

log = logging.getLogger("onetoken.serve")


class ServeError(Exception):
    """A startup failure with a message fit for the operator (no traceback)."""


def split_hostport(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ServeError(f"invalid address {addr!r}: expected host:port")
    return host.strip("[]"), int(port)


def bind_socket(addr: str) -> socket.socket:
    host, port = split_hostport(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def start_metrics(registry: Registry, listen: str) -> MetricsServer:
    """A metrics listener serving `registry`, started."""
    split_hostport(listen)
    try:
        server = MetricsServer(registry, listen)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    server.start()
    return server


def url(addr: str, tls: bool = False) -> str:
    split_hostport(addr)
    return http_url(addr, tls)


def local_url(addr: str, tls: bool = False) -> str:
    """Where a process on this host reaches a listener bound to `addr` (a wildcard
    address is reached on loopback)."""
    host, port = split_hostport(addr)
    if host in ("0.0.0.0", ""):  # noqa: S104 (recognising it, not binding it)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return url(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", tls)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: it would re-raise the signal after
    shutdown and kill the process before the engine has drained."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def control_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for the control API."""
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        # uvicorn would otherwise rewrite the client address from X-Forwarded-For sent by
        # 127.0.0.1 whatever ONETOKEN_TRUSTED_PROXIES says, letting anyone on the host (or
        # behind a local reverse proxy) forge the address that per-IP login lockout and the
        # security log see. security.net.client_ip believes forwarding headers from the
        # configured proxies only.
        proxy_headers=False,
        # One certificate for both listeners: operators configure TLS once.
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )


def _start_mock_upstream() -> tuple[Any, str]:
    from onetoken import _core

    mock = _core.MockUpstream("127.0.0.1:0")
    return mock, mock.start()


def _apply_providers_file(state: AppState, path: Path) -> None:
    from onetoken.providers.declarative import ProvidersFileError, apply_file, load_file

    try:
        doc = load_file(path)
        with state.session_factory() as session:
            apply_file(session, state.secrets, doc)
            session.commit()
    except ProvidersFileError as exc:
        raise ServeError(f"ONETOKEN_PROVIDERS_FILE: {exc}") from None


# What `serve --demo` lets platform providers reach unless ONETOKEN_UPSTREAM_PRIVATE_CIDRS says.
DEMO_PRIVATE_CIDRS = "127.0.0.0/8"


def check_secret(settings: Settings, *, demo: bool) -> None:
    """Outside --demo the master secret protects key hashes, sessions and credentials at
    rest: a missing, placeholder or weak one stops the server before it opens anything."""
    if demo:
        return
    problem = settings.secret_key_problem()
    if problem is not None:
        raise ServeError(
            f"{problem}. Set ONETOKEN_SECRET_KEY to a random value of at least 32 characters "
            "(for example the output of: python -c 'import secrets; "
            "print(secrets.token_urlsafe(48))') and keep it safe, or run `onetoken serve "
            "--demo` for a local trial with a generated one."
        )


def _remove_stale_backups(settings: Settings, ingestor: Ingestor) -> None:
    """Backup copies a killed `onetoken backup` left (onetoken.backup.snapshot)."""
    from onetoken.backup.snapshot import BackupError, check_embedded, remove_stale_staging

    try:
        check_embedded(settings)
        # Inside read: holding chDB's lock, which keeps an offline `onetoken backup` out.
        removed = ingestor.sink.read(lambda _: remove_stale_staging(settings))
    except BackupError:
        return  # not the embedded default: no staging
    except Exception as exc:
        # chDB not open yet (held by a CLI command): the next start removes them.
        log.warning("backup.stale_staging_kept", extra={"exc_type": type(exc).__name__})
        return
    if removed:
        log.warning("backup.stale_staging_removed", extra={"count": removed})


def start_metric_export(registry: Registry, settings: Settings, endpoint: str) -> MetricsExport:
    """Post `registry` to the OTLP collector every ONETOKEN_OTEL_EXPORT_INTERVAL_MS as
    `<service name>-control`; its failed posts are counted on /metrics."""
    export = MetricsExport(registry, Export(
        endpoint=endpoint,
        ratio=settings.otel_ratio,
        service_name=f"{settings.otel_service_name}-control",
        interval_ms=settings.otel_export_interval_ms,
    ))
    registry.register("otel", lambda: [Metric(
        "onetoken_otel_export_failures_total", "counter",
        "OTLP metric posts of the control process that failed",
    ).add(export.failures)])
    return export.start()


def demo_settings(settings: Settings) -> Settings:
    """What `--demo` changes: platform providers may reach loopback, where its fake
    provider listens (an org's own providers still may not). The webhook and SSO
    allow-lists stay as given: the demo has no receiver or identity provider of its own,
    and one run locally is named with ONETOKEN_WEBHOOK_PRIVATE_CIDRS /
    ONETOKEN_SSO_PRIVATE_CIDRS (docs/sso.md, "Trying it locally")."""
    if settings.upstream_private_cidrs:
        return settings
    return settings.model_copy(update={"upstream_private_cidrs": DEMO_PRIVATE_CIDRS})


def run(settings: Settings, *, demo: bool = False, gateway: bool = True) -> int:
    """`onetoken serve [--demo]` (gateway=True) or `onetoken control` (gateway=False)."""
    check_secret(settings, demo=demo)
    if demo:
        settings = demo_settings(settings)
    configure_logging(settings.log_dir, settings.log_level)
    state = build_state(settings)
    mock: Any = None
    runtime: ControlRuntime | None = None
    child: GatewayProcess | None = None
    background: Background | None = None
    metrics: MetricsServer | None = None
    metric_export: MetricsExport | None = None
    failed: list[str] = []
    try:
        demo_info = None
        if demo:
            if settings.demo_upstream:
                split_hostport(settings.demo_upstream)
                upstream = settings.demo_upstream
            else:
                mock, upstream = _start_mock_upstream()
            demo_info = setup_demo(state.session_factory, state.secrets, upstream)
        if settings.providers_file is not None:
            _apply_providers_file(state, settings.providers_file)

        control_sock = bind_socket(settings.control_listen)
        ingestor = Ingestor(settings, state.session_factory)
        runtime = ControlRuntime(settings, state.secrets, state.session_factory, ingestor)
        # Security log flush, webhooks, key risks and detectors, retention.
        background = start_background(state, ingestor)
        state.runtime = runtime
        state.snapshots = runtime.snapshots
        try:
            runtime.start()
        except Exception as exc:
            control_sock.close()
            raise ServeError(f"ingestion failed to start: {type(exc).__name__}: {exc}") from None
        background.erasures.start()
        _remove_stale_backups(settings, ingestor)
        registry = control_metrics(state, ingestor)
        if settings.otel_endpoint is not None:
            # The same metrics as /metrics, pushed to the collector (docs/observability.md).
            metric_export = start_metric_export(registry, settings, settings.otel_endpoint)
        if settings.control_metrics_listen:
            metrics = start_metrics(registry, settings.control_metrics_listen)
            print(f"control metrics: {url(metrics.address)}", flush=True)

        app = create_app(settings, runtime, state=state)
        tls = settings.tls_cert is not None
        server = _Server(control_config(app, settings))

        def on_signal(signum: int, _: FrameType | None) -> None:
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True
            # A gateway's waiting snapshot poll would hold up uvicorn's shutdown. Not in
            # the handler itself: the interrupted code may hold the lock close() takes.
            threading.Thread(target=state.snapshots.close, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        control_addr = "{}:{}".format(*control_sock.getsockname()[:2])
        announce = _announcer(url(control_addr, tls), demo_info, tls)
        # CLI readers find this process here when chDB is locked (onetoken.ops).
        control = control_file.ControlEndpoint(local_url(control_addr, tls), os.getpid())
        control_file.write(settings.data_dir, control)
        if gateway:

            def on_ready(gateway_addr: str, metrics_addr: str | None) -> None:
                found = dataclasses.replace(
                    control,
                    gateway=local_url(gateway_addr, tls),
                    metrics=local_url(metrics_addr) if metrics_addr else None,
                )
                control_file.write(settings.data_dir, found)
                announce(gateway_addr)

            def on_failed(message: str) -> None:
                failed.append(message)
                server.should_exit = True

            child = GatewayProcess(
                settings,
                control_url=local_url(control_addr, tls),
                token=state.gateway_token,
                on_ready=on_ready,
                on_failed=on_failed,
            )
            child.start()
        else:
            announce(None)
        server.run(sockets=[control_sock])
        if failed:
            raise ServeError(f"gateway failed to start: {failed[0]}")
        return 0
    finally:
        control_file.remove(settings.data_dir, os.getpid())
        if child is not None:
            # Gateways first: their last records are journaled before ingestion catches up.
            child.stop()
        if background is not None:
            # A batch in progress finishes first: it writes through the ingestor's sink.
            background.erasures.stop()
        if runtime is not None:
            runtime.stop()
        if metrics is not None:
            # After ingestion's last catch-up: a scrape meanwhile still sees the backlog go.
            metrics.stop()
        if metric_export is not None:
            metric_export.stop()
        if background is not None:
            background.stop()
        if mock is not None:
            with contextlib.suppress(Exception):
                mock.stop()
        state.db_engine.dispose()
        sys.stdout.flush()


def _announcer(control: str, demo_info: Any, tls: bool) -> Callable[[str | None], None]:
    """Prints the startup lines (scripts and tests parse them) once the gateway serves."""
    lock = threading.Lock()

    def announce(gateway_addr: str | None) -> None:
        with lock:
            if gateway_addr is not None:
                print(f"gateway: {url(gateway_addr, tls)}", flush=True)
            print(f"control: {control}", flush=True)
            # The browser console (docs/console.md); its session cookie is Secure, so a
            # browser keeps it over https or on this machine's loopback address only.
            print(f"console: {control}/", flush=True)
            if demo_info is None or gateway_addr is None:
                return
            print(f"api_key: {demo_info.api_key}", flush=True)
            if demo_info.admin_password is not None:
                print(f"admin_email: {demo_info.admin_email}", flush=True)
                print(f"admin_password: {demo_info.admin_password}", flush=True)
                print("console_sign_in: admin_email and admin_password", flush=True)
            print(
                f"try: curl {url(gateway_addr, tls)}/v1/chat/completions "
                f"-H 'Authorization: Bearer {demo_info.api_key}' "
                "-H 'Content-Type: application/json' "
                '-d \'{"model":"demo-chat","messages":[{"role":"user","content":"hi"}]}\'',
                flush=True,
            )

    return announce
