"""Call metadata for org admins: their own org's call_log rows and usage totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from onetoken.analytics import queries
from onetoken.kit.errors import Unprocessable
from onetoken.web.deps import CallsReadDep, StateDep, UsageReadDep, call_log_sink

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
