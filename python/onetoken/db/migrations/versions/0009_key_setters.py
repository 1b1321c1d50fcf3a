"""Who last set an API key's limits and its status, so a developer can narrow what an
administrator set on their key but not lift it, nor re-enable a key one disabled.
"""

from alembic import op

from onetoken.db.migrations.shapes import ref

revision: str = "0009_key_setters"
down_revision: str | None = "0008_merge_domains"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(ref("limits_set_by", nullable=True))
        batch.add_column(ref("status_set_by", nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("status_set_by")
        batch.drop_column("limits_set_by")
