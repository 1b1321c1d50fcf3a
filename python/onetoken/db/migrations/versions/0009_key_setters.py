"""Who last set an API key's limits and its status, so a developer can narrow what an
administrator set on their key but not lift it, nor re-enable a key one disabled.

Revision ID: 0009_key_setters
Revises: 0008_merge_domains
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_key_setters"
down_revision: str | None = "0008_merge_domains"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("limits_set_by", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("status_set_by", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("status_set_by")
        batch.drop_column("limits_set_by")
