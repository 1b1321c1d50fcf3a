"""Account erasure requests (users' rights)."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0007_rights"
down_revision: str | None = "0001"


def upgrade() -> None:
    create_table(
        "account_erasures",
        ref("account_id"),
        ref("org_id"),
        ref("requested_by"),
        sa.Column("state", sa.String(length=16), nullable=False),
        at("requested_at"),
        at("completed_at", nullable=True),
        sa.Column("pending_encrypted", sa.Text(), nullable=True),
        key=("account_id",),
        indexes=("org_id",),
    )


def downgrade() -> None:
    op.drop_table("account_erasures")
