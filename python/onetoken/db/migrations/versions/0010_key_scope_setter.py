"""Who last set an API key's scopes (expiry, start, models, source addresses), so a
developer can narrow what an administrator set on their key but not widen or remove it.

Existing keys get no setter: scopes of unknown origin count as another account's.
"""

from alembic import op

from onetoken.db.migrations.shapes import ref

revision: str = "0010_key_scope_setter"
down_revision: str | None = "0009_key_setters"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(ref("scopes_set_by", nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scopes_set_by")
