"""Incident handling: incidents over security-log events, the events they hold (keyed by
the log's event id) and their append-only handling history."""

import sqlalchemy as sa

from onetoken.db.migrations.shapes import at, create_table, ref, serial_id

revision: str = "0018_incidents"
down_revision: str | None = "0017_tickets"


def upgrade() -> None:
    create_table(
        "incidents",
        ref("id"),
        ref("org_id", nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        ref("assignee_id", nullable=True),
        sa.Column("resolution", sa.String(length=24), nullable=True),
        ref("opened_by"),
        at("created_at"),
        at("updated_at"),
        at("acknowledged_at", nullable=True),
        at("resolved_at", nullable=True),
        refs={"org_id": "orgs"},
        indexes=(("org_id", "created_at"), ("status", "created_at")),
    )
    create_table(
        "incident_events",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        ref("incident_id"),
        at("event_ts"),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        ref("added_by"),
        at("added_at"),
        key=("event_id",),
        refs={"incident_id": "incidents"},
        cascade=("incident_id",),
        indexes=("incident_id",),
    )
    create_table(
        "incident_history",
        serial_id(),
        ref("incident_id"),
        at("at"),
        ref("actor_id"),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        ref("assignee_id", nullable=True),
        sa.Column("resolution", sa.String(length=24), nullable=True),
        sa.Column("event_count", sa.Integer(), nullable=True),
        sa.Column("note", sa.String(length=280), nullable=True),
        refs={"incident_id": "incidents"},
        cascade=("incident_id",),
        indexes=("incident_id",),
    )
