"""Retiring dead engine instances when limits and money are shared through Redis.

- ingest_retired: an engine instance whose journal is fully ingested and whose process is
  gone. Its spent marks stop counting in its orgs' money caps from the commit on; the cap
  publisher then deletes its money leases in Redis together with the lowered caps, and
  only after that its cursors, marks and this row (docs/scale-out.md, "Retiring").
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table

revision: str = "0012_ingest_retired"
down_revision: str | None = "0011_ingest"


def upgrade() -> None:
    create_table(
        "ingest_retired",
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        at("retired_at"),
        key=("instance_id",),
    )


def downgrade() -> None:
    op.drop_table("ingest_retired")
