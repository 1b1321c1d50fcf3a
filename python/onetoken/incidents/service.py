"""Incident handling: opening an incident from security-log events, acknowledging,
assigning, annotating, resolving and reopening it, each step appended to its history and
audited in the security log.

Scope: operators handle every incident; an org's owners and admins handle their own org's
(an incident of another org, or a platform incident, is not found for them: 404). Callers
commit. Every step takes the incident's row first (`_claim`), so concurrent steps on one
incident run one after the other and each sees the status the previous one committed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.incidents import notes
from onetoken.incidents.models import Incident, IncidentEvent, IncidentHistory
from onetoken.kit.errors import Conflict, NotFound, Unprocessable
from onetoken.orgs.models import Account
from onetoken.security import audit
from onetoken.security.log import SEVERITIES
from onetoken.security.permissions import PERMISSIONS
from onetoken.security.principal import Principal

MAX_EVENTS = 100


class InvalidTransition(Conflict, code="invalid_transition"): ...


class EventAlreadyHandled(Conflict, code="event_already_handled"): ...


@dataclass(frozen=True, slots=True)
class EventFact:
    """What grouping needs to know of a logged event."""

    event_id: str
    ts: datetime
    kind: str
    severity: str
    org_id: str  # "" for a platform-wide event


def scope_of(principal: Principal) -> str | None:
    """The org whose incidents `principal` handles; None: every org (operators)."""
    return None if principal.is_operator else principal.org_id


def _visible(incident: Incident | None, principal: Principal) -> Incident:
    if incident is None or (
        not principal.is_operator and incident.org_id != principal.org_id
    ):
        raise NotFound("Incident not found.")
    return incident


def get(session: Session, incident_id: str, principal: Principal) -> Incident:
    return _visible(session.get(Incident, incident_id), principal)


def incident_of_event(session: Session, event_id: str, principal: Principal) -> Incident:
    link = session.get(IncidentEvent, event_id)
    if link is None:
        raise NotFound("This event is not part of an incident.")
    try:
        return _visible(session.get(Incident, link.incident_id), principal)
    except NotFound:
        raise NotFound("This event is not part of an incident.") from None


def list_incidents(
    session: Session,
    principal: Principal,
    *,
    org_id: str | None = None,
    statuses: Sequence[str] | None = None,
    limit: int = 50,
    before: datetime | None = None,
) -> tuple[list[Incident], bool]:
    """Newest first; `before` pages on `created_at`."""
    scope = scope_of(principal)
    if org_id is not None and scope is not None and org_id != scope:
        raise NotFound("Organization not found.")
    query = select(Incident)
    wanted = org_id if org_id is not None else scope
    if wanted is not None:
        query = query.where(Incident.org_id == wanted)
    if statuses:
        query = query.where(Incident.status.in_(list(statuses)))
    if before is not None:
        query = query.where(Incident.created_at < before)
    rows = list(
        session.scalars(query.order_by(Incident.created_at.desc(), Incident.id).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def events_of(session: Session, incident_id: str) -> list[IncidentEvent]:
    return list(
        session.scalars(
            select(IncidentEvent)
            .where(IncidentEvent.incident_id == incident_id)
            .order_by(IncidentEvent.event_ts, IncidentEvent.event_id)
        )
    )


def history_of(session: Session, incident_id: str) -> list[IncidentHistory]:
    return list(
        session.scalars(
            select(IncidentHistory)
            .where(IncidentHistory.incident_id == incident_id)
            .order_by(IncidentHistory.id)
        )
    )


# -- steps ---------------------------------------------------------------------------------


def _claim(session: Session, incident: Incident) -> None:
    """Take the incident's row for this transaction and reload it (a write that changes
    nothing: a row lock on PostgreSQL, the write lock on SQLite)."""
    session.execute(
        update(Incident).where(Incident.id == incident.id).values(updated_at=Incident.updated_at)
    )
    session.refresh(incident)


def _step(
    session: Session,
    principal: Principal,
    incident: Incident,
    action: str,
    *,
    note: str | None = None,
    event_count: int | None = None,
) -> IncidentHistory:
    """Append the step to the history and to the security log, in the incident's org
    (so an org sees who handled its events). The log gets the note's length, never its
    text: the security log is metadata only."""
    now = utcnow()
    incident.updated_at = now
    entry = IncidentHistory(
        incident_id=incident.id,
        at=now,
        actor_id=principal.account_id,
        action=action,
        status=incident.status,
        assignee_id=incident.assignee_id,
        resolution=incident.resolution,
        event_count=event_count,
        note=note,
    )
    session.add(entry)
    session.flush()
    detail: dict[str, str | int | None] = {"status": incident.status}
    if action in ("assigned", "unassigned"):
        detail["assignee_id"] = incident.assignee_id
    if action == "resolved":
        detail["resolution"] = incident.resolution
    if event_count is not None:
        detail["event_count"] = event_count
    if note is not None:
        detail["note_chars"] = len(note)
    audit.event(
        principal,
        f"incident.{action}",
        "low" if action in ("resolved", "reopened") else "info",
        subject_id=incident.id,
        org_id=incident.org_id or "",
        detail=detail,
    )
    return entry


def _highest(severities: Sequence[str]) -> str:
    return max(severities, key=SEVERITIES.index)


def _link(
    session: Session, principal: Principal, incident: Incident, events: Sequence[EventFact]
) -> None:
    if not events:
        raise Unprocessable("Name at least one event.", param="event_ids")
    if len(events) > MAX_EVENTS:
        raise Unprocessable(f"At most {MAX_EVENTS} events at a time.", param="event_ids")
    if any((e.org_id or None) != incident.org_id for e in events):
        raise Unprocessable(
            "An incident's events all belong to one organization.",
            param="event_ids",
            code="events_span_orgs",
        )
    ids = [e.event_id for e in events]
    if session.scalar(select(IncidentEvent.event_id).where(IncidentEvent.event_id.in_(ids))):
        raise EventAlreadyHandled("An event named is already part of an incident.")
    now = utcnow()
    try:
        with session.begin_nested():
            session.add_all(
                IncidentEvent(
                    event_id=e.event_id,
                    incident_id=incident.id,
                    event_ts=e.ts,
                    kind=e.kind,
                    severity=e.severity,
                    added_by=principal.account_id,
                    added_at=now,
                )
                for e in events
            )
    except IntegrityError:
        # Another handler grouped one of these events at the same moment: it is theirs.
        raise EventAlreadyHandled("An event named is already part of an incident.") from None
    incident.severity = _highest([incident.severity, *(e.severity for e in events)])


def open_incident(
    session: Session,
    principal: Principal,
    events: Sequence[EventFact],
    *,
    acknowledge: bool = False,
) -> Incident:
    """A new incident of `events` (all of one org, none already in an incident); with
    `acknowledge`, the opener takes it at once."""
    org = {e.org_id for e in events}
    org_id = (next(iter(org)) or None) if len(org) == 1 else None
    if org_id is None and not principal.is_operator:
        # Platform events are not the org's: the route never finds them for an org admin.
        raise NotFound("Event not found.")
    now = utcnow()
    incident = Incident(
        id=new_id("inc"),
        org_id=org_id,
        severity=_highest([e.severity for e in events]) if events else "info",
        status="open",
        opened_by=principal.account_id,
        created_at=now,
        updated_at=now,
    )
    session.add(incident)
    session.flush()
    _link(session, principal, incident, events)
    _step(session, principal, incident, "opened", event_count=len(events))
    if acknowledge:
        _acknowledge(session, principal, incident)
    return incident


def add_events(
    session: Session, principal: Principal, incident: Incident, events: Sequence[EventFact]
) -> Incident:
    _claim(session, incident)
    if incident.status == "resolved":
        raise InvalidTransition("A resolved incident takes no more events; reopen it first.")
    _link(session, principal, incident, events)
    _step(session, principal, incident, "events_added", event_count=len(events))
    return incident


def _acknowledge(session: Session, principal: Principal, incident: Incident) -> None:
    if incident.status != "open":
        raise InvalidTransition("Only an open incident can be acknowledged.")
    incident.status = "acknowledged"
    incident.acknowledged_at = utcnow()
    _step(session, principal, incident, "acknowledged")


def acknowledge(session: Session, principal: Principal, incident: Incident) -> Incident:
    _claim(session, incident)
    _acknowledge(session, principal, incident)
    return incident


def _check_assignee(
    session: Session, principal: Principal, incident: Incident, assignee_id: str
) -> None:
    """The assignee is an active account that may handle the incident: an operator, or an
    owner or admin of the incident's org. An org admin assigns within their own org only;
    an account beyond the caller's reach is not found."""
    account = session.get(Account, assignee_id)
    if account is None or account.status != "active" or (
        not principal.is_operator and account.org_id != principal.org_id
    ):
        raise NotFound("Account not found.")
    handles = account.is_operator or (
        incident.org_id is not None
        and account.org_id == incident.org_id
        and account.role in PERMISSIONS["security.handle"].roles
    )
    if not handles:
        raise Unprocessable(
            "This account cannot handle this incident.",
            param="assignee_id",
            code="assignee_out_of_scope",
        )


