"""GET /security/events: the security and audit log, for org admins (their org) and
operators (every org); /security/blocked: the source addresses the gateways refuse
(operators); and the handling of its events as incidents (/security/incidents)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onetoken.analytics import queries
from onetoken.analytics.columns import SECURITY_LOG_TABLE
from onetoken.incidents import service as incidents
from onetoken.incidents import sources
from onetoken.incidents.models import Incident, IncidentEvent, IncidentHistory
from onetoken.incidents.schemas import (
    Assign,
    EventsAdd,
    HistoryEntry,
    IncidentCreate,
    IncidentDetail,
    IncidentEventRef,
    IncidentList,
    IncidentResponse,
    NoteCreate,
    Resolve,
    Timeline,
    TimelineEntry,
)
from onetoken.incidents.schemas import Status as IncidentStatus
from onetoken.kit.errors import NotFound, Unprocessable
from onetoken.security import blocking
from onetoken.security import log as security_log
from onetoken.security.log import SECURITY_LOG_COLUMNS, SEVERITIES
from onetoken.security.models import BlockedSource
from onetoken.security.principal import Principal
from onetoken.web.deps import (
    SecurityBlockDep,
    SecurityHandleDep,
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


# -- incidents (docs/operations.md, "Incident response") --------------------------------------
# Reads need security.read, every step security.handle; an org's owners and admins reach
# their own org's events and incidents, operators every org's. Another org's event or
# incident is not found (404), never forbidden, so its existence does not show.

IncidentLimit = Annotated[int, Query(ge=1, le=200)]


def _incident_out(session: Session, incident: Incident) -> IncidentResponse:
    count = session.scalar(
        select(func.count()).where(IncidentEvent.incident_id == incident.id)
    )
    return IncidentResponse.model_validate(
        {**_columns(incident), "event_count": int(count or 0)}
    )


def _columns(incident: Incident) -> dict[str, Any]:
    return {c: getattr(incident, c) for c in IncidentResponse.model_fields if c != "event_count"}


def _history(h: IncidentHistory) -> HistoryEntry:
    return HistoryEntry.model_validate(h, from_attributes=True)


def _facts(
    run: Runner, principal: Principal, event_ids: list[str]
) -> list[incidents.EventFact]:
    """The named events as the security log holds them, within the caller's scope; one
    missing (unknown, or another org's) is a 404."""
    found = sources.fetch(run, event_ids, org_id=incidents.scope_of(principal))
    if any(e not in found for e in event_ids):
        raise NotFound("Event not found.")
    return [
        incidents.EventFact(e.event_id, e.ts, e.kind, e.severity, e.org_id)
        for e in (found[i] for i in dict.fromkeys(event_ids))
    ]


@router.post("/incidents", response_model=IncidentResponse, status_code=201)
def open_incident(
    body: IncidentCreate,
    principal: SecurityHandleDep,
    session: SessionDep,
    run: Annotated[Runner, Depends(_runner)],
) -> IncidentResponse:
    """Group security events (one org's) into a new incident."""
    facts = _facts(run, principal, body.event_ids)
    incident = incidents.open_incident(session, principal, facts, acknowledge=body.acknowledge)
    session.commit()
    return _incident_out(session, incident)


@router.get("/incidents", response_model=IncidentList)
def list_incidents(
    principal: SecurityReadDep,
    session: SessionDep,
    status: Annotated[list[IncidentStatus] | None, Query(max_length=3)] = None,
    org_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: IncidentLimit = 50,
    before: datetime | None = None,
) -> IncidentList:
    """Newest first; org admins see their org's, operators every org's (or `org_id`'s)."""
    rows, more = incidents.list_incidents(
        session, principal, org_id=org_id, statuses=status, limit=limit, before=before
    )
    return IncidentList(data=[_incident_out(session, i) for i in rows], has_more=more)


@router.get("/incidents/{incident_id}", response_model=IncidentDetail)
def get_incident(
    incident_id: str, principal: SecurityReadDep, session: SessionDep
) -> IncidentDetail:
    """The incident with its events and its whole handling history."""
    incident = incidents.get(session, incident_id, principal)
    events = incidents.events_of(session, incident.id)
    return IncidentDetail(
        **_incident_out(session, incident).model_dump(),
        events=[
            IncidentEventRef(event_id=e.event_id, ts=e.event_ts, kind=e.kind,
                             severity=e.severity, added_by=e.added_by, added_at=e.added_at)
            for e in events
        ],
        history=[_history(h) for h in incidents.history_of(session, incident.id)],
    )


@router.post("/incidents/{incident_id}/events", response_model=IncidentResponse)
def add_incident_events(
    incident_id: str,
    body: EventsAdd,
    principal: SecurityHandleDep,
    session: SessionDep,
    run: Annotated[Runner, Depends(_runner)],
) -> IncidentResponse:
    """Add events of the incident's org to it."""
    incident = incidents.get(session, incident_id, principal)
    incident = incidents.add_events(session, principal, incident,
                                    _facts(run, principal, body.event_ids))
    session.commit()
    return _incident_out(session, incident)


@router.post("/incidents/{incident_id}/acknowledge", response_model=IncidentResponse)
def acknowledge_incident(
    incident_id: str, principal: SecurityHandleDep, session: SessionDep
) -> IncidentResponse:
    incident = incidents.acknowledge(session, principal,
                                     incidents.get(session, incident_id, principal))
    session.commit()
    return _incident_out(session, incident)


@router.post("/incidents/{incident_id}/assign", response_model=IncidentResponse)
def assign_incident(
    incident_id: str, body: Assign, principal: SecurityHandleDep, session: SessionDep
) -> IncidentResponse:
    """Assign to an operator or an owner or admin of the incident's org (org admins: an
    account of their own org), or unassign with `null`."""
    incident = incidents.assign(session, principal,
                                incidents.get(session, incident_id, principal),
                                body.assignee_id)
    session.commit()
    return _incident_out(session, incident)


@router.post("/incidents/{incident_id}/notes", response_model=HistoryEntry, status_code=201)
def note_incident(
    incident_id: str, body: NoteCreate, principal: SecurityHandleDep, session: SessionDep
) -> HistoryEntry:
    """A short handling remark: one line of at most 280 characters, no brackets or
    backticks, no unbroken run over 40 characters. Never request content."""
    entry = incidents.add_note(session, principal,
                               incidents.get(session, incident_id, principal), body.text)
    session.commit()
    return _history(entry)


@router.post("/incidents/{incident_id}/resolve", response_model=IncidentResponse)
def resolve_incident(
    incident_id: str, body: Resolve, principal: SecurityHandleDep, session: SessionDep
) -> IncidentResponse:
    incident = incidents.resolve(session, principal,
                                 incidents.get(session, incident_id, principal),
                                 body.resolution)
    session.commit()
    return _incident_out(session, incident)


@router.post("/incidents/{incident_id}/reopen", response_model=IncidentResponse)
def reopen_incident(
    incident_id: str, principal: SecurityHandleDep, session: SessionDep
) -> IncidentResponse:
    incident = incidents.reopen(session, principal,
                                incidents.get(session, incident_id, principal))
    session.commit()
    return _incident_out(session, incident)


@router.get("/incidents/{incident_id}/timeline", response_model=Timeline)
def incident_timeline(
    incident_id: str,
    principal: SecurityReadDep,
    session: SessionDep,
    run: Annotated[Runner, Depends(_runner)],
) -> Timeline:
    """The incident's events as the security log holds them and its handling steps, in
    time order (an event before a step of the same instant)."""
    incident = incidents.get(session, incident_id, principal)
    linked = incidents.events_of(session, incident.id)
    logged = sources.fetch(run, [e.event_id for e in linked], org_id=incident.org_id or "")
    entries: list[tuple[datetime, int, str, TimelineEntry]] = []
    for link in linked:
        ev = logged.get(link.event_id)
        entries.append((link.event_ts, 0, link.event_id, TimelineEntry(
            ts=link.event_ts, source="security_log", kind=link.kind, severity=link.severity,
            event_id=link.event_id, actor_id=ev.actor_id if ev else "",
            subject_id=ev.subject_id if ev else None, detail=ev.detail if ev else {},
            note=None,
        )))
    for h in incidents.history_of(session, incident.id):
        entries.append((h.at, 1, f"{h.id:020d}", TimelineEntry(
            ts=h.at, source="handling", kind=f"incident.{h.action}", severity=None,
            event_id=None, actor_id=h.actor_id, subject_id=incident.id,
            detail={"status": h.status, "assignee_id": h.assignee_id,
                    "resolution": h.resolution, "event_count": h.event_count},
            note=h.note,
        )))
    entries.sort(key=lambda e: e[:3])
    return Timeline(incident_id=incident.id, data=[e[3] for e in entries])


@router.post("/events/{event_id}/acknowledge", response_model=IncidentResponse)
def acknowledge_event(
    event_id: Annotated[str, Path(max_length=64)],
    principal: SecurityHandleDep,
    session: SessionDep,
    run: Annotated[Runner, Depends(_runner)],
) -> IncidentResponse:
    """Acknowledge one event: the incident holding it, or a new incident of that event
    alone, taken at once."""
    try:
        incident = incidents.incident_of_event(session, event_id, principal)
    except NotFound:
        incident = incidents.open_incident(
            session, principal, _facts(run, principal, [event_id]), acknowledge=True
        )
    else:
        incident = incidents.acknowledge(session, principal, incident)
    session.commit()
    return _incident_out(session, incident)


@router.get("/events/{event_id}/incident", response_model=IncidentResponse)
def incident_of_event(
    event_id: Annotated[str, Path(max_length=64)], principal: SecurityReadDep,
    session: SessionDep,
) -> IncidentResponse:
    """The incident an event belongs to (404: none, or not the caller's to see)."""
    return _incident_out(session, incidents.incident_of_event(session, event_id, principal))
