"""Providers: platform catalog vs org-private entries, data-processing attributes,
several deployments per model name, org gateway settings, key policies, routes, routing.
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, check, fk, index, pk, ref, unique

revision: str = "0005_providers"
down_revision: str | None = "0001"

# name, type, server default (SQL text), nullable
_NewColumn = tuple[str, Any, Any, bool]
_PROVIDER_NEW: tuple[_NewColumn, ...] = (
    ("api_version", sa.String(length=32), None, True),
    ("vendor", sa.String(length=32), "''", False),
    ("region", sa.String(length=32), "''", False),
    ("retains_content", sa.Boolean(), sa.false(), False),
    ("trains_on_data", sa.Boolean(), sa.false(), False),
    ("zero_retention", sa.Boolean(), sa.false(), False),
    ("tags", sa.JSON(), "'[]'", False),
    ("max_concurrency", sa.Integer(), None, True),
    ("preset", sa.String(length=32), None, True),
    ("credential_env", sa.String(length=128), None, True),
    ("managed_by", sa.String(length=8), "'api'", False),
)
_MODEL_NEW: tuple[_NewColumn, ...] = (
    ("request_price", sa.BigInteger(), "0", False),
    ("priority", sa.Integer(), "0", False),
    ("weight", sa.Integer(), "1", False),
    ("managed_by", sa.String(length=8), "'api'", False),
)


def _col(name: str, type_: Any, default: Any, nullable: bool) -> sa.Column[Any]:
    server_default = None
    if default is not None:
        server_default = default if not isinstance(default, str) else sa.text(default)
    return sa.Column(name, type_, nullable=nullable, server_default=server_default)


def _providers_table() -> None:
    op.create_table(
        "providers",
        ref("id"),
        ref("org_id", nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("protocol", sa.String(length=16), nullable=False),
        sa.Column("base_url", sa.String(length=2048), nullable=False),
        sa.Column("api_key_encrypted", sa.String(length=4096), nullable=True),
        sa.Column("connect_timeout_ms", sa.Integer(), nullable=False),
        sa.Column("first_byte_timeout_ms", sa.Integer(), nullable=False),
        sa.Column("idle_timeout_ms", sa.Integer(), nullable=False),
        at("created_at"),
        *(_col(*c) for c in _PROVIDER_NEW),
        fk("providers", "org_id", "orgs"),
        pk("providers"),
        sa.UniqueConstraint("org_id", "name", name="uq_providers_org_name"),
    )
    index("providers", "org_id")


def _models_table() -> None:
    op.create_table(
        "models",
        ref("id"),
        ref("org_id", nullable=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        ref("provider_id"),
        sa.Column("upstream_model", sa.String(length=128), nullable=False),
        sa.Column("input_price", sa.BigInteger(), nullable=False),
        sa.Column("output_price", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_price", sa.BigInteger(), nullable=False),
        sa.Column("max_output_tokens", sa.Integer(), nullable=False),
        at("created_at"),
        *(_col(*c) for c in _MODEL_NEW),
        check("models", "kind", "kind IN ('chat','embedding')"),
        fk("models", "org_id", "orgs"),
        fk("models", "provider_id", "providers"),
        pk("models"),
        sa.UniqueConstraint("provider_id", "name", name="uq_models_provider_name"),
    )
    index("models", "org_id")
    index("models", "provider_id")
    index("models", "name")


_OLD_PROVIDER_COLS = (
    "id, org_id, name, protocol, base_url, api_key_encrypted, connect_timeout_ms, "
    "first_byte_timeout_ms, idle_timeout_ms, created_at"
)
_OLD_MODEL_COLS = (
    "id, org_id, name, kind, provider_id, upstream_model, input_price, output_price, "
    "cached_input_price, max_output_tokens, created_at"
)


def _rebuild_sqlite() -> None:
    """SQLite cannot drop NOT NULL or a unique constraint in place, and a batch rebuild
    of `providers` fails while `models` rows reference it (foreign keys are on and the
    pragma cannot change inside the migration's transaction). Renaming both tables first
    moves the references along; the old tables are dropped child first."""
    op.rename_table("providers", "_providers_old")
    op.rename_table("models", "_models_old")
    for name in ("ix_providers_org_id", "ix_models_org_id", "ix_models_provider_id"):
        op.execute(f"DROP INDEX IF EXISTS {name}")
    _providers_table()
    _models_table()
    op.execute(
        f"INSERT INTO providers ({_OLD_PROVIDER_COLS}) "  # noqa: S608 (fixed column lists)
        f"SELECT {_OLD_PROVIDER_COLS} FROM _providers_old"
    )
    op.execute(
        f"INSERT INTO models ({_OLD_MODEL_COLS}) "  # noqa: S608 (fixed column lists)
        f"SELECT {_OLD_MODEL_COLS} FROM _models_old"
    )
    op.drop_table("_models_old")
    op.drop_table("_providers_old")


def _alter_in_place() -> None:
    op.alter_column("providers", "org_id", existing_type=sa.String(length=32), nullable=True)
    for c in _PROVIDER_NEW:
        op.add_column("providers", _col(*c))
    op.alter_column("models", "org_id", existing_type=sa.String(length=32), nullable=True)
    op.drop_constraint("uq_models_name", "models", type_="unique")
    for c in _MODEL_NEW:
        op.add_column("models", _col(*c))
    op.create_unique_constraint("uq_models_provider_name", "models", ["provider_id", "name"])
    index("models", "name")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite()
    else:
        _alter_in_place()

    op.create_table(
        "org_gateway_settings",
        ref("org_id"),
        sa.Column("policy", sa.JSON(), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("guard_mode", sa.String(length=8), nullable=False),
        sa.Column("guard_categories", sa.JSON(), nullable=True),
        at("updated_at"),
        fk("org_gateway_settings", "org_id", "orgs"),
        pk("org_gateway_settings", "org_id"),
    )
    op.create_table(
        "key_policies",
        ref("key_id"),
        sa.Column("policy", sa.JSON(), nullable=False),
        at("updated_at"),
        fk("key_policies", "key_id", "api_keys"),
        pk("key_policies", "key_id"),
    )
    op.create_table(
        "routes",
        ref("id"),
        ref("org_id", nullable=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("aliases", sa.JSON(), nullable=False),
        sa.Column("managed_by", sa.String(length=8), nullable=False),
        at("created_at"),
        fk("routes", "org_id", "orgs"),
        pk("routes"),
        unique("routes", "name"),
    )
    index("routes", "org_id")
    op.create_table(
        "routing_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_deadline_ms", sa.Integer(), nullable=False),
        sa.Column("backoff_ms", sa.Integer(), nullable=False),
        sa.Column("breaker_failures", sa.Integer(), nullable=False),
        sa.Column("breaker_open_ms", sa.Integer(), nullable=False),
        pk("routing_settings"),
    )


def downgrade() -> None:
    # The platform catalog and several deployments per name cannot be expressed in 0001.
    raise NotImplementedError("0005_providers cannot be downgraded")
