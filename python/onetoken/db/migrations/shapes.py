"""Column and constraint shapes the migrations share: string ids and references,
timestamps, surrogate keys, and constraint names that follow the tables' naming
convention (pk_<table>, fk_<table>_<column>_<target>, uq_<table>_<column>, ...).

Shipped migrations build their DDL from these, so a builder's output is frozen with
them: changing one changes what every past revision creates. A new shape gets a new
builder. Nothing here imports the application's models, which move on without the
migrations.
"""

from __future__ import annotations

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
