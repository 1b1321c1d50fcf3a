"""CallLogSink: column-oriented batches of call metadata into onetoken.call_log.

The engines' journals are the one durable record log (onetoken.ingest): this sink only
inserts what ingestion read from them and reports whether ClickHouse took it. When it did
not, the call_log cursor stays where it was and the same batch is inserted again later.

The batches arrive as call_log blocks in ClickHouse's Native format, built by the engine's
journal reader, and go in with clickhouse-connect's raw_insert unchanged.

Retries are idempotent twice over: each insert carries an insert_deduplication_token
derived from the batch identity (journal instance, segment, start and end offset, which a
retry reads again exactly), and the table is a ReplacingMergeTree keyed by
(org_id, ts, request_id), so a record inserted twice reads once with FINAL.

On a cluster the insert goes through a Distributed table in the foreground
(DURABLE_INSERT_SETTINGS): it succeeds only once every shard has its rows, so the cursor
never moves past rows that sit only in one server's send queue.

Nothing here logs or raises with row data: log lines carry counts, error classes and
ClickHouse error codes only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from clickhouse_connect.driver.client import Client

from onetoken.analytics.clickhouse import ClickHouseSettings, ensure_pool_database, open_client
from onetoken.analytics.columns import (
    CALL_LOG_COLUMNS,
    DURABLE_INSERT_SETTINGS,
    SHARED_DATABASE,
    call_log_table,
)

T = TypeVar("T")

logger = logging.getLogger("onetoken.analytics")

_CH_CODE = re.compile(r"Code: (\d+)")


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


class CallLogSink:
    """Writes call-log batches to ClickHouse and serves the control plane's reads.

    Thread-safe: insert, read and close serialize on one lock (ingestion and the API's
    readers run on different threads).
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
        self.rows_written = 0
        self.batches_failed = 0
        self.last_error: str | None = None
        # Pool databases made current on the open client (migrations and TTL, once).
        self._ready_databases: set[str] = set()

    # -- connection ---------------------------------------------------------------------

    @property
    def client(self) -> Client | None:
        """The open ClickHouse client, if any: in a process that runs the sink on chDB,
        queries and the audit scan must share this engine (one process per data path)."""
        return self._client

    def connect(self) -> None:
        """Open (and migrate) the ClickHouse client now, raising on failure.

        For startup, where a wrong DSN or a locked chDB path should stop the process with a
        clear message; insert() connects lazily and never raises.
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

    def available(self) -> bool:
        """True when a client is open or may be opened now (not backing off after a
        failed connect): ingestion reads the call_log side only then."""
        with self._lock:
            return not self._closed and self._client_or_none() is not None

    # -- writing ------------------------------------------------------------------------

    def insert(
        self, block: bytes, rows: int, dedup_token: str, database: str = SHARED_DATABASE
    ) -> bool:
        """Insert one Native call_log block of `rows` records into the call_log of
        `database` (a gateway pool's, created on first use, or the shared one); True when
        ClickHouse took it. Never raises: on False the caller keeps the batch (its journal
        cursor) and retries later with the same block and token."""
        if rows == 0:
            return True
        with self._lock:
            client = None if self._closed else self._client_or_none()
            if client is None:
                return False
            try:
                if database != SHARED_DATABASE and database not in self._ready_databases:
                    ensure_pool_database(client, database, self._settings.call_log_ttl_days)
                    self._ready_databases.add(database)
                client.raw_insert(
                    call_log_table(database),
                    column_names=CALL_LOG_COLUMNS,
                    insert_block=block,
                    fmt="Native",
                    settings={
                        "insert_deduplication_token": dedup_token,
                        # Request ids are unique within a batch, so the replacing merge
                        # ClickHouse would run on each inserted block finds nothing;
                        # skipping it saves about a fifth of the insert CPU. Duplicates
                        # across batches still collapse in background merges and under FINAL.
                        "optimize_on_insert": 0,
                        # A re-sent batch that call_log drops must not reach the rollup
                        # either (call_stats_1m_mv). Older servers default the setting to 0,
                        # and with 0 the view aggregates the dropped block a second time.
                        "deduplicate_blocks_in_dependent_materialized_views": 1,
                        **DURABLE_INSERT_SETTINGS,
                    },
                )
            except Exception as exc:
                self.batches_failed += 1
                self.last_error = _error_label(exc)
                logger.warning(
                    "analytics.insert_failed", extra={"rows": rows, **_error_fields(exc)}
                )
                self._drop_client_locked()
                return False
            self.rows_written += rows
            return True

    def _drop_client_locked(self) -> None:
        # A failed insert may have left the connection unusable: reconnect after a pause.
        if self._settings.clickhouse_dsn.startswith("http"):
            self._ready_databases.clear()
            client, self._client = self._client, None
            self._next_connect_at = time.monotonic() + self._reconnect_interval_s
            if client is not None and self._owns_client:
                with contextlib.suppress(Exception):
                    client.close()

    def stats(self) -> dict[str, int]:
        return {
            "rows_written": self.rows_written,
            "batches_failed": self.batches_failed,
        }

    def close(self) -> None:
        """Close the client if this sink opened it. Later inserts report False."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            if client is not None and self._owns_client:
                with contextlib.suppress(Exception):
                    client.close()
