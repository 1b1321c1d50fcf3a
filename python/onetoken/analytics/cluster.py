"""ClickHouse DDL for a sharded, replicated cluster, rewritten from the single-node
migrations in onetoken/analytics/sql (the one source of columns, sort keys, partitioning,
TTLs and settings; nothing here repeats them).

Each table `<db>.<t>` of a migration becomes:

- `<db>.<t>_local ON CLUSTER <c>`: the same columns, ORDER BY, PARTITION BY, TTL and
  settings, on the Replicated variant of its engine with the Keeper path
  `/clickhouse/tables/{shard}/<db>/<t>` and the replica name `{replica}` (both macros come
  from each server's configuration);
- `<db>.<t> ON CLUSTER <c>`: a Distributed table over those, under the name the analytics
  queries read, routing rows by the table's shard key (SHARD_KEYS).

A materialized view `<db>.<v> TO <db>.<t> AS SELECT ... FROM <db>.<s>` becomes one on each
shard, `<db>.<v> ON CLUSTER <c> TO <db>.<t>_local ... FROM <db>.<s>_local`: a Distributed
insert reaches each shard's local table as a local insert, which feeds that shard's view,
so each shard rolls up its own rows and a read through the Distributed `<db>.<t>` adds the
shards' partial aggregates together.

The shard key is a function of the id in the table's sort key, so every copy of one
record (a batch re-sent after a crash) reaches the same shard, where ReplacingMergeTree
collapses it and FINAL reads it once: deduplication holds per shard, hence on the whole.

A statement shape the rewrite does not know raises ClusterDdlError instead of passing
through unchanged, so a new kind of migration cannot slip into a cluster as single-node DDL.

Validated, not run: chDB parses every generated statement and runs it without ON CLUSTER
and the Keeper paths, and the analytics queries are checked over two local tables standing
in for shards (tests/unit/test_analytics_cluster.py); no ClickHouse cluster or Keeper has
executed this DDL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from onetoken.analytics.clickhouse import Migration, load_migrations, sql_string
from onetoken.analytics.columns import CALL_LOG_DOCS

#: The database the single-node migrations create and the control plane reads.
SOURCE_DATABASE: Final = "onetoken"
LOCAL_SUFFIX: Final = "_local"

#: Per table, the expression the Distributed table shards by. Each keeps the rows that
#: ReplacingMergeTree must collapse (same sort key) on one shard: the id that ends the sort
#: key. A table missing here stops the rewrite, so a new table gets its key decided.
SHARD_KEYS: Final[dict[str, str]] = {
    "call_log": "cityHash64(request_id)",
    "security_log": "cityHash64(event_id)",
    # A handful of rows; by version so that a version recorded twice lands on one shard.
    "schema_migrations": "version",
    # Names from the control DB: a re-synced row replaces the older one on the same shard.
    "dim_orgs": "cityHash64(org_id)",
    "dim_providers": "cityHash64(provider_id)",
    "dim_models": "cityHash64(org_id, model)",
    "dim_keys": "cityHash64(key_id)",
    "dim_applications": "cityHash64(application_id)",
    # Written by each shard's materialized view, not through the Distributed table; reads
    # add partial aggregates across shards, so any key would do.
    "call_stats_1m": "cityHash64(org_id)",
}

# Single-node settings with a different name on Replicated tables: the insert
# deduplication window (insert_deduplication_token) is kept in Keeper there.
_REPLICATED_SETTINGS: Final = {
    "non_replicated_deduplication_window": "replicated_deduplication_window",
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CREATE_DATABASE = re.compile(r"^CREATE DATABASE IF NOT EXISTS (\w+)$")
_CREATE_TABLE = re.compile(
    r"^CREATE TABLE IF NOT EXISTS (\w+)\.(\w+)\s*(\(.*\))\s*"
    r"ENGINE\s*=\s*(\w*MergeTree)(?:\(([^()]*)\))?(.*)$",
    re.DOTALL,
)
_ALTER_TABLE = re.compile(r"^ALTER TABLE (\w+)\.(\w+) (.*)$", re.DOTALL)
_CREATE_VIEW = re.compile(
    r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\.(\w+) TO (\w+)\.(\w+) AS\s+(SELECT\b.*)$",
    re.DOTALL,
)
_TABLE_NAME = re.compile(rf"\b{SOURCE_DATABASE}\.(\w+)\b")
# ALTERs a Distributed table takes too: its columns must follow the local table's.
_COLUMN_ALTER = re.compile(r"^(ADD|DROP|MODIFY|RENAME|COMMENT) COLUMN\b")
# ALTERs of storage only: indexes, settings, TTL, projections live in the local tables.
_STORAGE_ALTER = re.compile(
    r"^(ADD|DROP|MATERIALIZE|CLEAR) (INDEX|PROJECTION)\b|^MODIFY (SETTING|TTL|ORDER BY)\b"
)


class ClusterDdlError(ValueError):
    """A name is not a plain identifier, or a migration statement has no cluster form."""


def _identifier(value: str, what: str) -> str:
    if not _IDENTIFIER.match(value):
        raise ClusterDdlError(f"{what} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return value


def _replicated_settings(text: str) -> str:
    for single, replicated in _REPLICATED_SETTINGS.items():
        text = re.sub(rf"\b{single}\b", replicated, text)
    return text


def rename_database(statement: str, database: str) -> str:
    """A single-node statement addressing `database` instead of onetoken."""
    _identifier(database, "database")
    statement = re.sub(
        rf"\bIF NOT EXISTS {SOURCE_DATABASE}$", f"IF NOT EXISTS {database}", statement
    )
    return re.sub(rf"\b{SOURCE_DATABASE}\.(\w+)", rf"{database}.\1", statement)


def _check_source(database: str) -> None:
    if database != SOURCE_DATABASE:
        raise ClusterDdlError(f"a migration addresses database {database}, not {SOURCE_DATABASE}")


def cluster_statements(statement: str, cluster: str, database: str = SOURCE_DATABASE) -> list[str]:
    """The cluster form of one single-node migration statement."""
    _identifier(cluster, "cluster name")
    _identifier(database, "database")
    on = f"ON CLUSTER {cluster}"
    if match := _CREATE_DATABASE.match(statement):
        _check_source(match[1])
        return [f"CREATE DATABASE IF NOT EXISTS {database} {on}"]
    if match := _CREATE_TABLE.match(statement):
        source_db, table, columns, engine, args, rest = match.groups()
        _check_source(source_db)
        if engine.startswith("Replicated"):
            raise ClusterDdlError(f"{table}: the single-node schema is already Replicated")
        if table not in SHARD_KEYS:
            raise ClusterDdlError(f"{table}: no shard key in onetoken.analytics.cluster.SHARD_KEYS")
        engine_args = ", ".join(
            [f"'/clickhouse/tables/{{shard}}/{database}/{table}'", "'{replica}'"]
            + ([args.strip()] if args and args.strip() else [])
        )
        local = f"{database}.{table}{LOCAL_SUFFIX}"
        return [
            f"CREATE TABLE IF NOT EXISTS {local} {on}\n{columns}\n"
            f"ENGINE = Replicated{engine}({engine_args}){_replicated_settings(rest)}",
            f"CREATE TABLE IF NOT EXISTS {database}.{table} {on} AS {local}\n"
            f"ENGINE = Distributed({cluster}, {database}, {table}{LOCAL_SUFFIX}, "
            f"{SHARD_KEYS[table]})",
        ]
    if match := _CREATE_VIEW.match(statement):
        source_db, view, target_db, target, select = match.groups()
        _check_source(source_db)
        _check_source(target_db)
        # The view reads the local table it is attached to: one per shard.
        local_select = _TABLE_NAME.sub(rf"{database}.\1{LOCAL_SUFFIX}", select)
        return [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{view} {on} "
            f"TO {database}.{target}{LOCAL_SUFFIX} AS\n{local_select}"
        ]
    if match := _ALTER_TABLE.match(statement):
        source_db, table, command = match.groups()
        _check_source(source_db)
        local = f"ALTER TABLE {database}.{table}{LOCAL_SUFFIX} {on} {_replicated_settings(command)}"
        if _COLUMN_ALTER.match(command):
            return [local, f"ALTER TABLE {database}.{table} {on} {command}"]
        if _STORAGE_ALTER.match(command):
            return [local]
    raise ClusterDdlError(f"no cluster form for the statement: {statement[:80]!r}")


def migration_sql(migration: Migration, cluster: str, database: str = SOURCE_DATABASE) -> str:
    """One migration file as cluster DDL, ending with the row that records it in
    <database>.schema_migrations with the single-node file's checksum: a control plane
    started on the cluster then takes it as applied instead of running its single-node
    statements (ADD INDEX fails on a Distributed table)."""
    out = [f"-- {migration.name} (cluster {cluster})"]
    for statement in migration.statements():
        out.extend(f"{s};" for s in cluster_statements(statement, cluster, database))
    # Names match [a-z0-9_]+.sql and checksums are hex (load_migrations), safe to quote.
    out.append(
        f"INSERT INTO {database}.schema_migrations (version, name, checksum) VALUES "  # noqa: S608
        f"({migration.version}, '{migration.name}', '{migration.checksum}');"
    )
    return "\n\n".join(out) + "\n"


def call_log_comments_sql(cluster: str, database: str = SOURCE_DATABASE) -> str:
    """call_log's column comments (the engine's declaration) on the local and Distributed
    tables. The control plane sets them at start when they differ
    (analytics.clickhouse.ensure_call_log_comments); set here, it finds nothing to do and
    needs no ON CLUSTER right for them."""
    out = [f"-- call_log column comments (cluster {cluster})"]
    for column, doc in CALL_LOG_DOCS.items():
        statement = (
            f"ALTER TABLE {SOURCE_DATABASE}.call_log COMMENT COLUMN {column} {sql_string(doc)}"
        )
        out.extend(f"{s};" for s in cluster_statements(statement, cluster, database))
    return "\n\n".join(out) + "\n"


def cluster_ddl(cluster: str, database: str = SOURCE_DATABASE) -> Iterator[str]:
    """Every packaged migration as cluster DDL, in version order, then call_log's column
    comments."""
    for migration in load_migrations():
        yield migration_sql(migration, cluster, database)
    yield call_log_comments_sql(cluster, database)
