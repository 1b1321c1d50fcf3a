"""Read queries over the call_log of every log database (the shared one and the gateway
pools'), for the control plane, its APIs and tests.

Every query reads with FINAL: the table is a ReplacingMergeTree and a journal range
inserted again after a crash is a second physical row until a merge collapses it, so
FINAL is what makes counts and sums exact per request. Times are integer microseconds
since the epoch (the record contract) or aware datetimes; naive datetimes are taken as
UTC.

The SQL text is assembled only from module constants and fixed clause templates; every
value (org id, times, cursor, limit) is a bound server-side parameter, hence the S608
suppressions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, TypedDict, Unpack

from clickhouse_connect.driver.client import Client

from onetoken.analytics.columns import CALL_LOG_COLUMNS, CALL_LOG_READ

Instant = datetime | int

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_PAGE_SIZE = 1000


def to_micros(value: Instant) -> int:
    """Microseconds since the epoch for an int (already micros) or a datetime."""
    if isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def window_filters(
    org_id: str | None, start: Instant | None, end: Instant | None
) -> tuple[list[str], dict[str, Any]]:
    """The conditions (and their parameters) for one org's rows in [start, end), on any
    table with `org_id` and `ts` (call_log, security_log); None leaves a bound open."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if org_id is not None:
        clauses.append("org_id = {org_id:String}")
        params["org_id"] = org_id
    if start is not None:
        clauses.append("ts >= fromUnixTimestamp64Micro({start:Int64}, 'UTC')")
        params["start"] = to_micros(start)
    if end is not None:
        clauses.append("ts < fromUnixTimestamp64Micro({end:Int64}, 'UTC')")
        params["end"] = to_micros(end)
    return clauses, params


def _where(
    org_id: str | None, start: Instant | None, end: Instant | None
) -> tuple[str, dict[str, Any]]:
    clauses, params = window_filters(org_id, start, end)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class CallFilter(TypedDict, total=False):
    """Which call_log rows a count reads: one org's, from `start`, before `end`."""

    org_id: str | None
    start: Instant | None
    end: Instant | None


def _count(client: Client, select: str, where: CallFilter) -> int:
    clause, params = _where(where.get("org_id"), where.get("start"), where.get("end"))
    result = client.query(select + clause, parameters=params)
    return int(result.result_rows[0][0])


def count_calls(client: Client, **where: Unpack[CallFilter]) -> int:
    """Rows in call_log after deduplication (one per request), optionally filtered."""
    return _count(client, f"SELECT count() FROM {CALL_LOG_READ} FINAL", where)  # noqa: S608


def count_distinct_requests(client: Client, **where: Unpack[CallFilter]) -> int:
    """uniqExact(request_id): the number of distinct requests, whatever the merge state."""
    return _count(client, f"SELECT uniqExact(request_id) FROM {CALL_LOG_READ}", where)  # noqa: S608


def duplicate_request_ids(client: Client, *, limit: int = 100) -> list[str]:
    """request_ids that read more than once even with FINAL (should always be empty)."""
    result = client.query(
        f"SELECT request_id FROM {CALL_LOG_READ} FINAL GROUP BY request_id "  # noqa: S608
        "HAVING count() > 1 ORDER BY request_id LIMIT {limit:UInt32}",
        parameters={"limit": limit},
    )
    return [str(row[0]) for row in result.result_rows]


def cost_by_org(client: Client, start: Instant, end: Instant) -> dict[str, int]:
    """org_id -> SUM(cost) in nano-units over [start, end), one row per request."""
    where, params = _where(None, start, end)
    result = client.query(
        f"SELECT org_id, sum(cost) FROM {CALL_LOG_READ} FINAL{where} GROUP BY org_id",  # noqa: S608
        parameters=params,
    )
    return {str(org): int(total) for org, total in result.result_rows}


def charged_by_org_day(
    client: Client, start: Instant, end: Instant
) -> dict[tuple[str, date], tuple[int, int]]:
    """(org_id, UTC day) -> (SUM(cost), calls with a cost) over [start, end), one row per
    request: what the ledger's usage entries must add up to."""
    where, params = _where(None, start, end)
    result = client.query(
        f"SELECT org_id, toDate(ts, 'UTC') AS day, sum(cost), countIf(cost > 0) "  # noqa: S608
        f"FROM {CALL_LOG_READ} FINAL{where} GROUP BY org_id, day",
        parameters=params,
    )
    return {(str(org), day): (int(cost), int(n)) for org, day, cost, n in result.result_rows}


