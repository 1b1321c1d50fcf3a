"""Columns of one call metadata record: the engine writes the rows, so its declaration
(`_core.call_log_native_columns()`) is the only one; the ClickHouse migrations create
exactly these columns (tests/unit/test_analytics_clickhouse.py checks them in chDB).
"""

from __future__ import annotations

from typing import Final

from onetoken import _core

CALL_LOG_TABLE: Final = "onetoken.call_log"
SECURITY_LOG_TABLE: Final = "onetoken.security_log"

#: Settings of every insert into those tables. On a cluster they are Distributed tables
#: (analytics.cluster), which by default take an insert once it is queued on the disk of
#: the server that received it and send it to the shards later: the caller would then move
#: its journal cursor (or drop its spool file) past rows that a lost disk takes with it.
#: In the foreground, the insert returns only when every shard has its rows, and a failure
#: leaves the batch to be retried with the same insert_deduplication_token. A table that is
#: not Distributed ignores the setting.
DURABLE_INSERT_SETTINGS: Final[dict[str, int]] = {"distributed_foreground_insert": 1}

#: (name, ClickHouse type), in table order.
CALL_LOG_SCHEMA: Final[tuple[tuple[str, str], ...]] = tuple(_core.call_log_native_columns())

CALL_LOG_COLUMNS: Final[tuple[str, ...]] = tuple(name for name, _ in CALL_LOG_SCHEMA)
