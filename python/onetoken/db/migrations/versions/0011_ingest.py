"""Metering from the journal: aggregated usage entries and the ingestion's own state.

- ledger_entries.calls: how many calls a usage entry covers. Usage is now written as one
  entry per (org, key, model, UTC day) per ingested batch, so invoices and statements sum
  `calls` instead of counting rows. Usage entries written before carry one call each.
- ingest_cursors: how far each consumer (ledger, call_log) has read each engine instance's
  journal, as (segment, byte offset); the ledger's moves in the transaction of its entries.
- ingest_marks: per engine instance, the cost ingested from it per org and per key (the
  snapshot's spent marks for that instance), moved in the same transaction.
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import create_table, ref

revision: str = "0011_ingest"
down_revision: str | None = "0010_key_scope_setter"


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries") as batch:
        batch.add_column(sa.Column("calls", sa.Integer(), nullable=False, server_default="0"))
    op.execute("UPDATE ledger_entries SET calls = 1 WHERE kind = 'usage'")
    create_table(
        "ingest_cursors",
        sa.Column("consumer", sa.String(length=16), nullable=False),
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        sa.Column("segment", sa.BigInteger(), nullable=False),
        sa.Column("byte_offset", sa.BigInteger(), nullable=False),
        key=("consumer", "instance_id"),
    )
    create_table(
        "ingest_marks",
        sa.Column("instance_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        ref("subject_id"),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        key=("instance_id", "scope", "subject_id"),
    )


def downgrade() -> None:
    op.drop_table("ingest_marks")
    op.drop_table("ingest_cursors")
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_column("calls")