def cost_for_org(client: Client, org_id: str, start: Instant, end: Instant) -> int:
    """SUM(cost) in nano-units for one org over [start, end)."""
    where, params = _where(org_id, start, end)
    result = client.query(f"SELECT sum(cost) FROM {CALL_LOG_READ} FINAL{where}", parameters=params)  # noqa: S608
    return int(result.result_rows[0][0])


@dataclass(frozen=True)
class CallPage:
    """One page of call records, newest first. `ts` is integer microseconds (as recorded)."""

    rows: list[dict[str, Any]]
    #: Pass back as `cursor` for the next (older) page; None on the last page.
    next_cursor: str | None


def _encode_cursor(ts_us: int, request_id: str) -> str:
    return f"{ts_us}:{request_id}"


def _decode_cursor(cursor: str) -> tuple[int, str]:
    ts_text, sep, request_id = cursor.partition(":")
    if not sep or not ts_text.lstrip("-").isdigit():
        raise ValueError("malformed page cursor")
    return int(ts_text), request_id


def _keyset_page(
    client: Client,
    where: str,
    params: dict[str, Any],
    cursor: str | None,
    limit: int,
    *,
    newest_first: bool,
) -> tuple[list[Sequence[Any]], str | None]:
    """One page of call_log rows (CALL_LOG_COLUMNS order, `ts` in microseconds) after
    `cursor` in (ts, request_id) order, and the cursor of the next page (None on the last).

    Keyset paging stays fast at any depth and neither skips nor repeats rows when calls
    arrive between pages."""
    if cursor is not None:
        cursor_ts, cursor_id = _decode_cursor(cursor)
        where += (" AND " if where else " WHERE ") + (
            f"(ts, request_id) {'<' if newest_first else '>'} "
            "(fromUnixTimestamp64Micro({cursor_ts:Int64}, 'UTC'), {cursor_id:String})"
        )
        params = {**params, "cursor_ts": cursor_ts, "cursor_id": cursor_id}
    order = "ts DESC, request_id DESC" if newest_first else "ts, request_id"
    # Aliased to ts_us, not ts: ClickHouse substitutes SELECT aliases into WHERE and ORDER
    # BY, which would turn the DateTime64 comparisons into integer ones.
    selected = ", ".join(
        "toUnixTimestamp64Micro(ts) AS ts_us" if name == "ts" else name for name in CALL_LOG_COLUMNS
    )
    result = client.query(
        f"SELECT {selected} FROM {CALL_LOG_READ} FINAL{where} "  # noqa: S608
        f"ORDER BY {order} LIMIT {{limit:UInt32}}",
        parameters={**params, "limit": limit + 1},
    )
    rows: list[Sequence[Any]] = list(result.result_rows)
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]
    ts_at, id_at = CALL_LOG_COLUMNS.index("ts"), CALL_LOG_COLUMNS.index("request_id")
    return rows, _encode_cursor(int(last[ts_at]), str(last[id_at]))


def org_calls(
    client: Client,
    org_id: str,
    *,
    limit: int = 100,
    cursor: str | None = None,
    start: Instant | None = None,
    end: Instant | None = None,
) -> CallPage:
    """An org's call records, newest first, keyset-paged on (ts, request_id).

    Keyset paging stays fast at any depth (the sort key starts with org_id, ts) and does
    not skip or repeat rows when new calls arrive between pages.
    """
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    where, params = _where(org_id, start, end)
    page, next_cursor = _keyset_page(client, where, params, cursor, limit, newest_first=True)
    rows = [dict(zip(CALL_LOG_COLUMNS, row, strict=True)) for row in page]
    return CallPage(rows=rows, next_cursor=next_cursor)


@dataclass(frozen=True)
class ExportPage:
    """Call records oldest first, each row in CALL_LOG_COLUMNS order (`ts` in microseconds)."""

    rows: list[list[Any]]
    #: Pass back as `after` for the next page; None on the last page.
    next_cursor: str | None


def export_page(
    client: Client, *, org_id: str | None = None, after: str | None = None, limit: int = 10_000
) -> ExportPage:
    """Every call record (optionally one org's), oldest first, keyset-paged on
    (ts, request_id): `onetoken calls export` reads it page by page, so a running control
    process holds its ClickHouse client for one page at a time, not for the whole export."""
    if limit < 1:
        raise ValueError("limit must be positive")
    where, params = _where(org_id, None, None)
    page, next_cursor = _keyset_page(client, where, params, after, limit, newest_first=False)
    return ExportPage(rows=[list(row) for row in page], next_cursor=next_cursor)

