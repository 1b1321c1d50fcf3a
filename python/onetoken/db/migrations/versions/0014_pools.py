"""Dedicated gateway pools and the commercial terms that pin an org to one.

- gateway_pools: the pools operators run (`onetoken gateway --pool NAME`), by name, with
  the ClickHouse database their call metadata go to (NULL: the shared one).
- org_terms: one row per org with commercial terms; `pool` names the gateway pool that
  serves the org's keys (NULL: the shared gateways). Further terms are columns here.
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, fk, index, pk, ref

revision: str = "0014_pools"
down_revision: str | None = "0013_ingest_written_off"


def upgrade() -> None:
    create_table(
        "gateway_pools",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("clickhouse_database", sa.String(length=64), nullable=True),
        at("created_at"),
        at("updated_at", nullable=True),
        key=("name",),
    )
    # By hand: `pool` references a name, not an id (create_table's refs are ids).
    op.create_table(
        "org_terms",
        ref("org_id"),
        sa.Column("pool", sa.String(length=32), nullable=True),
        at("updated_at"),
        fk("org_terms", "org_id", "orgs"),
        sa.ForeignKeyConstraint(
            ["pool"], ["gateway_pools.name"], name=op.f("fk_org_terms_pool_gateway_pools")
        ),
        pk("org_terms", "org_id"),
    )
    index("org_terms", "pool")


def downgrade() -> None:
    op.drop_table("org_terms")
    op.drop_table("gateway_pools")
