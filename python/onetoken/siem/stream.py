"""The security log in delivery order: (ts, event_id) ascending after a cursor.

One reading serves both the syslog forwarder and the NDJSON export. It stops
`settle` seconds before now: events reach ClickHouse in batches, flushed by each
process on its own cycle, so an event stamped a moment ago may still be on its way
while a later one is readable; a cursor never passes that window, so such an event is
not skipped."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from onetoken.analytics.columns import SECURITY_LOG_TABLE
from onetoken.security.log import SECURITY_LOG_COLUMNS

Runner = Callable[[Callable[[Any], Any]], Any]
#: The version of an event's JSON shape (docs/siem.md), in every event.
SCHEMA = "onetoken.security_event/1"


class CursorError(ValueError):
    """A cursor that is not one this module made."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """After the event (ts_us, event_id); (0, "") is the start of the log."""

    ts_us: int = 0
    event_id: str = ""

    def token(self) -> str:
        return base64.urlsafe_b64encode(orjson.dumps([self.ts_us, self.event_id])).decode()

    @staticmethod
    def parse(value: str) -> Cursor:
        try:
            ts_us, event_id = orjson.loads(base64.urlsafe_b64decode(value.encode()))
        except Exception:
            raise CursorError("malformed cursor") from None
        if not isinstance(ts_us, int) or not isinstance(event_id, str) or len(event_id) > 64:
            raise CursorError("malformed cursor")
        return Cursor(ts_us, event_id)


@dataclass(frozen=True, slots=True)
class Event:
    """One security_log row as a SIEM gets it."""

    ts_us: int
    event_id: str
    kind: str
    severity: str
    org_id: str
    actor_id: str
    subject_id: str
    source_ip: str
    user_agent: str
    detail: dict[str, Any]

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.ts_us, self.event_id)

    @property
    def ts(self) -> datetime:
        return datetime.fromtimestamp(self.ts_us / 1_000_000, UTC)

    def document(self) -> dict[str, Any]:
        """The event's JSON object (docs/siem.md, "Event schema"): metadata only, as
        the security log holds it."""
        return {
            "schema": SCHEMA,
            "ts": rfc3339(self.ts_us),
            "event_id": self.event_id,
            "kind": self.kind,
            "severity": self.severity,
            "org_id": self.org_id,
            "actor_id": self.actor_id,
            "subject_id": self.subject_id,
            "source_ip": self.source_ip,
            "user_agent": self.user_agent,
            "detail": self.detail,
        }

    def json_line(self) -> bytes:
        # ASCII only (non-ASCII escaped): a syslog MSG without a BOM must not claim UTF-8
        # (RFC 5424 6.4), and every collector reads escaped JSON.
        return json.dumps(self.document(), separators=(",", ":"), ensure_ascii=True).encode()


def rfc3339(ts_us: int) -> str:
    seconds, micros = divmod(ts_us, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"


def read_after(
    run: Runner, cursor: Cursor, *, org_id: str | None, limit: int, settle_seconds: float,
) -> list[Event]:
    """Up to `limit` events after `cursor`, oldest first, stamped at least
    `settle_seconds` before now; only `org_id`'s when given (None: every org's and the
    platform's)."""
    now = datetime.now(UTC)
    horizon_us = int(now.timestamp() * 1_000_000) - int(settle_seconds * 1_000_000)
    where = [
        "(toUnixTimestamp64Micro(ts), event_id) > ({c_ts:Int64}, {c_id:String})",
        "toUnixTimestamp64Micro(ts) <= {horizon:Int64}",
    ]
    params: dict[str, Any] = {
        "c_ts": cursor.ts_us, "c_id": cursor.event_id, "horizon": horizon_us, "limit": limit,
    }
    if org_id is not None:
        where.append("org_id = {org:String}")
        params["org"] = org_id
    if cursor.ts_us:
        # Lets ClickHouse skip the months before the cursor (partitions by month).
        where.append("ts >= fromUnixTimestamp64Micro({c_ts:Int64})")
    columns = ", ".join(
        "toUnixTimestamp64Micro(ts)" if c == "ts" else c for c in SECURITY_LOG_COLUMNS
    )
    sql = (
        f"SELECT {columns} FROM {SECURITY_LOG_TABLE} FINAL WHERE "  # noqa: S608 (fixed names)
        + " AND ".join(where)
        + " ORDER BY ts, event_id LIMIT {limit:UInt32}"
    )
    rows = run(lambda c: c.query(sql, parameters=params).result_rows)
    return [
        Event(
            int(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5]),
            str(row[6]), str(row[7]), str(row[8]), orjson.loads(row[9]) if row[9] else {},
        )
        for row in rows
    ]
