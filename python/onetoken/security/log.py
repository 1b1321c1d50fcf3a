"""The security and risk log: `record(SecurityEvent(...))` from anywhere in the process.

Events are queued in memory (never blocking the caller, never touching the network) and
written in batches to `onetoken.security_log` by whoever owns the process:

- `onetoken control` / `serve`: the ingestor flushes the queue on every flush interval
  through the same ClickHouse client as call_log (`attach_to_supervisor`); a
  batch ClickHouse refuses is spooled to `<data_dir>/spool/seclog-*.jsonl` and replayed.
- anything else (CLI commands, a control API without a gateway): the queue is spooled to
  the same files when it fills up and at exit; the next running server replays them.

An event holds metadata only. `detail` is a flat mapping of short scalars (ids, counts,
categories, CIDRs); the writer refuses nested values and truncates long strings, so a
caller cannot turn it into a content store by accident.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import orjson

from onetoken.analytics.columns import DURABLE_INSERT_SETTINGS, SECURITY_LOG_TABLE
from onetoken.kit.events import EventBus
from onetoken.kit.files import private_dir
from onetoken.kit.metrics import Metric

log = logging.getLogger("onetoken.security")

T = TypeVar("T")

# The one declaration of the row's columns: the DDL (analytics/sql) is checked against it
# with chDB's DESCRIBE (tests/unit/test_analytics_clickhouse.py).
SECURITY_LOG_COLUMNS: Final = (
    "ts",
    "event_id",
    "kind",
    "severity",
    "org_id",
    "actor_id",
    "subject_id",
    "source_ip",
    "user_agent",
    "detail",
)
SPOOL_PREFIX: Final = "seclog-"
Severity = Literal["info", "low", "medium", "high", "critical"]
SEVERITIES: Final[tuple[str, ...]] = ("info", "low", "medium", "high", "critical")

_KIND_RE = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_DETAIL_KEY_RE = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_MAX_DETAIL_KEYS = 32
_MAX_DETAIL_STR = 512
_MAX_ID = 64
_MAX_USER_AGENT = 256
_DEFAULT_CAPACITY = 10_000

Scalar = str | int | float | bool | None


class SecurityEventError(ValueError):
    """An event that breaks the metadata-only shape (fixed texts, never the values)."""


def _clip(value: str | None, limit: int) -> str:
    return (value or "")[:limit]


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """One security or risk event.

    kind: dotted lowercase name, e.g. `auth.login_failed`, `key.revoked_used`,
      `admin.role_changed` (catalogue in docs/control-plane-spec.md).
    severity: info < low < medium < high < critical.
    org_id: the org it concerns ("" for platform-wide events).
    actor_id: who did it (account id, key id, or "" when unknown).
    subject_id: what it was done to (account, key, org id, ...).
    detail: flat metadata: str (<= 512 chars), int, float, bool or None values.
    """

    kind: str
    severity: Severity
    org_id: str = ""
    actor_id: str = ""
    subject_id: str = ""
    source_ip: str = ""
    user_agent: str = ""
    detail: Mapping[str, Scalar] = field(default_factory=dict)
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not _KIND_RE.match(self.kind):
            raise SecurityEventError("kind must be a dotted lowercase name")
        if self.severity not in SEVERITIES:
            raise SecurityEventError("unknown severity")
        if len(self.detail) > _MAX_DETAIL_KEYS:
            raise SecurityEventError("too many detail fields")
        for key, value in self.detail.items():
            if not isinstance(key, str) or not _DETAIL_KEY_RE.match(key):
                raise SecurityEventError("detail keys must be lowercase names")
            if value is not None and not isinstance(value, str | int | float | bool):
                raise SecurityEventError("detail values must be scalars")
        if self.ts.tzinfo is None:
            raise SecurityEventError("ts must be timezone-aware")

    def row(self) -> list[Any]:
        """The ClickHouse row (SECURITY_LOG_COLUMNS order); ts in microseconds."""
        detail = {
            k: (_clip(v, _MAX_DETAIL_STR) if isinstance(v, str) else v)
            for k, v in sorted(self.detail.items())
        }
        return [
            int(self.ts.timestamp() * 1_000_000),
            self.event_id,
            self.kind,
            self.severity,
            _clip(self.org_id, _MAX_ID),
            _clip(self.actor_id, _MAX_ID),
            _clip(self.subject_id, _MAX_ID),
            _clip(self.source_ip, _MAX_ID),
            _clip(self.user_agent, _MAX_USER_AGENT),
            orjson.dumps(detail).decode(),
        ]


Row = list[Any]
# Runs a callable against an open ClickHouse client, serialized with other users of it.
ClientRunner = Callable[[Callable[[Any], Any]], Any]


class SecurityLog:
    """A bounded in-memory queue of events plus its spool; thread-safe.

    Nothing is dropped: when the queue is full, the oldest half goes to a spool file.
    """

    def __init__(
        self,
        spool_dir: Path,
        *,
        capacity: int = _DEFAULT_CAPACITY,
        events: EventBus | None = None,
    ) -> None:
        # Recorded events are also published here (the webhooks bridge subscribes).
        self.events = events
        self.spool_dir = Path(spool_dir)
        self.capacity = capacity
        self._queue: deque[Row] = deque()
        self._lock = threading.Lock()
        self._spool_seq = 0
        self.recorded = 0
        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self.last_error: str | None = None

    # -- producing ----------------------------------------------------------------------

    def record(self, event: SecurityEvent) -> None:
        row = event.row()
        spill: list[Row] = []
        with self._lock:
            self._queue.append(row)
            self.recorded += 1
            if len(self._queue) >= self.capacity:
                spill = [self._queue.popleft() for _ in range(len(self._queue) // 2)]
        if spill:
            self._spool(spill)
        log.info(
            "security.event",
            extra={"kind": event.kind, "org_id": event.org_id or None},
        )

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def drain(self, max_rows: int | None = None) -> list[Row]:
        with self._lock:
            n = len(self._queue) if max_rows is None else min(max_rows, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    # -- writing ------------------------------------------------------------------------

    def flush(self, run: ClientRunner | None) -> int:
        """Write everything queued through `run` (spooling on failure, or when `run` is
        None). Returns the rows written to ClickHouse. Never raises."""
        rows = self.drain()
        if not rows:
            return 0
        if run is None:
            self._spool(rows)
            return 0
        try:
            insert_rows(run, rows)
        except Exception as exc:
            self.last_error = type(exc).__name__
            log.warning("security.insert_failed_spooling", extra={"rows": len(rows),
                                                                  "exc_type": type(exc).__name__})
            self._spool(rows)
            return 0
        self.written += len(rows)
        return len(rows)

    def flush_to_spool(self) -> None:
        self.flush(None)

    def _spool(self, rows: list[Row]) -> None:
        try:
            private_dir(self.spool_dir)
            with self._lock:
                self._spool_seq += 1
                seq = self._spool_seq
            path = self.spool_dir / f"{SPOOL_PREFIX}{time.time_ns()}-{os.getpid()}-{seq}.jsonl"
            payload = b"".join(
                orjson.dumps(dict(zip(SECURITY_LOG_COLUMNS, r, strict=True))) + b"\n"
                for r in rows
            )
            # Written aside and renamed: a server replaying the spool meanwhile (another
            # process) must never read, insert and delete a half-written file.
            tmp = path.with_suffix(".tmp")
            _write_durably(tmp, payload)
            os.replace(tmp, path)
            self.spooled += len(rows)
        except Exception as exc:
            # The disk is gone too: nothing left to do but say so (counts only).
            self.last_error = type(exc).__name__
            log.error("security.events_lost", extra={"rows": len(rows),
                                                     "exc_type": type(exc).__name__})

    def spool_files(self) -> list[Path]:
        if not self.spool_dir.is_dir():
            return []
        return sorted(
            p for p in self.spool_dir.iterdir()
            if p.name.startswith(SPOOL_PREFIX) and p.name.endswith(".jsonl")
        )

    def metrics(self) -> list[Metric]:
        """The queue, the spool waiting for ClickHouse, and what went where (counts)."""
        files = 0
        size = 0
        for path in self.spool_files():
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                continue  # replayed since the listing
            files += 1
        return [
            Metric("onetoken_security_log_queue_events", "gauge",
                   "Security events queued in memory for the next write").add(self.pending()),
            Metric("onetoken_security_log_spool_files", "gauge",
                   "Spool files of security events waiting to be replayed into "
                   "ClickHouse").add(files),
            Metric("onetoken_security_log_spool_bytes", "gauge",
                   "Bytes of those spool files").add(size),
            Metric("onetoken_security_log_recorded_total", "counter",
                   "Security events recorded by this process").add(self.recorded),
            Metric("onetoken_security_log_written_total", "counter",
                   "Security events this process wrote to ClickHouse").add(self.written),
            Metric("onetoken_security_log_spooled_total", "counter",
                   "Security events this process spooled to disk (ClickHouse refused them, "
                   "or no writer ran)").add(self.spooled),
            Metric("onetoken_security_log_replayed_total", "counter",
                   "Spooled security events this process replayed into ClickHouse").add(
                self.replayed),
        ]

    def replay_spool(self, run: ClientRunner) -> int:
        """Insert every spooled event file (this process's and other processes'), deleting
        each once inserted; stops at the first failure. Never raises."""
        total = 0
        for path in self.spool_files():
            try:
                rows = list(_read_rows(path))
                if rows:
                    insert_rows(run, rows)
                path.unlink()
            except FileNotFoundError:
                continue
            except Exception as exc:
                self.last_error = type(exc).__name__
                log.warning("security.replay_stopped", extra={"exc_type": type(exc).__name__})
                break
            total += len(rows)
        if total:
            self.replayed += total
            log.info("security.spool_replayed", extra={"replayed": total})
        return total


def insert_rows(run: ClientRunner, rows: list[Row]) -> None:
    columns = [list(c) for c in zip(*rows, strict=True)]
    token = "seclog:" + hashlib.sha256("\x00".join(r[1] for r in rows).encode()).hexdigest()

    def insert(client: Any) -> None:
        client.insert(
            SECURITY_LOG_TABLE,
            columns,
            column_names=list(SECURITY_LOG_COLUMNS),
            column_oriented=True,
            # Once this returns the rows leave memory or the spool: on a cluster, only
            # when the shards have them, not when one server has queued them.
            settings={"insert_deduplication_token": token, **DURABLE_INSERT_SETTINGS},
        )

    run(insert)


def _read_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # torn by a crash mid-write: nothing after it was acknowledged
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                obj = orjson.loads(line)
                yield [obj[c] for c in SECURITY_LOG_COLUMNS]


def _write_durably(path: Path, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the process-wide writer --------------------------------------------------------------

_current: SecurityLog | None = None
_current_lock = threading.Lock()
_atexit_registered = False


def install(writer: SecurityLog) -> SecurityLog:
    """Make `writer` the target of `record()`. A replaced writer's queue is spooled so
    nothing recorded before the switch is lost."""
    global _current, _atexit_registered
    with _current_lock:
        previous, _current = _current, writer
        if not _atexit_registered:
            atexit.register(_flush_current_at_exit)
            _atexit_registered = True
    if previous is not None and previous is not writer:
        previous.flush_to_spool()
    return writer


def current() -> SecurityLog | None:
    return _current


def record(event: SecurityEvent) -> None:
    """Queue one security event. Never blocks on I/O and never raises for I/O problems;
    a malformed event raises SecurityEventError at construction, before this call."""
    writer = _current
    if writer is None:
        # No writer yet (a library use before any state was built): count it in the log
        # so the loss is visible; there is no data dir to spool to.
        log.error("security.no_writer", extra={"kind": event.kind})
        return
    writer.record(event)
    if writer.events is not None:
        writer.events.publish(event)


def _flush_current_at_exit() -> None:
    writer = _current
    if writer is not None:
        writer.flush_to_spool()


# -- wiring into the gateway supervisor ---------------------------------------------------


def attach_to_supervisor(supervisor: Any) -> None:
    """Flush the process's security log on every ingestion cycle (`supervisor`: the
    Ingestor) and replay its spool, through the call_log sink's ClickHouse client (one
    chDB engine per process)."""

    def run(query: Callable[[Any], T]) -> T:
        result: T = supervisor.sink.read(query)
        return result

    def flush() -> None:
        writer = _current
        if writer is None:
            return
        if writer.spool_files():
            writer.replay_spool(run)
        writer.flush(run)

    supervisor.flush_hooks.append(flush)
