"""Call metadata for org admins: their own org's call_log rows and usage totals, and
read-only SQL over them (docs/sql.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from onetoken.analytics import queries
from onetoken.analytics.sqlaccess import SqlQueryError, SqlResult, limits_from
from onetoken.kit.errors import BadRequest, Forbidden, Unprocessable
from onetoken.security.sqlaudit import readable_tables, run_audited
from onetoken.web.deps import (
    AnalyticsSqlDep,
    CallsReadDep,
    StateDep,
    UsageReadDep,
    call_log_sink,
)

router = APIRouter(tags=["calls"])


class CallPageResponse(BaseModel):
    data: list[dict[str, Any]]
    next_cursor: str | None


class UsageSummary(BaseModel):
    org_id: str
    calls: int
    cost_units: int


@router.get("/calls", response_model=CallPageResponse)
def list_calls(
    principal: CallsReadDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE_SIZE)] = 100,
    cursor: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> CallPageResponse:
    """The caller's org's call records, newest first (metadata only; `ts` in microseconds)."""
    try:
        page = call_log_sink(state).read(
            lambda c: queries.org_calls(
                c, principal.org_id, limit=limit, cursor=cursor, start=start, end=end
            )
        )
    except ValueError as exc:
        raise Unprocessable("Malformed page cursor.", param="cursor") from exc
    return CallPageResponse(data=page.rows, next_cursor=page.next_cursor)


@router.get("/usage/summary", response_model=UsageSummary)
def usage_summary(
    principal: UsageReadDep,
    state: StateDep,
    start: datetime | None = None,
    end: datetime | None = None,
) -> UsageSummary:
    """Calls and total cost (nano-units) of the caller's org over [start, end)."""

    def query(c: Any) -> tuple[int, int]:
        calls = queries.count_calls(c, org_id=principal.org_id, start=start, end=end)
        until = end or datetime.now(UTC) + timedelta(days=1)
        cost = queries.cost_for_org(c, principal.org_id, start or 0, until)
        return calls, cost

    calls, cost = call_log_sink(state).read(query)
    return UsageSummary(org_id=principal.org_id, calls=calls, cost_units=cost)


#: Longest query text taken (a query is SQL, not data: larger means something is wrong).
MAX_QUERY_CHARS = 100_000


class SqlRequest(BaseModel):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    #: rows: each row a list in column order; objects: each row keyed by column name.
    format: Literal["rows", "objects"] = "rows"
    #: Operators only: the org whose rows to read (default: the caller's own).
    org: str | None = Field(default=None, min_length=1, max_length=64)
    #: Operators only: read every org's rows.
    all_orgs: bool = False


class SqlResponse(BaseModel):
    columns: list[str]
    types: list[str]
    rows: list[Any]
    row_count: int
    truncated: bool
    elapsed_ms: float
    #: The org the rows were limited to; null when every org's were read.
    org: str | None


class SqlError(BadRequest):
    """sql_refused, sql_error or sql_limit_exceeded. The message is ClickHouse's about the
    caller's own query (which it may quote back to that caller only; nothing logs it)."""


def sql_scope(principal: Any, org: str | None, all_orgs: bool) -> str | None:
    """The org a query is limited to (None: all), as the caller may ask."""
    if (org is not None and org != principal.org_id) or all_orgs:
        if not principal.is_operator:
            raise Forbidden("Only operators may read another organization's rows.")
        if org is not None and all_orgs:
            raise Unprocessable("Give org or all_orgs, not both.", param="org")
    return None if all_orgs else (org or principal.org_id)


def sql_response(result: SqlResult, org: str | None, fmt: str) -> SqlResponse:
    rows: list[Any] = result.rows
    if fmt == "objects":
        rows = [dict(zip(result.columns, row, strict=True)) for row in rows]
    return SqlResponse(
        columns=result.columns, types=result.types, rows=rows, row_count=result.row_count,
        truncated=result.truncated, elapsed_ms=result.elapsed_ms, org=org,
    )


@router.post("/analytics/sql", response_model=SqlResponse)
def analytics_sql(body: SqlRequest, principal: AnalyticsSqlDep, state: StateDep) -> SqlResponse:
    """Run one read-only SELECT over the caller's org's call metadata, rollups, names and
    security log (docs/sql.md); ClickHouse enforces the scope and the limits."""
    org = sql_scope(principal, body.org, body.all_orgs)
    limits = limits_from(state.settings)
    tables = readable_tables(principal.role, principal.is_operator)
    try:
        result = call_log_sink(state).read(
            lambda c: run_audited(principal, c, body.query, org_id=org, limits=limits,
                                  tables=tables)
        )
    except SqlQueryError as exc:
        raise SqlError(exc.message, code=exc.code, param="query") from None
    return sql_response(result, org, body.format)
