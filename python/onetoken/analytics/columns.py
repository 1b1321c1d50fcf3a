"""Columns of one call metadata record: the engine writes the rows, so its declaration
(`_core.call_log_native_columns()`) is the only one; the ClickHouse migrations create
exactly these columns (tests/unit/test_analytics_clickhouse.py checks them in chDB). The
declaration also says what each column means (`_core.call_log_column_docs()`): the
ClickHouse column comments and docs/analytics.md are made from it.
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


#: The shared database, and the form of a gateway pool's own database (docs/pools.md).
SHARED_DATABASE: Final = "onetoken"
POOL_DATABASE: Final = r"^onetoken_[a-z0-9_]{1,40}$"
#: Every database holding call metadata: the shared one and the pools'.
LOG_DATABASES: Final = r"^onetoken(_[a-z0-9_]{1,40})?$"
#: What reads of call metadata select from: the call_log of every log database, as one
#: table (ClickHouse's merge(); FINAL applies to each). Writes, TTLs and mutations go to
#: each physical table (`analytics.clickhouse.call_log_tables`).
CALL_LOG_READ: Final = f"merge(REGEXP('{LOG_DATABASES}'), '^call_log$')"


def call_log_table(database: str) -> str:
    """The call_log of one log database (the shared one, or a pool's)."""
    return f"{database}.call_log"


#: The per-minute rollup of call_log (migration 008), one beside each call_log; read
#: across databases like call_log. Dashboards read it; exact money is call_log FINAL.
CALL_STATS_TABLE: Final = "onetoken.call_stats_1m"
CALL_STATS_READ: Final = f"merge(REGEXP('{LOG_DATABASES}'), '^call_stats_1m$')"


def call_stats_table(database: str) -> str:
    """The rollup of one log database's call_log."""
    return f"{database}.call_stats_1m"

#: (name, ClickHouse type), in table order.
CALL_LOG_SCHEMA: Final[tuple[tuple[str, str], ...]] = tuple(_core.call_log_native_columns())

CALL_LOG_COLUMNS: Final[tuple[str, ...]] = tuple(name for name, _ in CALL_LOG_SCHEMA)

#: column -> what it means (unit, values, what empty means), from the engine's declaration.
CALL_LOG_DOCS: Final[dict[str, str]] = dict(_core.call_log_column_docs())
