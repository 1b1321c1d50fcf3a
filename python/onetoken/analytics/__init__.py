"""Call metadata and security log storage in ClickHouse (chDB embedded, or a server)."""

from onetoken.analytics.clickhouse import (
    AnalyticsError,
    ChdbLockedError,
    ChdbPathConflictError,
    ClickHouseSettings,
    ClickHouseUnavailableError,
    MigrationError,
    apply_migrations,
    open_client,
    parse_dsn,
)
from onetoken.analytics.columns import CALL_LOG_COLUMNS, CALL_LOG_TABLE, SECURITY_LOG_TABLE
from onetoken.analytics.sink import CallLogSink

__all__ = [
    "CALL_LOG_COLUMNS",
    "CALL_LOG_TABLE",
    "SECURITY_LOG_TABLE",
    "AnalyticsError",
    "CallLogSink",
    "ChdbLockedError",
    "ChdbPathConflictError",
    "ClickHouseSettings",
    "ClickHouseUnavailableError",
    "MigrationError",
    "apply_migrations",
    "open_client",
    "parse_dsn",
]
