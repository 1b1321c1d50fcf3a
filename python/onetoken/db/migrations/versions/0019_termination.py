"""Commercial terms beyond the pool, and the step log of org terminations.

- org_terms gains the contract reference, the settlement period (prepaid, or invoiced per
  month or quarter) and when the data processing agreement was signed (NULL: not signed).
  The price factor stays in org_billing (one fact, one place); the terms read and set it,
  and the credit limit joins it there (0: prepaid only), where the snapshot and the money
  caps read the balance's other half.
- org_terminations: one row per org whose termination was started, with the operator's
  reason and where its data export is written.
- org_termination_steps: the persisted step log; a step's row commits with its work, so a
  run that stopped half-way resumes after the last finished step.
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0019_termination"
down_revision: str | None = "0018_incidents"


def upgrade() -> None:
    op.add_column("org_terms", sa.Column("contract_ref", sa.String(length=100), nullable=True))
    op.add_column(
        "org_terms",
        sa.Column("settlement", sa.String(length=16), nullable=False, server_default="prepaid"),
    )
    op.add_column("org_terms", at("dpa_signed_at", nullable=True))
    op.add_column(
        "org_billing",
        sa.Column("credit_limit", sa.BigInteger(), nullable=False, server_default="0"),
    )
    create_table(
        "org_terminations",
        ref("org_id"),
        sa.Column("reason", sa.String(length=500), nullable=False),
        ref("requested_by", nullable=True),
        sa.Column("export_path", sa.String(length=1024), nullable=False),
        at("started_at"),
        at("completed_at", nullable=True),
        key=("org_id",),
        refs={"org_id": "orgs"},
    )
    create_table(
        "org_termination_steps",
        ref("org_id"),
        sa.Column("step", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        at("done_at"),
        key=("org_id", "step"),
        refs={"org_id": "orgs"},
    )


def downgrade() -> None:
    op.drop_table("org_termination_steps")
    op.drop_table("org_terminations")
    with op.batch_alter_table("org_billing") as batch:
        batch.drop_column("credit_limit")
    with op.batch_alter_table("org_terms") as batch:
        batch.drop_column("dpa_signed_at")
        batch.drop_column("settlement")
        batch.drop_column("contract_ref")
