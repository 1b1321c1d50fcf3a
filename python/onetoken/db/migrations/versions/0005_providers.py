"""Providers: platform catalog vs org-private entries, data-processing attributes,
several deployments per model name, org gateway settings, key policies, routes, routing.
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, columns_0001, create_table, index, ref

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
    create_table(
        "providers",
        *columns_0001("providers", org_nullable=True),
        *(_col(*c) for c in _PROVIDER_NEW),
        refs={"org_id": "orgs"},
        named_uniques={"uq_providers_org_name": ("org_id", "name")},
        indexes=("org_id",),
    )


def _models_table() -> None:
    create_table(
        "models",
        *columns_0001("models", org_nullable=True),
        *(_col(*c) for c in _MODEL_NEW),
        checks={"kind": "kind IN ('chat','embedding')"},
        refs={"org_id": "orgs", "provider_id": "providers"},
        named_uniques={"uq_models_provider_name": ("provider_id", "name")},
        indexes=("org_id", "provider_id", "name"),
    )


# What 0001 created, copied over as it is.
_OLD_PROVIDER_COLS = ", ".join(c.name for c in columns_0001("providers", org_nullable=False))
_OLD_MODEL_COLS = ", ".join(c.name for c in columns_0001("models", org_nullable=False))


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

    create_table(
        "org_gateway_settings",
        ref("org_id"),
        sa.Column("policy", sa.JSON(), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("guard_mode", sa.String(length=8), nullable=False),
        sa.Column("guard_categories", sa.JSON(), nullable=True),
        at("updated_at"),
        key=("org_id",),
        refs={"org_id": "orgs"},
    )
    create_table(
        "key_policies",
        ref("key_id"),
        sa.Column("policy", sa.JSON(), nullable=False),
        at("updated_at"),
        key=("key_id",),
        refs={"key_id": "api_keys"},
    )
    create_table(
        "routes",
        ref("id"),
        ref("org_id", nullable=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("aliases", sa.JSON(), nullable=False),
        sa.Column("managed_by", sa.String(length=8), nullable=False),
        at("created_at"),
        refs={"org_id": "orgs"},
        uniques=("name",),
        indexes=("org_id",),
    )
    create_table(
        "routing_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_deadline_ms", sa.Integer(), nullable=False),
        sa.Column("backoff_ms", sa.Integer(), nullable=False),
        sa.Column("breaker_failures", sa.Integer(), nullable=False),
        sa.Column("breaker_open_ms", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    # The platform catalog and several deployments per name cannot be expressed in 0001.
    raise NotImplementedError("0005_providers cannot be downgraded")
