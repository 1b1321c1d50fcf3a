"""Security events to a SIEM over syslog: each destination with its durable cursor
(docs/siem.md)."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0027_siem"
down_revision: str | None = "0026_oidc"


def upgrade() -> None:
    create_table(
        "siem_destinations",
        ref("id"),
        ref("org_id", nullable=True),
        sa.Column("host", sa.String(length=253), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("ca_pem", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("cursor_ts_us", sa.BigInteger(), nullable=False),
        sa.Column("cursor_event_id", sa.String(length=64), nullable=False),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        at("next_attempt_at"),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        at("last_delivered_at", nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        at("lease_until", nullable=True),
        at("created_at"),
        at("updated_at"),
        refs={"org_id": "orgs"},
        cascade=("org_id",),
        uniques=("org_id",),
    )


def downgrade() -> None:
    op.drop_table("siem_destinations")
