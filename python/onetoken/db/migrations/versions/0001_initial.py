"""Initial schema: orgs, accounts, keys, providers, models, ledger, sessions, revision."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, columns_0001, create_table, ref, serial_id

revision: str = "0001"
down_revision: str | None = None


def upgrade() -> None:
    create_table(
        "config_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(
        sa.table(
            "config_revision", sa.column("id", sa.Integer), sa.column("revision", sa.BigInteger)
        ),
        [{"id": 1, "revision": 0}],
    )
    create_table(
        "orgs",
        ref("id"),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        at("created_at"),
    )
    create_table(
        "accounts",
        ref("id"),
        ref("org_id"),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        at("created_at"),
        checks={"role": "role IN ('owner','admin','developer','billing','viewer')"},
        refs={"org_id": "orgs"},
        uniques=("email",),
        indexes=("org_id",),
    )

    create_table(
        "ledger_entries",
        serial_id(),
        ref("org_id"),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        ref("created_by", nullable=True),
        at("created_at"),
        sa.Column("memo", sa.String(length=200), nullable=True),
        checks={"kind": "kind IN ('recharge','usage','refund','adjustment','grant')"},
        refs={"org_id": "orgs"},
        uniques=("idempotency_key",),
        indexes=(("org_id", "id"),),
    )

    create_table(
        "providers",
        *columns_0001("providers", org_nullable=False),
        refs={"org_id": "orgs"},
        named_uniques={"uq_providers_org_name": ("org_id", "name")},
        indexes=("org_id",),
    )

    create_table(
        "admin_sessions",
        ref("id"),
        ref("account_id"),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        at("created_at"),
        at("expires_at"),
        refs={"account_id": "accounts"},
        uniques=("token_hash",),
        indexes=("account_id",),
    )

    create_table(
        "api_keys",
        ref("id"),
        ref("org_id"),
        ref("created_by"),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("display", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        at("expires_at", nullable=True),
        sa.Column("allowed_models", sa.JSON(), nullable=True),
        at("created_at"),
        at("revoked_at", nullable=True),
        checks={"status": "status IN ('active','disabled','revoked')"},
        refs={"created_by": "accounts", "org_id": "orgs"},
        uniques=("hash",),
        indexes=("org_id",),
    )

    create_table(
        "models",
        *columns_0001("models", org_nullable=False),
        checks={"kind": "kind IN ('chat','embedding')"},
        refs={"org_id": "orgs", "provider_id": "providers"},
        uniques=("name",),
        indexes=("org_id", "provider_id"),
    )


def downgrade() -> None:
    for table, indexes in (
        ("models", ("ix_models_provider_id", "ix_models_org_id")),
        ("api_keys", ("ix_api_keys_org_id",)),
        ("admin_sessions", ("ix_admin_sessions_account_id",)),
        ("providers", ("ix_providers_org_id",)),
        ("ledger_entries", ("ix_ledger_entries_org_id_id",)),
        ("accounts", ("ix_accounts_org_id",)),
        ("orgs", ()),
        ("config_revision", ()),
    ):
        for name in indexes:
            op.drop_index(op.f(name), table_name=table)
        op.drop_table(table)
