"""Columns of one call metadata record (tests/contract/call_log_columns.json).

The contract file lives with the tests so Rust and Python read the same fixture; this copy
is what ships in the package, and a unit test keeps the two identical.
"""

from __future__ import annotations

from typing import Final

CALL_LOG_TABLE: Final = "onetoken.call_log"
SECURITY_LOG_TABLE: Final = "onetoken.security_log"

#: (name, ClickHouse type), in table order.
CALL_LOG_SCHEMA: Final[tuple[tuple[str, str], ...]] = (
    ("ts", "DateTime64(6, 'UTC')"),
    ("request_id", "String"),
    ("org_id", "String"),
    ("account_id", "String"),
    ("key_id", "String"),
    ("path", "LowCardinality(String)"),
    ("model_requested", "LowCardinality(String)"),
    ("model_served", "LowCardinality(String)"),
    ("provider", "LowCardinality(String)"),
    ("prompt_tokens", "UInt32"),
    ("completion_tokens", "UInt32"),
    ("cached_tokens", "UInt32"),
    ("usage_source", "LowCardinality(String)"),
    ("cost", "Int64"),
    ("status", "UInt16"),
    ("error_code", "LowCardinality(String)"),
    ("latency_us", "UInt32"),
    ("ttfb_us", "UInt32"),
    ("streamed", "UInt8"),
    ("source_ip", "String"),
    ("user_agent", "String"),
    ("rate_limit", "LowCardinality(String)"),
    ("attempts", "UInt8"),
    ("guard_flags", "LowCardinality(String)"),
)

CALL_LOG_COLUMNS: Final[tuple[str, ...]] = tuple(name for name, _ in CALL_LOG_SCHEMA)
