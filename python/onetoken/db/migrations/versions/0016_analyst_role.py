"""The analyst role: accounts that read call metadata and usage and run read-only SQL
(docs/sql.md). accounts.role is constrained to the known roles, so the check grows."""

from alembic import op

revision: str = "0016_analyst_role"
down_revision: str | None = "0015_org_no_training"

_OLD_ROLES = "role IN ('owner','admin','developer','billing','viewer')"
_NEW_ROLES = "role IN ('owner','admin','developer','billing','viewer','analyst')"


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as b:
        b.drop_constraint(op.f("ck_accounts_role"), type_="check")
        b.create_check_constraint("role", _NEW_ROLES)


def downgrade() -> None:
    # An analyst account would break the old check: it becomes a viewer, the nearest role
    # that writes nothing.
    op.execute("UPDATE accounts SET role = 'viewer' WHERE role = 'analyst'")
    with op.batch_alter_table("accounts", schema=None) as b:
        b.drop_constraint(op.f("ck_accounts_role"), type_="check")
        b.create_check_constraint("role", _OLD_ROLES)
