"""Engine instances written off by an operator after their journal was lost
(`onetoken gateways retire --lost`, docs/scale-out.md "Operating").

- ingest_written_off: one row per such instance, kept for good. Retirement then keeps
  the instance's ingest cursors: if its journal turns up after all (a node that was only
  cut off), ingestion resumes where the ledger stopped instead of reading it from the
  start, and a second write-off is a no-op.
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table

revision: str = "0013_ingest_written_off"
down_revision: str | None = "0012_ingest_retired"


def upgrade() -> None:
    create_table(
        "ingest_written_off",
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        at("written_off_at"),
        key=("instance_id",),
    )


def downgrade() -> None:
    op.drop_table("ingest_written_off")