def assign(
    session: Session, principal: Principal, incident: Incident, assignee_id: str | None
) -> Incident:
    """Assign to `assignee_id`, or take the assignment away with None."""
    _claim(session, incident)
    if incident.status == "resolved":
        raise InvalidTransition("A resolved incident is not assigned; reopen it first.")
    if assignee_id is not None:
        _check_assignee(session, principal, incident, assignee_id)
    if assignee_id == incident.assignee_id:
        raise InvalidTransition("The incident is already assigned so.")
    incident.assignee_id = assignee_id
    _step(session, principal, incident, "assigned" if assignee_id else "unassigned")
    return incident


def add_note(
    session: Session, principal: Principal, incident: Incident, text: str
) -> IncidentHistory:
    """A note, in any status (a resolved incident still takes its post-mortem remarks)."""
    note = notes.check(text)
    _claim(session, incident)
    return _step(session, principal, incident, "noted", note=note)


def resolve(
    session: Session, principal: Principal, incident: Incident, resolution: str
) -> Incident:
    _claim(session, incident)
    if incident.status != "acknowledged":
        raise InvalidTransition("Only an acknowledged incident can be resolved.")
    incident.status = "resolved"
    incident.resolution = resolution
    incident.resolved_at = utcnow()
    _step(session, principal, incident, "resolved")
    return incident


