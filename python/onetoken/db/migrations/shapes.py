"""Column and constraint shapes the migrations share: string ids and references,
timestamps, surrogate keys, and constraint names that follow the tables' naming
convention (pk_<table>, fk_<table>_<column>_<target>, uq_<table>_<column>, ...).

Shipped migrations build their DDL from these, so a builder's output is frozen with
them: changing one changes what every past revision creates. A new shape gets a new
builder. Nothing here imports the application's models, which move on without the
migrations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op

TS = sa.DateTime(timezone=True)
# 64-bit on real databases; SQLite only autoincrements an INTEGER PRIMARY KEY.
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def ref(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    """A generated string id (32 characters), or a reference to one."""
    return sa.Column(name, sa.String(length=32), nullable=nullable)


def at(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    """A timezone-aware timestamp."""
    return sa.Column(name, TS, nullable=nullable)


def serial_id() -> sa.Column[Any]:
    """An autoincrementing 64-bit surrogate key named `id`."""
    return sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False)


def pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    """The table's primary key, on `id` unless other columns are named."""
    return sa.PrimaryKeyConstraint(*(columns or ("id",)), name=op.f(f"pk_{table}"))


def fk(table: str, column: str, target: str, **options: Any) -> sa.ForeignKeyConstraint:
    """`column` references `target.id`."""
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), **options
    )


def unique(table: str, column: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(column, name=op.f(f"uq_{table}_{column}"))


def check(table: str, name: str, condition: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(condition, name=op.f(f"ck_{table}_{name}"))


def index(table: str, *columns: str) -> None:
    """A plain index named ix_<table>_<columns>."""
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def create_table(
    name: str,
    *columns: sa.Column[Any],
    key: tuple[str, ...] = ("id",),
    checks: Mapping[str, str] | None = None,
    refs: Mapping[str, str] | None = None,
    cascade: tuple[str, ...] = (),
    uniques: tuple[str, ...] = (),
    named_uniques: Mapping[str, tuple[str, ...]] | None = None,
    indexes: tuple[str | tuple[str, ...], ...] = (),
) -> None:
    """`name` with `columns`, then its constraints named by the convention: `checks`
    (name suffix -> condition), `refs` (column -> table whose id it references; the
    columns in `cascade` delete with it), primary `key`, single-column `uniques` and
    `named_uniques` over several columns; then `indexes` (a column or a tuple).

    The constraints are made in that order, which is the order CREATE TABLE lists them.
    """
    op.create_table(
        name,
        *columns,
        *(check(name, suffix, condition) for suffix, condition in (checks or {}).items()),
        *(
            fk(name, column, target, **({"ondelete": "CASCADE"} if column in cascade else {}))
            for column, target in (refs or {}).items()
        ),
        pk(name, *key),
        *(unique(name, column) for column in uniques),
        *(sa.UniqueConstraint(*cols, name=n) for n, cols in (named_uniques or {}).items()),
    )
    for columns_ in indexes:
        index(name, *((columns_,) if isinstance(columns_, str) else columns_))


def amounts(*names: str) -> list[sa.Column[Any]]:
    """Required 64-bit integer columns: money (nano-units) and token prices."""
    return [sa.Column(name, sa.BigInteger(), nullable=False) for name in names]


def columns_0001(table: str, *, org_nullable: bool) -> list[sa.Column[Any]]:
    """`providers` or `models` as 0001 created them; 0005 rebuilds both on SQLite with
    these columns first."""
    own: dict[str, list[sa.Column[Any]]] = {
        "providers": [
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("protocol", sa.String(length=16), nullable=False),
            sa.Column("base_url", sa.String(length=2048), nullable=False),
            sa.Column("api_key_encrypted", sa.String(length=4096), nullable=True),
            sa.Column("connect_timeout_ms", sa.Integer(), nullable=False),
            sa.Column("first_byte_timeout_ms", sa.Integer(), nullable=False),
            sa.Column("idle_timeout_ms", sa.Integer(), nullable=False),
        ],
        "models": [
            sa.Column("name", sa.String(length=128), nullable=False),
            sa.Column("kind", sa.String(length=16), nullable=False),
            ref("provider_id"),
            sa.Column("upstream_model", sa.String(length=128), nullable=False),
            *amounts("input_price", "output_price", "cached_input_price"),
            sa.Column("max_output_tokens", sa.Integer(), nullable=False),
        ],
    }
    return [ref("id"), ref("org_id", nullable=org_nullable), *own[table], at("created_at")]
