"""Tables of the incidents domain: the handling state of security events.

The events themselves stay in ClickHouse's `security_log`, where they are immutable;
here is what was decided about them. `incident_events` is keyed by the log's event id,
so an event belongs to at most one incident. `incident_history` is append-only: the
service only ever inserts into it (who did what, when), and the incident row holds the
state that history leads to.

Nothing here holds content. Notes are short staff remarks under the rules of
`incidents.notes` (a length cap, one line, no payload characters, no key-like tokens).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, BigIntPK, UTCDateTime, utcnow
from onetoken.orgs.models import Org

# open: grouped, nobody has taken it yet; acknowledged: someone is on it; resolved: done
# (reopening goes back to acknowledged).
STATUSES = ("open", "acknowledged", "resolved")
RESOLUTIONS = ("fixed", "mitigated", "false_positive", "accepted_risk", "duplicate")
ACTIONS = (
    "opened",
    "acknowledged",
    "assigned",
    "unassigned",
    "noted",
    "events_added",
    "resolved",
    "reopened",
)
NOTE_MAX_CHARS = 280


class Incident(Base):
    __tablename__ = "incidents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # None: a platform incident (its events carry no org); only operators see it.
    org_id: Mapped[str | None] = mapped_column(ForeignKey(Org.id), nullable=True)
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="open")
    assignee_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    resolution: Mapped[str | None] = mapped_column(String(24), nullable=True)
    opened_by: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_incidents_org_id_created_at", "org_id", "created_at"),
        Index("ix_incidents_status_created_at", "status", "created_at"),
    )


class IncidentEvent(Base):
    """A security-log event handled as part of an incident (what the log said of it is
    copied at grouping time: the timeline's window and the incident's severity)."""

    __tablename__ = "incident_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    incident_id: Mapped[str] = mapped_column(
        ForeignKey(Incident.id, ondelete="CASCADE"), index=True
    )
    event_ts: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    added_by: Mapped[str] = mapped_column(String(32))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IncidentHistory(Base):
    """One handling step, never changed once written."""

    __tablename__ = "incident_history"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    incident_id: Mapped[str] = mapped_column(
        ForeignKey(Incident.id, ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor_id: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(16))
    # The incident's status once the step was taken.
    status: Mapped[str] = mapped_column(String(16))
    assignee_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    resolution: Mapped[str | None] = mapped_column(String(24), nullable=True)
    event_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    note: Mapped[str | None] = mapped_column(String(NOTE_MAX_CHARS), nullable=True)
