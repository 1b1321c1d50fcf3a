"""CallLogSink: column-oriented batches of call metadata into onetoken.call_log.

Billing depends on these rows, so a batch is never dropped: when ClickHouse cannot take it,
it goes to a spool file (<data_dir>/spool/calllog-*.jsonl, one record object per line,
metadata only, fsynced) and `replay_spool()` inserts it later, together with the overflow
files the Rust engine writes (<data_dir>/spool/overflow-*.jsonl, same line format).

Replays are idempotent twice over: each insert carries an insert_deduplication_token
derived from its request ids, and the table is a ReplacingMergeTree keyed by
(org_id, ts, request_id), so a record inserted twice reads once with FINAL.

Nothing here logs or raises with row data: log lines carry counts, error classes and
ClickHouse error codes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import zip_longest
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

from onetoken.analytics.clickhouse import ClickHouseSettings, open_client
from onetoken.analytics.columns import CALL_LOG_ADDED_DEFAULTS, CALL_LOG_COLUMNS, CALL_LOG_TABLE
from onetoken.kit.files import private_dir

T = TypeVar("T")

logger = logging.getLogger("onetoken.analytics")

Batch = dict[str, list[Any]]

SPOOL_PREFIX: Final = "calllog-"
OVERFLOW_PREFIX: Final = "overflow-"
# The engine's record journal (journal-<instance>-<segment>.jsonl, same line format):
# replayed only for instances that are gone, since a live engine deletes its own segments
# once the pump acknowledges their records.
JOURNAL_PREFIX: Final = "journal-"
# An overflow file is renamed to this prefix before it is read, so a replay cut short (a
# crash, a failed insert) finds it again under a name no writer uses. The engine writes
# overflow-<instance>-<seq>.jsonl.open and renames it to .jsonl only once sealed, so a
# file this sink can see (it lists *.jsonl only) is complete and never written again.
CLAIMED_PREFIX: Final = "claimed-"
REJECTED_PREFIX: Final = "rejected-"
REPLAY_CHUNK_ROWS: Final = 50_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CH_CODE = re.compile(r"Code: (\d+)")


def dedup_token(request_ids: Sequence[str]) -> str:
    """insert_deduplication_token for a batch: the same request ids give the same token."""
    digest = hashlib.sha256("\x00".join(request_ids).encode("utf-8", "surrogatepass"))
    digest.update(len(request_ids).to_bytes(8, "little"))
    return "calllog:" + digest.hexdigest()


def _error_label(exc: BaseException) -> str:
    """Error class plus ClickHouse code: enough to diagnose, never any row data."""
    match = _CH_CODE.search(str(exc))
    return f"{type(exc).__name__}:{match[1]}" if match else type(exc).__name__


def _error_fields(exc: BaseException) -> dict[str, Any]:
    """Allow-listed log fields for a failure (kit/logging drops anything else)."""
    match = _CH_CODE.search(str(exc))
    fields: dict[str, Any] = {"exc_type": type(exc).__name__}
    if match:
        fields["error_code"] = f"clickhouse_{match[1]}"
    return fields


def _ts_micros(value: Any) -> int:
    """Spool/overflow ts to integer microseconds (the engine writes ints already)."""
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        delta = parsed - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    raise TypeError("ts must be integer microseconds")


def batch_is_well_formed(batch: Batch) -> bool:
    """Every contract column present, all of one length."""
    try:
        lengths = {len(batch[name]) for name in CALL_LOG_COLUMNS}
    except (KeyError, TypeError):
        return False
    return len(lengths) == 1


def _batch_rows(batch: Batch) -> int:
    with contextlib.suppress(KeyError, TypeError):
        return len(batch["request_id"])
    return max((len(v) for v in batch.values() if isinstance(v, list)), default=0)


@dataclass
class _ReplayFile:
    path: Path
    offset: int = 0
    rows: int = 0
    bad_lines: int = 0


class CallLogSink:
    """Writes call-log batches to ClickHouse, spooling to disk whatever it cannot write.

    Thread-safe: write, replay_spool and close serialize on one lock (the record pump and a
    replay timer may run on different threads).
    """

    def __init__(
        self,
        settings: ClickHouseSettings,
        *,
        client: Client | None = None,
        reconnect_interval_s: float = 2.0,
    ) -> None:
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._reconnect_interval_s = reconnect_interval_s
        self._next_connect_at = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self.spool_dir = Path(settings.data_dir) / "spool"
        # Instance id of the engine running in this process: its journal is not replayed.
        self.live_instance: str | None = None
        self._spool_file: Path | None = None
        self._spool_seq = 0
        self.rows_written = 0
        self.rows_spooled = 0
        self.rows_replayed = 0
        self.rows_rejected = 0
        self.batches_failed = 0
        self.spool_bad_lines = 0
        self.last_error: str | None = None

    # -- connection ---------------------------------------------------------------------

    @property
    def client(self) -> Client | None:
        """The open ClickHouse client, if any: in a process that runs the sink on chDB,
        queries and the audit scan must share this engine (one process per data path)."""
        return self._client

    def connect(self) -> None:
        """Open (and migrate) the ClickHouse client now, raising on failure.

        For startup, where a wrong DSN or a locked chDB path should stop the process with a
        clear message; write() connects lazily and never raises.
        """
        with self._lock:
            self._connect_locked()

    def _connect_locked(self) -> Client:
        if self._client is None:
            self._client = open_client(self._settings)
            self._owns_client = True
        return self._client

    def _client_or_none(self) -> Client | None:
        if self._client is not None:
            return self._client
        now = time.monotonic()
        if now < self._next_connect_at:
            return None
        try:
            return self._connect_locked()
        except Exception as exc:
            # Back off so an unreachable server does not cost a connect timeout per flush.
            self._next_connect_at = now + self._reconnect_interval_s
            self.last_error = _error_label(exc)
            logger.warning("analytics.clickhouse_unavailable", extra=_error_fields(exc))
            return None

    def read(self, query: Callable[[Client], T]) -> T:
        """Run a read query on the sink's client, serialized with writes.

        While the server runs, it is the only process that may open an embedded chDB path,
        so the control API's readers share this client; clickhouse-connect clients are not
        safe to use from two threads at once.
        """
        with self._lock:
            return query(self._connect_locked())

    # -- writing ------------------------------------------------------------------------

    def _insert(self, client: Client, batch: Batch) -> None:
        request_ids = batch["request_id"]
        # ts arrives as int microseconds, which clickhouse-connect writes unchanged as
        # DateTime64(6) ticks: no per-row datetime objects on the hot path.
        client.insert(
            CALL_LOG_TABLE,
            [batch[name] for name in CALL_LOG_COLUMNS],
            column_names=list(CALL_LOG_COLUMNS),
            column_oriented=True,
            settings={
                "insert_deduplication_token": dedup_token(request_ids),
                # Request ids are unique within a batch, so the replacing merge ClickHouse
                # would run on each inserted block finds nothing; skipping it saves about
                # a fifth of the insert CPU. Duplicates across batches still collapse in
                # background merges and under FINAL.
                "optimize_on_insert": 0,
            },
        )

    def write(self, batch: Batch) -> None:
        """Insert one column-oriented batch; on any failure spool it. Never raises."""
        try:
            with self._lock:
                self._write_locked(batch)
        except Exception as exc:
            # Last resort (e.g. the spool disk is full): the caller must keep running; the
            # counters and last_error show the loss.
            self.batches_failed += 1
            self.last_error = _error_label(exc)
            logger.error(
                "analytics.batch_lost",
                extra={"rows": _batch_rows(batch), **_error_fields(exc)},
            )

    def _write_locked(self, batch: Batch) -> None:
        rows = _batch_rows(batch)
        if rows == 0:
            return
        if not batch_is_well_formed(batch):
            self._reject(batch)
            return
        client = None if self._closed else self._client_or_none()
        if client is not None:
            try:
                self._insert(client, batch)
            except Exception as exc:
                self.last_error = _error_label(exc)
                logger.warning(
                    "analytics.insert_failed_spooling", extra={"rows": rows, **_error_fields(exc)}
                )
            else:
                self.rows_written += rows
                return
        self._spool(batch, rows)

    def _spool(self, batch: Batch, rows: int) -> None:
        if self._spool_file is None:
            private_dir(self.spool_dir)
            self._spool_seq += 1
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = f"{SPOOL_PREFIX}{stamp}-{time.time_ns()}-{os.getpid()}-{self._spool_seq}.jsonl"
            self._spool_file = self.spool_dir / name
        columns = [batch[name] for name in CALL_LOG_COLUMNS]
        payload = b"".join(
            orjson.dumps(dict(zip(CALL_LOG_COLUMNS, row, strict=True))) + b"\n"
            for row in zip(*columns, strict=True)
        )
        _append_durably(self._spool_file, payload)
        self.rows_spooled += rows

    def _reject(self, batch: Batch) -> None:
        # A batch that breaks the column contract cannot be inserted, however often it is
        # replayed; keep it for an operator (known columns only) instead of retrying it.
        private_dir(self.spool_dir)
        path = self.spool_dir / f"{REJECTED_PREFIX}{time.time_ns()}-{os.getpid()}.jsonl"
        present = [name for name in CALL_LOG_COLUMNS if isinstance(batch.get(name), list)]
        payload = b"".join(
            orjson.dumps(dict(zip(present, row, strict=True))) + b"\n"
            for row in zip_longest(*(batch[name] for name in present))
        )
        _append_durably(path, payload)
        rows = _batch_rows(batch)
        self.rows_rejected += rows
        logger.error("analytics.batch_rejected", extra={"rows": rows})

    # -- replay -------------------------------------------------------------------------

    def pending_spool_files(self) -> list[Path]:
        """Spool and overflow files waiting for replay, oldest first."""
        if not self.spool_dir.is_dir():
            return []
        found: list[tuple[float, str, Path]] = []
        for entry in os.scandir(self.spool_dir):
            name = entry.name
            if not name.endswith(".jsonl") or not entry.is_file():
                continue
            if name.startswith(JOURNAL_PREFIX) and (
                self.live_instance is not None
                and name.startswith(f"{JOURNAL_PREFIX}{self.live_instance}-")
            ):
                continue
            if name.startswith((SPOOL_PREFIX, OVERFLOW_PREFIX, CLAIMED_PREFIX, JOURNAL_PREFIX)):
                with contextlib.suppress(FileNotFoundError):
                    found.append((entry.stat().st_mtime, name, Path(entry.path)))
        found.sort()
        return [path for _, _, path in found]

    @property
    def spool_files(self) -> int:
        """Number of files waiting in the spool (ours and the engine's overflow)."""
        return len(self.pending_spool_files())

    def replay_spool(self, on_batch: Callable[[Batch], None] | None = None) -> int:
        """Insert every spooled record, oldest file first; returns the rows inserted.

        A file is deleted only after all its rows were inserted. `on_batch` sees each batch
        before it is inserted (the supervisor uses it to write the ledger, idempotently);
        if it raises, the file stays for the next replay. Stops at the first connection
        failure. Never raises.
        """
        try:
            with self._lock:
                return self._replay_locked(on_batch)
        except Exception as exc:
            self.last_error = _error_label(exc)
            logger.error("analytics.replay_failed", extra=_error_fields(exc))
            return 0

    def _replay_locked(self, on_batch: Callable[[Batch], None] | None) -> int:
        if self._closed:
            return 0
        # New failures go to a new spool file, so the one we read is complete.
        self._spool_file = None
        total = 0
        for path in self.pending_spool_files():
            client = self._client_or_none()
            if client is None:
                break
            if path.name.startswith((OVERFLOW_PREFIX, JOURNAL_PREFIX)):
                claimed = path.with_name(f"{CLAIMED_PREFIX}{time.time_ns()}-{path.name}")
                try:
                    path.rename(claimed)
                except FileNotFoundError:
                    continue
                path = claimed
            try:
                inserted = self._replay_file(client, path, on_batch)
            except OperationalError as exc:
                self.last_error = _error_label(exc)
                logger.warning("analytics.replay_stopped", extra=_error_fields(exc))
                break
            except Exception as exc:
                # Keep the file and carry on with the others: one bad file must not block
                # everything queued behind it.
                self.last_error = _error_label(exc)
                logger.warning("analytics.replay_file_kept", extra=_error_fields(exc))
                continue
            total += inserted
        if total:
            logger.info("analytics.spool_replayed", extra={"replayed": total})
        return total

    def _replay_file(
        self, client: Client, path: Path, on_batch: Callable[[Batch], None] | None
    ) -> int:
        state = _ReplayFile(path)
        # Loop until a pass consumes nothing: a file written by an engine from before
        # sealed overflow segments may still have been open when we claimed it.
        while True:
            before = state.offset
            for batch in _read_batches(path, state):
                if on_batch is not None:
                    on_batch(batch)
                self._insert(client, batch)
                n = len(batch["request_id"])
                state.rows += n
                self.rows_replayed += n
                self.rows_written += n
            if state.offset == before:
                break
        if path.stat().st_size > state.offset:
            # An unterminated last line that did not grow: a write torn by a crash.
            state.bad_lines += 1
        path.unlink()
        _fsync_dir(path.parent)
        if state.bad_lines:
            self.spool_bad_lines += state.bad_lines
            logger.warning("analytics.spool_bad_lines", extra={"count": state.bad_lines})
        return state.rows

    def stats(self) -> dict[str, int]:
        return {
            "rows_written": self.rows_written,
            "rows_spooled": self.rows_spooled,
            "rows_replayed": self.rows_replayed,
            "rows_rejected": self.rows_rejected,
            "batches_failed": self.batches_failed,
            "spool_bad_lines": self.spool_bad_lines,
            "spool_files": self.spool_files,
        }

    def close(self) -> None:
        """Close the client if this sink opened it. Later writes go to the spool."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            if client is not None and self._owns_client:
                with contextlib.suppress(Exception):
                    client.close()


def _read_batches(path: Path, state: _ReplayFile) -> Iterator[Batch]:
    """Column-oriented batches of up to REPLAY_CHUNK_ROWS from state.offset onwards.

    Only complete (newline-terminated) lines are consumed, so a line the engine is still
    writing is left for the next pass. Lines that do not parse are counted and skipped.
    """
    columns: Batch = {name: [] for name in CALL_LOG_COLUMNS}
    count = 0
    with path.open("rb") as handle:
        handle.seek(state.offset)
        for line in handle:
            if not line.endswith(b"\n"):
                break
            state.offset += len(line)
            line = line.strip()
            if not line:
                continue
            try:
                record = orjson.loads(line)
                values = [
                    record[name] if name in record else CALL_LOG_ADDED_DEFAULTS[name]
                    for name in CALL_LOG_COLUMNS
                ]
                values[0] = _ts_micros(values[0])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                state.bad_lines += 1
                continue
            for name, value in zip(CALL_LOG_COLUMNS, values, strict=True):
                columns[name].append(value)
            count += 1
            if count >= REPLAY_CHUNK_ROWS:
                yield columns
                columns = {name: [] for name in CALL_LOG_COLUMNS}
                count = 0
    if count:
        yield columns


def _append_durably(path: Path, payload: bytes) -> None:
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Make the creation/removal of a spool file itself durable, not just its bytes.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
