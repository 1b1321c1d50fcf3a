"""Work orders: tickets, their messages and their attachments' metadata (the bytes live
in the attachment store under the data dir, never in the database)."""

import sqlalchemy as sa

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0017_tickets"
down_revision: str | None = "0016_analyst_role"


def upgrade() -> None:
    create_table(
        "tickets",
        ref("id"),
        ref("org_id"),
        ref("opened_by", nullable=True),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        at("created_at"),
        at("updated_at"),
        at("last_message_at"),
        at("first_staff_response_at", nullable=True),
        at("resolved_at", nullable=True),
        at("closed_at", nullable=True),
        refs={"org_id": "orgs"},
        indexes=(("org_id", "created_at"), ("status", "created_at"), "closed_at"),
    )
    create_table(
        "ticket_messages",
        ref("id"),
        ref("ticket_id"),
        sa.Column("author_kind", sa.String(length=16), nullable=False),
        ref("author_id", nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        at("created_at"),
        refs={"ticket_id": "tickets"},
        cascade=("ticket_id",),
        indexes=("ticket_id",),
    )
    create_table(
        "ticket_attachments",
        ref("id"),
        ref("ticket_id"),
        sa.Column("author_kind", sa.String(length=16), nullable=False),
        ref("uploaded_by", nullable=True),
        sa.Column("filename", sa.String(length=200), nullable=False),
        sa.Column("content_type", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.String(length=64), nullable=False),
        at("created_at"),
        refs={"ticket_id": "tickets"},
        cascade=("ticket_id",),
        indexes=("ticket_id",),
    )
