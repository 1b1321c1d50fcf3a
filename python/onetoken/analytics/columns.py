"""Columns of one call metadata record: the engine writes the rows, so its declaration
(`_core.call_log_native_columns()`) is the only one; the ClickHouse migrations create
exactly these columns (tests/unit/test_analytics_clickhouse.py checks them in chDB).
"""

from __future__ import annotations

from typing import Final

from onetoken import _core

CALL_LOG_TABLE: Final = "onetoken.call_log"
SECURITY_LOG_TABLE: Final = "onetoken.security_log"

#: (name, ClickHouse type), in table order.
CALL_LOG_SCHEMA: Final[tuple[tuple[str, str], ...]] = tuple(_core.call_log_native_columns())

CALL_LOG_COLUMNS: Final[tuple[str, ...]] = tuple(name for name, _ in CALL_LOG_SCHEMA)
