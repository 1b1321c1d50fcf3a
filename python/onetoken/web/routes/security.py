"""GET /security/events: the security and audit log, for org admins (their org) and
operators (every org); /security/blocked: the source addresses the gateways refuse
(operators)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from onetoken.analytics import queries
from onetoken.analytics.columns import SECURITY_LOG_TABLE
from onetoken.kit.errors import NotFound, Unprocessable
from onetoken.security import blocking
from onetoken.security import log as security_log
from onetoken.security.log import SECURITY_LOG_COLUMNS, SEVERITIES
from onetoken.security.models import BlockedSource
from onetoken.web.deps import (
    SecurityBlockDep,
    SecurityReadDep,
    ServiceUnavailable,
    SessionDep,
    StateDep,
)

router = APIRouter(prefix="/security", tags=["security"])

MAX_PAGE = 1000


class SecurityEventOut(BaseModel):
    ts: datetime
    event_id: str
    kind: str
    severity: str
    org_id: str
    actor_id: str
    subject_id: str
    source_ip: str
    user_agent: str
    detail: dict[str, Any]


class SecurityEventPage(BaseModel):
    object: str = "list"
    data: list[SecurityEventOut]
    next_cursor: str | None


Runner = Callable[[Callable[[Any], Any]], Any]


def _runner(request: Request, state: StateDep) -> Runner:
    override = getattr(request.app.state, "security_log_runner", None)
    if override is not None:
        return override  # type: ignore[no-any-return]
    if state.runtime is not None:
        read: Runner = getattr(state.runtime.sink, "read")  # noqa: B009 (CallLogSink.read)
        return read
    raise ServiceUnavailable(
        "The security log is served by a running gateway.", code="security_log_unavailable"
    )


def _cursor(ts_us: int, event_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([ts_us, event_id])).decode()


def _parse_cursor(value: str) -> tuple[int, str]:
    try:
        ts_us, event_id = orjson.loads(base64.urlsafe_b64decode(value.encode()))
        assert isinstance(ts_us, int) and isinstance(event_id, str) and len(event_id) <= 64
        return ts_us, event_id
    except Exception:
        raise Unprocessable("Malformed page cursor.", param="cursor") from None


@router.get("/events", response_model=SecurityEventPage)
def list_events(
    principal: SecurityReadDep,
    run: Annotated[Runner, Depends(_runner)],
    kind: Annotated[list[str] | None, Query(max_length=20)] = None,
    min_severity: Annotated[str | None, Query(pattern="^(info|low|medium|high|critical)$")] = None,
    actor_id: Annotated[str | None, Query(max_length=64)] = None,
    subject_id: Annotated[str | None, Query(max_length=64)] = None,
    org_id: Annotated[str | None, Query(max_length=64)] = None,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: str | None = None,
) -> SecurityEventPage:
    """Newest first. Org admins see their own org only; operators every org (or the one
    named by `org_id`)."""
    if org_id is not None and org_id != principal.org_id and not principal.is_operator:
        raise NotFound("Organization not found.")
    scope_org = org_id if org_id is not None else (
        None if principal.is_operator else principal.org_id
    )
    writer = security_log.current()
    if writer is not None:
        writer.flush(run)  # what was recorded a moment ago is visible now

    where, params = queries.window_filters(scope_org, start, end)
    if kind:
        where.append("kind IN {kinds:Array(String)}")
        params["kinds"] = kind
    if min_severity is not None:
        where.append("severity IN {sev:Array(String)}")
        params["sev"] = list(SEVERITIES[SEVERITIES.index(min_severity):])
    if actor_id is not None:
        where.append("actor_id = {actor:String}")
        params["actor"] = actor_id
    if subject_id is not None:
        where.append("subject_id = {subject:String}")
        params["subject"] = subject_id
    if cursor is not None:
        c_ts, c_id = _parse_cursor(cursor)
        where.append(
            "(toUnixTimestamp64Micro(ts), event_id) < ({c_ts:Int64}, {c_id:String})"
        )
        params["c_ts"], params["c_id"] = c_ts, c_id
    columns = ", ".join(
        "toUnixTimestamp64Micro(ts)" if c == "ts" else c for c in SECURITY_LOG_COLUMNS
    )
    sql = (
        f"SELECT {columns} FROM {SECURITY_LOG_TABLE} FINAL"  # noqa: S608 (fixed names)
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY ts DESC, event_id DESC LIMIT {limit:UInt32}"
    )
    params["limit"] = limit + 1
    rows = run(lambda c: c.query(sql, parameters=params).result_rows)
    more = len(rows) > limit
    rows = rows[:limit]
    data = [
        SecurityEventOut(
            **{
                **dict(zip(SECURITY_LOG_COLUMNS, row, strict=True)),
                "ts": datetime.fromtimestamp(row[0] / 1_000_000, UTC),
                "detail": orjson.loads(row[-1]) if row[-1] else {},
            }
        )
        for row in rows
    ]
    next_cursor = _cursor(int(rows[-1][0]), str(rows[-1][1])) if more and rows else None
    return SecurityEventPage(data=data, next_cursor=next_cursor)


# -- blocked sources ---------------------------------------------------------------------------

#: The reason code of a block an operator set by hand (detectors set their own codes).
OPERATOR_BLOCK = "operator"
MAX_BLOCK_MINUTES = 366 * 24 * 60


class BlockedOut(BaseModel):
    source: str
    until: datetime
    reason: str
    created_at: datetime


class BlockedList(BaseModel):
    object: str = "list"
    data: list[BlockedOut]


class BlockRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=2, max_length=64, description="An address or a network.")
    minutes: int = Field(ge=1, le=MAX_BLOCK_MINUTES)


class UnblockRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=2, max_length=64)


def _normalized(source: str) -> str:
    try:
        return blocking.normalize(source)
    except ValueError:
        raise Unprocessable("Not an IP address or network.", param="source") from None


def _blocked_out(row: BlockedSource) -> BlockedOut:
    return BlockedOut(source=row.cidr, until=row.until, reason=row.reason,
                      created_at=row.created_at)


@router.get("/blocked", response_model=BlockedList)
def list_blocked(_: SecurityBlockDep, session: SessionDep) -> BlockedList:
    """Sources the gateways refuse now (expired blocks are not listed)."""
    return BlockedList(data=[_blocked_out(r) for r in blocking.active(session)])


@router.post("/blocked", response_model=BlockedOut, status_code=201)
def block_source(body: BlockRequest, _: SecurityBlockDep, session: SessionDep) -> BlockedOut:
    """Refuse every request from `source` for `minutes` (a longer block already in place
    stays); the gateways have it with their next snapshot."""
    cidr = _normalized(body.source)
    blocking.block(session, cidr, body.minutes * 60, OPERATOR_BLOCK)
    session.commit()
    row = session.get(BlockedSource, cidr)
    assert row is not None
    return _blocked_out(row)


@router.post("/blocked/remove", status_code=204)
def unblock_source(body: UnblockRequest, _: SecurityBlockDep, session: SessionDep) -> None:
    """Lift the block on `source` (whoever set it)."""
    if not blocking.unblock(session, _normalized(body.source)):
        raise NotFound("That source is not blocked.")
    session.commit()
