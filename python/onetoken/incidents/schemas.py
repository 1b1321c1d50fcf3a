"""Request and response bodies of the incident endpoints (/api/v1/security/...)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from onetoken.incidents.models import NOTE_MAX_CHARS
from onetoken.incidents.service import MAX_EVENTS

Status = Literal["open", "acknowledged", "resolved"]
Resolution = Literal["fixed", "mitigated", "false_positive", "accepted_risk", "duplicate"]
Action = Literal[
    "opened", "acknowledged", "assigned", "unassigned", "noted", "events_added", "resolved",
    "reopened",
]
EventId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IncidentCreate(_Body):
    event_ids: list[EventId] = Field(min_length=1, max_length=MAX_EVENTS)
    # Take it at once (status acknowledged), as acknowledging one event does.
    acknowledge: bool = False


class EventsAdd(_Body):
    event_ids: list[EventId] = Field(min_length=1, max_length=MAX_EVENTS)


class Assign(_Body):
    # None takes the assignment away.
    assignee_id: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None


class NoteCreate(_Body):
    # The length is checked here too, so a longer note is refused before anything else;
    # incidents.notes holds the other rules (one line, no payloads, no long tokens).
    text: Annotated[str, StringConstraints(min_length=1, max_length=NOTE_MAX_CHARS)]


class Resolve(_Body):
    resolution: Resolution


class IncidentResponse(BaseModel):
    id: str
    org_id: str | None
    severity: str
    status: Status
    assignee_id: str | None
    resolution: Resolution | None
    opened_by: str
    created_at: datetime
    updated_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    event_count: int


class IncidentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[IncidentResponse]
    has_more: bool


class HistoryEntry(BaseModel):
    at: datetime
    actor_id: str
    action: Action
    status: Status
    assignee_id: str | None
    resolution: Resolution | None
    event_count: int | None
    note: str | None


class IncidentEventRef(BaseModel):
    event_id: str
    ts: datetime
    kind: str
    severity: str
    added_by: str
    added_at: datetime


class IncidentDetail(IncidentResponse):
    events: list[IncidentEventRef]
    history: list[HistoryEntry]


class TimelineEntry(BaseModel):
    """One line of an incident's timeline: an event of the security log, or a handling
    step (kind `incident.<action>`)."""

    ts: datetime
    source: Literal["security_log", "handling"]
    kind: str
    severity: str | None
    event_id: str | None
    actor_id: str
    subject_id: str | None
    # The event's metadata as logged (empty when the log no longer holds the event), or
    # the step's outcome (status, assignee, resolution, event count).
    detail: dict[str, Any]
    note: str | None


class Timeline(BaseModel):
    object: Literal["list"] = "list"
    incident_id: str
    data: list[TimelineEntry]
