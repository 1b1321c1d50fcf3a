"""Security events for a SIEM (docs/siem.md): the NDJSON export with a cursor, for pull
collectors, and the org's own syslog destination (org admins; the operator's is set by
ONETOKEN_SIEM_SYSLOG_ADDRESS)."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from onetoken import siem
from onetoken.kit.errors import NotFound, Unprocessable
from onetoken.kit.net import networks
from onetoken.security import audit
from onetoken.security import log as security_log
from onetoken.siem import service, syslog
from onetoken.siem.forwarder import target_of
from onetoken.siem.models import SiemDestination
from onetoken.siem.stream import Cursor, CursorError, read_after
from onetoken.web.deps import SecurityReadDep, SessionDep, SiemWriteDep, StateDep
from onetoken.web.routes.security import Runner, _runner

router = APIRouter(prefix="/security", tags=["security"])

MAX_EXPORT = 5000
NDJSON = "application/x-ndjson"

_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One security event (docs/siem.md, \"Event schema\").",
}


@router.get(
    "/events/export",
    response_class=Response,
    responses={200: {
        "description": "Events after the cursor, oldest first, one JSON object a line. "
                       "`X-Next-Cursor` is where the next request starts (the same cursor "
                       "when there was nothing new).",
        "content": {NDJSON: {"schema": _EVENT_SCHEMA}},
        "headers": {"X-Next-Cursor": {"schema": {"type": "string"}}},
    }},
)
def export_events(
    principal: SecurityReadDep,
    run: Annotated[Runner, Depends(_runner)],
    state: StateDep,
    request: Request,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    start: datetime | None = None,
    org_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EXPORT)] = 1000,
) -> Response:
    """The security log in delivery order for pull collectors (Splunk, Elastic,
    Datadog): events after `cursor` (or from `start`, or from the oldest kept), oldest
    first, up to `limit`. Events of the last ONETOKEN_SIEM_SETTLE_SECONDS are left for a
    later request, so a cursor never passes an event still on its way. Org admins get
    their own org's; operators every org's, or the one named by `org_id`."""
    if org_id is not None and org_id != principal.org_id and not principal.is_operator:
        raise NotFound("Organization not found.")
    scope = org_id if org_id is not None else (None if principal.is_operator else principal.org_id)
    if cursor is not None:
        try:
            after = Cursor.parse(cursor)
        except CursorError:
            raise Unprocessable("Malformed page cursor.", param="cursor") from None
    elif start is not None:
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)  # the log's clock
        # Just before `start`: "~" sorts after every event id of the microsecond before.
        after = Cursor(int(start.timestamp() * 1_000_000) - 1, "~")
    else:
        after = Cursor()
    writer = security_log.current()
    if writer is not None:
        writer.flush(run)
    events = read_after(run, after, org_id=scope, limit=limit,
                        settle_seconds=state.settings.siem_settle_seconds)
    following = events[-1].cursor if events else after
    body = b"".join(e.json_line() + b"\n" for e in events)
    query = {k: v for k, v in request.query_params.items() if k not in ("cursor", "start")}
    link = f"<{request.url.path}?{urlencode({**query, 'cursor': following.token()})}>"
    return Response(body, media_type=NDJSON, headers={
        "X-Next-Cursor": following.token(),
        "Link": f'{link}; rel="next"',
        "Cache-Control": "no-store",
    })


# -- the org's syslog destination ---------------------------------------------------------


class SiemDestinationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1, max_length=253,
                      pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._:-]+)$",
                      description="The receiver's name or address.")
    port: int = Field(default=6514, ge=1, le=65535, description="RFC 5425's port is 6514.")
    ca_pem: str | None = Field(
        default=None, max_length=service.MAX_CA_PEM,
        description="PEM CA certificates the receiver's certificate is verified with; "
                    "null or empty: the system's CAs; left out: the bundle saved before "
                    "(none for a new destination).")
    enabled: bool = True


class SiemDestinationOut(BaseModel):
    # False: no destination is set (the other fields empty).
    configured: bool = True
    host: str | None = None
    port: int | None = None
    has_ca: bool = False
    enabled: bool = False
    delivered: int = 0
    failures: int = 0
    last_error: str | None = None
    last_delivered_at: datetime | None = None
    next_attempt_at: datetime | None = None
    # When the last event the receiver confirmed happened (where the cursor is).
    delivered_through: datetime | None = None
    updated_at: datetime | None = None


class SiemTestResult(BaseModel):
    ok: bool
    event_id: str | None = None
    # A fixed code (tls_verify, connect_error, timeout, address_refused, ...).
    error: str | None = None


def _out(row: SiemDestination) -> SiemDestinationOut:
    return SiemDestinationOut(
        host=row.host, port=row.port, has_ca=bool(row.ca_pem), enabled=row.enabled,
        delivered=row.delivered, failures=row.failures, last_error=row.last_error,
        last_delivered_at=row.last_delivered_at, next_attempt_at=row.next_attempt_at,
        delivered_through=(
            datetime.fromtimestamp(row.cursor_ts_us / 1_000_000, UTC) if row.cursor_ts_us else None
        ),
        updated_at=row.updated_at,
    )


def _destination(session: SessionDep, org_id: str) -> SiemDestination:
    row = service.get(session, org_id)
    if row is None:
        raise NotFound("No SIEM destination is set.", code="siem_not_configured")
    return row


@router.get("/siem", response_model=SiemDestinationOut)
def get_destination(principal: SecurityReadDep, session: SessionDep) -> SiemDestinationOut:
    """The org's syslog destination and how its delivery goes (`configured` false when
    none is set)."""
    row = service.get(session, principal.org_id)
    return SiemDestinationOut(configured=False) if row is None else _out(row)


@router.put("/siem", response_model=SiemDestinationOut)
def put_destination(
    body: SiemDestinationIn, principal: SiemWriteDep, session: SessionDep, state: StateDep
) -> SiemDestinationOut:
    """Set the org's receiver. A new destination gets the events from now on (the
    export has the ones before); a changed one goes on from where it was."""
    row = service.save(
        session, principal.org_id, host=body.host.strip("[]"), port=body.port,
        ca_pem=(body.ca_pem or None) if "ca_pem" in body.model_fields_set else service.KEEP,
        enabled=body.enabled,
        allow=networks(state.settings.siem_private_cidrs),
    )
    session.commit()
    # Where the org's security events go is itself a security event.
    audit.event(principal, "admin.siem_changed", "medium", subject_id=row.id,
                detail={"host": row.host, "port": row.port, "has_ca": bool(row.ca_pem),
                        "enabled": row.enabled})
    forwarder = siem.current()
    if forwarder is not None:
        forwarder.poke()
    return _out(row)


@router.delete("/siem", status_code=204)
def delete_destination(principal: SiemWriteDep, session: SessionDep) -> None:
    row = _destination(session, principal.org_id)
    dest_id = row.id
    service.remove(session, principal.org_id)
    session.commit()
    audit.event(principal, "admin.siem_removed", "medium", subject_id=dest_id)


@router.post("/siem/test", response_model=SiemTestResult)
def test_destination(
    principal: SiemWriteDep, session: SessionDep, state: StateDep
) -> SiemTestResult:
    """Send one `siem.test` event to the saved receiver now and say how it went."""
    row = _destination(session, principal.org_id)
    target = target_of(row, state.settings)
    try:
        event_id = service.test_send(target, principal.org_id, hostname=_hostname(),
                                     timeout=state.settings.siem_timeout_seconds)
    except syslog.SendFailed as exc:
        return SiemTestResult(ok=False, error=exc.code)
    return SiemTestResult(ok=True, event_id=event_id)


def _hostname() -> str:
    forwarder = siem.current()
    return forwarder.hostname if forwarder is not None else socket.gethostname()
