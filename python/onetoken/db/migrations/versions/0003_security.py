"""Login protection: failure counters with lockouts, and known sign-in sources."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0003_security"
down_revision: str | None = "0001"


def upgrade() -> None:
    create_table(
        "login_throttles",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=80), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        at("last_failure_at", nullable=True),
        at("locked_until", nullable=True),
        key=("scope", "subject"),
    )
    create_table(
        "login_sources",
        ref("account_id"),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        at("first_seen"),
        at("last_seen"),
        key=("account_id", "kind", "value"),
    )


def downgrade() -> None:
    op.drop_table("login_sources")
    op.drop_table("login_throttles")
