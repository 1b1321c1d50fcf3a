"""Restriction of processing (policy section XIII.4; docs/retention.md, "Restriction of
processing").

orgs.restriction and accounts.restriction: `clear` (the client's address and User-Agent
are recorded as they come) or `restricted` (a keyed token for the address and the
User-Agent's product only, in every record of the calls of the account's keys, or of every
key of the org, and of the account's own control-API requests). Who set or lifted it, and
when, is in the security log."""

import sqlalchemy as sa
from alembic import op

revision: str = "0024_restriction"
down_revision: str | None = "0023_applications"


def upgrade() -> None:
    for table in ("orgs", "accounts"):
        op.add_column(
            table,
            sa.Column("restriction", sa.String(length=16), nullable=False,
                      server_default="clear"),
        )


def downgrade() -> None:
    for table in ("accounts", "orgs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("restriction")
