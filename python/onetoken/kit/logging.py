"""Structured JSON-lines logging with an allow-list of fields.

A field not on the allow-list is dropped, whatever the caller passed. Messages from
onetoken loggers must be event names (`auth.login_failed`); messages from other libraries
are not copied, because their texts can embed data (SQL parameters, headers).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime
from logging.handlers import WatchedFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from onetoken.kit.files import private_dir, private_file

if TYPE_CHECKING:
    from collections.abc import Callable

    # Annotations only: the slim gateway process logs through this module without Starlette.
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOWED_FIELDS = frozenset(
    {
        "request_id",
        "org_id",
        "account_id",
        "key_id",
        "provider_id",
        "model_id",
        "path",
        "method",
        "status",
        "latency_ms",
        "error_code",
        "count",
        "version",
        "rows",
        "spooled",
        "replayed",
        "instance_id",
        "address",
        "role",
        "kind",
        "exc_type",
        "stack",
        "revision",
        "grace_seconds",
        # A gateway pool's name (operator-chosen, lowercase letters, digits and dashes).
        "pool",
    }
)
_EVENT_RE = re.compile(r"^[a-z0-9_.]{1,80}$")
# Lines uvicorn writes at start/stop; safe and useful to operators.
_FOREIGN_EVENTS = {"uvicorn.error": "uvicorn", "uvicorn": "uvicorn"}


def _safe_stack(exc_info: Any) -> str | None:
    # Frames only (file, line, function): exception messages may carry data.
    if not exc_info or exc_info[2] is None:
        return None
    frames = traceback.extract_tb(exc_info[2])
    return " < ".join(
        f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-12:])
    )


class ForeignInfoFilter(logging.Filter):
    """Drops other libraries' records below WARNING: with their text removed they say
    nothing, and onetoken logs its own lifecycle events."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("onetoken") or record.levelno >= logging.WARNING


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith("onetoken"):
            msg = record.msg if isinstance(record.msg, str) else ""
            event = msg if _EVENT_RE.match(msg) else "unnamed_event"
        else:
            event = f"lib.{_FOREIGN_EVENTS.get(record.name, record.name.split('.')[0])}"
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": event,
            "logger": record.name,
        }
        for name in ALLOWED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None and isinstance(value, str | int | float | bool):
                out[name] = value
        if record.exc_info:
            out.setdefault("exc_type", getattr(record.exc_info[0], "__name__", "Exception"))
            stack = _safe_stack(record.exc_info)
            if stack:
                out["stack"] = stack
        return orjson.dumps(out).decode()


_configured = False


def configure_logging(
    log_dir: Path | None, level: str = "INFO", *, stderr_level: str | None = None
) -> None:
    """JSON lines to stderr and, when given, <log_dir>/onetoken.log. Idempotent.

    `stderr_level` raises the threshold on stderr only (CLI commands whose stdout or
    stderr is read by scripts)."""
    global _configured
    root = logging.getLogger()
    if _configured:
        root.setLevel(level)
        return
    formatter = JsonFormatter()
    stderr = logging.StreamHandler(sys.stderr)
    if stderr_level is not None:
        stderr.setLevel(stderr_level)
    handlers: list[logging.Handler] = [stderr]
    if log_dir is not None:
        log_file = private_file(private_dir(log_dir) / "onetoken.log")
        handlers.append(WatchedFileHandler(log_file, encoding="utf-8"))
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(formatter)
        h.addFilter(ForeignInfoFilter())
        root.addHandler(h)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # The access log carries raw paths and query strings; AccessLogMiddleware replaces it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.access").propagate = False
    # SQLAlchemy echo would print statements with parameters.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    # Alembic's info lines carry no allow-listed data; onetoken logs db.migrated itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _configured = True


access_log = logging.getLogger("onetoken.access")
# Polled by every gateway twice a second: answered ones are logged at DEBUG only. A poll
# is held open until the config changes, so its duration is no response time either
# (kit.metrics.RequestStats leaves it out of the histogram).
POLLED_ROUTES = frozenset({"/internal/gateway/snapshot"})


def route_template(scope: Scope) -> str:
    """The matched route's template (`/api/v1/keys/{key_id}`), never the raw path.

    Routes of included routers only know their path relative to the router, so the
    template is rebuilt from the request path by putting each path parameter's name
    back in place of its value.
    """
    if scope.get("route") is None:
        return "unmatched"
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    segments = str(scope.get("path", "")).split("/")
    return "/".join("{" + params[s] + "}" if s in params else s for s in segments)


class AccessLogMiddleware:
    """Logs method, route template, status and latency of every control-API request, and
    hands the same to `observe` (the request metrics, kit.metrics.RequestStats).

    The route template (`/api/v1/keys/{key_id}`) is logged instead of the raw path so
    identifiers and query strings never reach the log.
    """

    def __init__(
        self, app: ASGIApp, observe: Callable[[str, str, int, float], None] | None = None
    ) -> None:
        self.app = app
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = route_template(scope)
            elapsed = time.perf_counter() - start
            if self._observe is not None:
                self._observe(str(scope.get("method", "")), template, status, elapsed)
            polled = template in POLLED_ROUTES and status < 400
            access_log.log(
                logging.DEBUG if polled else logging.INFO,
                "http.request",
                extra={
                    "request_id": request_id,
                    "method": scope.get("method", ""),
                    "path": template,
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )
