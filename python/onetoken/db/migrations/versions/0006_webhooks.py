"""Webhooks (callback addresses, delivery log, attempts) and blocked sources."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref, serial_id

revision: str = "0006_webhooks"
down_revision: str | None = "0001"


def upgrade() -> None:
    create_table(
        "webhook_endpoints",
        ref("id"),
        ref("org_id"),
        sa.Column("url_encrypted", sa.String(length=4096), nullable=False),
        sa.Column("url_display", sa.String(length=300), nullable=False),
        sa.Column("kinds", sa.JSON(), nullable=False),
        sa.Column("secret_encrypted", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("platform", sa.Boolean(), nullable=False),
        ref("created_by", nullable=True),
        at("created_at"),
        at("updated_at", nullable=True),
        refs={"org_id": "orgs"},
        indexes=("org_id",),
    )
    create_table(
        "webhook_deliveries",
        ref("id"),
        ref("endpoint_id"),
        ref("org_id"),
        ref("event_id"),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        at("next_attempt_at", nullable=True),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_latency_ms", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        at("created_at"),
        at("finished_at", nullable=True),
        indexes=("endpoint_id", ("status", "next_attempt_at"), "created_at"),
    )
    create_table(
        "webhook_attempts",
        serial_id(),
        ref("delivery_id"),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=64), nullable=True),
        at("created_at"),
        indexes=("delivery_id",),
    )
    create_table(
        "blocked_sources",
        sa.Column("cidr", sa.String(length=64), nullable=False),
        at("until"),
        sa.Column("reason", sa.String(length=32), nullable=False),
        at("created_at"),
        key=("cidr",),
        indexes=("until",),
    )


def downgrade() -> None:
    op.drop_table("blocked_sources")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
