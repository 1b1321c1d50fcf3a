"""Who last set an API key's scopes (expiry, start, models, source addresses), so a
developer can narrow what an administrator set on their key but not widen or remove it.

Existing keys get no setter: scopes of unknown origin count as another account's.

Revision ID: 0010_key_scope_setter
Revises: 0009_key_setters
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_key_scope_setter"
down_revision: str | None = "0009_key_setters"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("scopes_set_by", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scopes_set_by")
