"""Applications: an org's keys grouped under a name and an owner, with limits and budgets
of their own (docs/applications.md).

- applications: one row per application; its limits apply across all of its keys.
- api_keys.application_id: the application a key belongs to (NULL: none). No foreign key,
  so SQLite takes the column without rebuilding the table; the service checks it names an
  application of the key's org.
- ledger_entries.application_id: usage entries say which application the key was in when
  it spent, so application budgets and statements follow a key's moves going forward.
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, index, ref

revision: str = "0023_applications"
down_revision: str | None = "0022_mail"


def upgrade() -> None:
    create_table(
        "applications",
        ref("id"),
        ref("org_id"),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False, server_default=""),
        ref("owner_id"),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("budget_day", sa.BigInteger(), nullable=True),
        sa.Column("budget_month", sa.BigInteger(), nullable=True),
        ref("limits_set_by", nullable=True),
        ref("created_by", nullable=True),
        at("created_at"),
        at("updated_at", nullable=True),
        refs={"org_id": "orgs", "owner_id": "accounts"},
        named_uniques={"uq_applications_org_id_name": ("org_id", "name")},
    )
    op.add_column("api_keys", ref("application_id", nullable=True))
    index("api_keys", "application_id")
    op.add_column("ledger_entries", ref("application_id", nullable=True))
    index("ledger_entries", "application_id", "created_at")


def downgrade() -> None:
    op.drop_index(op.f("ix_ledger_entries_application_id_created_at"), "ledger_entries")
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_column("application_id")
    op.drop_index(op.f("ix_api_keys_application_id"), "api_keys")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("application_id")
    op.drop_table("applications")
