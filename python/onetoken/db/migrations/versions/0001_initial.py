"""Initial schema: orgs, accounts, keys, providers, models, ledger, sessions, revision."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, check, fk, index, pk, ref, serial_id, unique

revision: str = "0001"
down_revision: str | None = None


def upgrade() -> None:
    op.create_table(
        "config_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        pk("config_revision"),
    )
    op.bulk_insert(
        sa.table(
            "config_revision", sa.column("id", sa.Integer), sa.column("revision", sa.BigInteger)
        ),
        [{"id": 1, "revision": 0}],
    )
    op.create_table(
        "orgs",
        ref("id"),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        at("created_at"),
        pk("orgs"),
    )
    op.create_table(
        "accounts",
        ref("id"),
        ref("org_id"),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        at("created_at"),
        check("accounts", "role", "role IN ('owner','admin','developer','billing','viewer')"),
        fk("accounts", "org_id", "orgs"),
        pk("accounts"),
        unique("accounts", "email"),
    )
    index("accounts", "org_id")

    op.create_table(
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
        check(
            "ledger_entries", "kind", "kind IN ('recharge','usage','refund','adjustment','grant')"
        ),
        fk("ledger_entries", "org_id", "orgs"),
        pk("ledger_entries"),
        unique("ledger_entries", "idempotency_key"),
    )
    index("ledger_entries", "org_id", "id")

    op.create_table(
        "providers",
        ref("id"),
        ref("org_id"),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("protocol", sa.String(length=16), nullable=False),
        sa.Column("base_url", sa.String(length=2048), nullable=False),
        sa.Column("api_key_encrypted", sa.String(length=4096), nullable=True),
        sa.Column("connect_timeout_ms", sa.Integer(), nullable=False),
        sa.Column("first_byte_timeout_ms", sa.Integer(), nullable=False),
        sa.Column("idle_timeout_ms", sa.Integer(), nullable=False),
        at("created_at"),
        fk("providers", "org_id", "orgs"),
        pk("providers"),
        sa.UniqueConstraint("org_id", "name", name="uq_providers_org_name"),
    )
    index("providers", "org_id")

    op.create_table(
        "admin_sessions",
        ref("id"),
        ref("account_id"),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        at("created_at"),
        at("expires_at"),
        fk("admin_sessions", "account_id", "accounts"),
        pk("admin_sessions"),
        unique("admin_sessions", "token_hash"),
    )
    index("admin_sessions", "account_id")

    op.create_table(
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
        check("api_keys", "status", "status IN ('active','disabled','revoked')"),
        fk("api_keys", "created_by", "accounts"),
        fk("api_keys", "org_id", "orgs"),
        pk("api_keys"),
        unique("api_keys", "hash"),
    )
    index("api_keys", "org_id")

    op.create_table(
        "models",
        ref("id"),
        ref("org_id"),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        ref("provider_id"),
        sa.Column("upstream_model", sa.String(length=128), nullable=False),
        sa.Column("input_price", sa.BigInteger(), nullable=False),
        sa.Column("output_price", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_price", sa.BigInteger(), nullable=False),
        sa.Column("max_output_tokens", sa.Integer(), nullable=False),
        at("created_at"),
        check("models", "kind", "kind IN ('chat','embedding')"),
        fk("models", "org_id", "orgs"),
        fk("models", "provider_id", "providers"),
        pk("models"),
        unique("models", "name"),
    )
    index("models", "org_id")
    index("models", "provider_id")


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
