"""The tables every domain declares (registered in onetoken.registry) are exactly the schema
the Alembic migrations build, on SQLite and, with ONETOKEN_TEST_POSTGRES_URL, PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from onetoken.registry import METADATA
from onetoken.state import AppState


def _schema_diff(state: AppState, metadata: MetaData) -> list[Any]:
    with state.db_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


def test_migrations_build_exactly_the_registered_tables(state: AppState) -> None:
    assert {"orgs", "accounts", "api_keys", "providers", "ledger_entries"} <= set(METADATA.tables)
    assert _schema_diff(state, METADATA) == []


def test_a_table_left_out_of_the_registry_shows_in_the_diff(state: AppState) -> None:
    partial = MetaData(naming_convention=METADATA.naming_convention)
    for name, table in METADATA.tables.items():
        if name != "key_policies":
            table.to_metadata(partial)
    diff = _schema_diff(state, partial)
    assert [(op[0], op[1].name) for op in diff if op[0] == "remove_table"] == [
        ("remove_table", "key_policies")
    ]