def reopen(session: Session, principal: Principal, incident: Incident) -> Incident:
    _claim(session, incident)
    if incident.status != "resolved":
        raise InvalidTransition("Only a resolved incident can be reopened.")
    incident.status = "acknowledged"
    incident.resolution = None
    incident.resolved_at = None
    _step(session, principal, incident, "reopened")
    return incident


def purge_resolved(
    session: Session, cutoff: datetime, *, keep_orgs: Collection[str] = ()
) -> int:
    """Delete incidents resolved before `cutoff`, with their event links and history (the
    retention purge: the handling record goes when the security log has let go of the
    events it is about). Open and acknowledged incidents are kept whatever their age, and
    so are those of `keep_orgs` (under a legal hold)."""
    ids = list(
        session.scalars(
            select(Incident.id).where(
                Incident.status == "resolved",
                Incident.resolved_at < cutoff,
                Incident.org_id.not_in(list(keep_orgs)),
            )
        )
    )
    if not ids:
        return 0
    # Children first: SQLite enforces no cascade unless told to.
    session.execute(delete(IncidentHistory).where(IncidentHistory.incident_id.in_(ids)))
    session.execute(delete(IncidentEvent).where(IncidentEvent.incident_id.in_(ids)))
    session.execute(delete(Incident).where(Incident.id.in_(ids)))
    return len(ids)
