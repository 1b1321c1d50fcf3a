"""ClickHouse client from a DSN, and the versioned SQL migrations.

Two kinds of DSN, one client library and one set of SQL files:

- ``chdb://<path>``: embedded chDB in this process (clickhouse-connect's chdb backend).
  Everything after ``chdb://`` is the filesystem path, so ``chdb:///abs/dir`` and
  ``chdb://relative/dir`` both mean a directory (clickhouse-connect's own DSN parser would
  read a relative path's first component as a host name). ``chdb://:memory:`` is an
  in-memory engine.
- ``http(s)://user:pass@host:port/db``: a ClickHouse server. Tables are always addressed
  as ``onetoken.<table>``, so the database part of the DSN is not needed.

chDB allows one process per data path (the engine holds a lock on ``<path>/status``) and
one path per process; both failures become a ``ChdbLockedError`` / ``ChdbPathConflictError``
that names the path instead of chDB's generic "Error initializing EmbeddedServer".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from onetoken.analytics.columns import (
    CALL_LOG_DOCS,
    LOG_DATABASES,
    POOL_DATABASE,
    SECURITY_LOG_TABLE,
    SHARED_DATABASE,
    call_log_table,
    call_stats_table,
)
from onetoken.kit.files import private_dir

logger = logging.getLogger("onetoken.analytics")

CHDB_SCHEME: Final = "chdb://"
BACKUP_STAGING: Final = "backup-staging"
_MEMORY_LOCATIONS: Final = frozenset({"", "memory", ":memory:"})
_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
# The time columns a `TTL <column> + INTERVAL n DAY` is written on: call_log's and the
# rollup's.
_TTL_COLUMNS: Final = frozenset({"ts", "minute"})
_TTL_DAYS = re.compile(r"\bTTL\s+(\w+)\s*\+\s*toIntervalDay\((\d+)\)")

# HTTP timeouts: a flush must not hang the record pump on a blackholed server; the sink
# spools instead and retries later.
_HTTP_CONNECT_TIMEOUT_S: Final = 5
_HTTP_SEND_RECEIVE_TIMEOUT_S: Final = 60


class ClickHouseSettings(Protocol):
    """The settings this package reads (onetoken.settings.Settings satisfies it)."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def clickhouse_dsn(self) -> str: ...

    @property
    def call_log_ttl_days(self) -> int: ...


class AnalyticsError(Exception):
    """Base class of errors raised by onetoken.analytics."""


class ClickHouseUnavailableError(AnalyticsError):
    """The ClickHouse server (or chDB engine) could not be opened."""


class ChdbLockedError(ClickHouseUnavailableError):
    """Another process holds the chDB data path (normally a running `onetoken serve`)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"chDB data at {path} is locked by {holder} (a running onetoken server?). "
            "chDB allows one process per data path: stop that process, or go through its "
            "API, or point ONETOKEN_CLICKHOUSE_DSN at a ClickHouse server."
        )


class ChdbPathConflictError(ClickHouseUnavailableError):
    """This process already runs a chDB engine on a different path (one path per process)."""


class MigrationError(AnalyticsError):
    """A migration file is malformed or a statement failed."""


@dataclass(frozen=True)
class Dsn:
    """A parsed ONETOKEN_CLICKHOUSE_DSN."""

    kind: Literal["chdb", "http"]
    #: chDB data directory; None for an in-memory engine or a server.
    chdb_path: Path | None
    #: Server URL without the database path; None for chDB.
    url: str | None

    @property
    def display(self) -> str:
        """The DSN without credentials, safe for logs and error messages."""
        if self.kind == "chdb":
            return f"{CHDB_SCHEME}{self.chdb_path if self.chdb_path else ':memory:'}"
        parts = urlsplit(self.url or "")
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}"


def backup_root(data_dir: Path) -> Path:
    """Where an embedded chDB may write BACKUPs and read RESTOREs from (its
    `backups.allowed_path`): onetoken.backup stages there and removes what it staged."""
    return Path(os.path.realpath(data_dir)) / BACKUP_STAGING


def default_dsn(data_dir: Path) -> str:
    return f"{CHDB_SCHEME}{Path(data_dir) / 'clickhouse'}"


def parse_dsn(dsn: str, data_dir: Path | None = None) -> Dsn:
    """Parse a DSN; an empty one means the embedded default under `data_dir`."""
    if not dsn:
        if data_dir is None:
            raise AnalyticsError("empty ClickHouse DSN and no data_dir for the chDB default")
        dsn = default_dsn(data_dir)
    if dsn.startswith(CHDB_SCHEME):
        location = dsn[len(CHDB_SCHEME) :].split("?", 1)[0]
        if location in _MEMORY_LOCATIONS:
            return Dsn(kind="chdb", chdb_path=None, url=None)
        # realpath: chDB compares engine paths literally, so one directory must have one
        # spelling (the lock probe and error messages use it too).
        return Dsn(kind="chdb", chdb_path=Path(os.path.realpath(location)), url=None)
    parts = urlsplit(dsn)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AnalyticsError(
            "ONETOKEN_CLICKHOUSE_DSN must be chdb://<path> or http(s)://user:pass@host:port/db"
        )
    return Dsn(
        kind="http",
        chdb_path=None,
        url=urlunsplit((parts.scheme, parts.netloc, "", parts.query, "")),
    )


def chdb_lock_holder(path: Path) -> tuple[bool, int | None]:
    """(locked, pid) for a chDB data path, probing the engine's flock on <path>/status.

    Only meaningful when this process does not hold the engine itself: flock locks belong
    to open file descriptions, so our own engine's lock would also look "locked" here.
    """
    status = path / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True, _status_pid(status)
            return False, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def chdb_locked_elsewhere(settings: ClickHouseSettings) -> ChdbLockedError | None:
    """The lock error when another process holds the embedded chDB path, found without
    opening chDB (a failed engine start writes its own error to stderr). For processes that
    run no chDB engine themselves, such as the CLI: see chdb_lock_holder."""
    dsn = parse_dsn(settings.clickhouse_dsn, settings.data_dir)
    if dsn.kind != "chdb" or dsn.chdb_path is None:
        return None
    locked, pid = chdb_lock_holder(dsn.chdb_path)
    return ChdbLockedError(dsn.chdb_path, pid) if locked else None


def _status_pid(status: Path) -> int | None:
    # ClickHouse writes "PID: <n>" as the first line of the status file it locks.
    with contextlib.suppress(OSError, ValueError):
        for line in status.read_text(errors="replace").splitlines():
            if line.startswith("PID:"):
                return int(line.split(":", 1)[1].strip())
    return None


def open_client(settings: ClickHouseSettings, *, migrate: bool = True) -> Client:
    """Open a clickhouse-connect client for settings.clickhouse_dsn.

    With `migrate` (the default) the pending SQL migrations are applied and the configured
    TTLs enforced, so the caller gets a client whose schema is current.
    """
    dsn = parse_dsn(settings.clickhouse_dsn, settings.data_dir)
    client = (
        _open_chdb(dsn.chdb_path, backup_root(settings.data_dir))
        if dsn.kind == "chdb"
        else _open_http(dsn)
    )
    if migrate:
        try:
            apply_migrations(client)
            ensure_ttls(client, settings)
        except BaseException:
            client.close()
            raise
    return client


def _open_chdb(path: Path | None, backups: Path) -> Client:
    options: dict[str, str] = {}
    if path is not None:
        # chDB creates its files with the umask's mode; a 0700 top dir keeps them private
        # whatever that mode is.
        private_dir(path)
        # An engine option, so only at the engine's start: `onetoken backup` asks the
        # serving process for a BACKUP, which ClickHouse writes under this path only.
        options["backups.allowed_path"] = str(backups)
    try:
        return clickhouse_connect.get_client(
            interface="chdb",
            path=str(path) if path is not None else ":memory:",
            chdb_options=options or None,
        )
    except ClickHouseError as exc:
        message = str(exc)
        if "already initialized with path" in message:
            raise ChdbPathConflictError(
                f"this process already runs chDB on another data path, cannot open {path} "
                "(chDB allows one data path per process; close the other clients first)"
            ) from exc
        if path is not None:
            locked, pid = chdb_lock_holder(path)
            if locked:
                raise ChdbLockedError(path, pid) from exc
        raise ClickHouseUnavailableError(f"could not open chDB at {path}: {message}") from exc


def _open_http(dsn: Dsn) -> Client:
    try:
        return clickhouse_connect.get_client(
            dsn=dsn.url,
            connect_timeout=_HTTP_CONNECT_TIMEOUT_S,
            send_receive_timeout=_HTTP_SEND_RECEIVE_TIMEOUT_S,
        )
    except ClickHouseError as exc:
        # The exception text can carry the URL; say which server without the credentials.
        raise ClickHouseUnavailableError(
            f"ClickHouse server {dsn.display} is unreachable ({type(exc).__name__})"
        ) from exc


# ---------------------------------------------------------------------------------------
# Migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self) -> list[str]:
        """The statements of the file: `--` comment lines dropped, split on `;` at line end."""
        body = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def load_migrations() -> list[Migration]:
    """The SQL files shipped in onetoken/analytics/sql, in version order."""
    found: list[Migration] = []
    for entry in resources.files("onetoken.analytics").joinpath("sql").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(version=int(match[1]), name=entry.name, sql=entry.read_text("utf-8"))
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions: {versions}")
    return found


def applied_migrations(client: Client, database: str = SHARED_DATABASE) -> dict[int, str]:
    """version -> checksum of the migrations recorded in <database>.schema_migrations."""
    exists = client.command(f"EXISTS TABLE {database}.schema_migrations")
    if str(exists).strip() != "1":
        return {}
    rows = client.query(
        f"SELECT version, checksum FROM {database}.schema_migrations FINAL"  # noqa: S608
    )
    return {int(version): str(checksum) for version, checksum in rows.result_rows}


# The statements a pool's database takes: its call_log, the rollup of it and the record
# of migrations (the dimension tables live in the shared database only).
_POOL_STATEMENT = re.compile(
    r"^CREATE DATABASE\b|\bonetoken\.(call_log|call_stats_1m|schema_migrations)\b"
)


def _in_database(statement: str, database: str) -> str | None:
    """A migration statement for `database`: as written for the shared one; for a pool's,
    its call_log statements with the database renamed, and None for the rest."""
    if database == SHARED_DATABASE:
        return statement
    if not _POOL_STATEMENT.search(statement):
        return None
    renamed = re.sub(r"\bonetoken\.", f"{database}.", statement)
    return re.sub(r"^CREATE DATABASE IF NOT EXISTS onetoken\b",
                  f"CREATE DATABASE IF NOT EXISTS {database}", renamed)


def apply_migrations(client: Client, database: str = SHARED_DATABASE) -> list[str]:
    """Apply pending migrations in order to the shared database or a pool's (its
    call_log and rollup only); returns the names applied (empty when current)."""
    if database != SHARED_DATABASE and not re.fullmatch(POOL_DATABASE, database):
        raise MigrationError("a pool's database is onetoken_ and lowercase letters, digits, _")
    done = applied_migrations(client, database)
    applied: list[str] = []
    for migration in load_migrations():
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                # An edited, already-applied migration is a development mistake; the
                # database keeps what ran, so warn instead of refusing to start.
                logger.warning("analytics.migration_changed", extra={"version": migration.version})
            continue
        for written in migration.statements():
            if (statement := _in_database(written, database)) is None:
                continue
            try:
                client.command(statement)
            except ClickHouseError as exc:
                raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
        client.insert(
            f"{database}.schema_migrations",
            [[migration.version], [migration.name], [migration.checksum]],
            column_names=["version", "name", "checksum"],
            column_oriented=True,
        )
        applied.append(migration.name)
        logger.info("analytics.migration_applied", extra={"version": migration.version})
    ensure_call_log_comments(client, database)
    return applied


def sql_string(value: str) -> str:
    """A ClickHouse string literal of `value`."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ensure_call_log_comments(client: Any, database: str = SHARED_DATABASE) -> int:
    """Make the column comments of <database>.call_log the engine's declaration
    (CALL_LOG_DOCS), so DESCRIBE explains each column; returns how many changed. Not a
    migration: the declaration is their one source, and a reworded comment reaches every
    database when it next opens. On a cluster both the local tables and the Distributed
    one (which DESCRIBE reads) take them."""
    table = call_log_table(database)
    target = ttl_target(client, table)
    if target is None:
        return 0
    tables = [target.table] if target.table == table else [target.table, table]
    changed = 0
    for name in tables:
        db, bare = name.split(".", 1)
        current = dict(client.query(
            "SELECT name, comment FROM system.columns "
            "WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": db, "t": bare},
        ).result_rows)
        for column, doc in CALL_LOG_DOCS.items():
            if column not in current or current[column] == doc:
                continue
            try:
                # Names are the engine's identifiers and the text is quoted as a literal.
                client.command(
                    f"ALTER TABLE {name}{target.on_cluster} COMMENT COLUMN {column} "
                    f"{sql_string(doc)}"
                )
            except ClickHouseError:
                # A comment documents; a server that refuses it (an account without
                # ON CLUSTER rights) must not keep the service from starting.
                logger.warning("analytics.comment_refused", extra={"kind": name})
                return changed
            changed += 1
    return changed


# Distributed('<cluster>', '<database>', '<table>', <shard key>) as system.tables shows it.
_DISTRIBUTED = re.compile(r"^Distributed\('([A-Za-z0-9_]+)', '([A-Za-z0-9_]*)', '([A-Za-z0-9_]+)'")


def covered_table(database: str, engine_full: str) -> tuple[str, str] | None:
    """(database, table) of the local tables a Distributed table of `database` reads, from
    its system.tables engine_full; None for any other engine."""
    distributed = _DISTRIBUTED.match(engine_full)
    if distributed is None:
        return None
    return distributed[2] or database, distributed[3]


@dataclass(frozen=True)
class TtlTarget:
    """Where a table's TTL lives: the table itself, or on a cluster (analytics.cluster) the
    local tables under its Distributed one, altered ON CLUSTER."""

    table: str
    #: " ON CLUSTER <name>" for a Distributed table's local tables, "" otherwise.
    on_cluster: str
    engine_full: str


def ttl_target(client: Any, table: str) -> TtlTarget | None:
    """The TTL target of `table` (database.name); None when the table does not exist."""

    def engine_full(database: str, name: str) -> str | None:
        result = client.query(
            "SELECT engine_full FROM system.tables "
            "WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": database, "t": name},
        )
        return str(result.result_rows[0][0]) if result.result_rows else None

    database, name = table.split(".", 1)
    engine = engine_full(database, name)
    if engine is None:
        return None
    distributed = _DISTRIBUTED.match(engine)
    if distributed is None:
        return TtlTarget(table, "", engine)
    # A Distributed table has no TTL: its rows, and their TTL, are in the local tables.
    cluster, local_db, local = distributed[1], distributed[2] or database, distributed[3]
    local_engine = engine_full(local_db, local)
    if local_engine is None:
        return None
    return TtlTarget(f"{local_db}.{local}", f" ON CLUSTER {cluster}", local_engine)


def current_ttl_days(client: Client, table: str) -> int | None:
    """The `TTL <time column> + INTERVAL n DAY` of a table, None when it has none."""
    target = ttl_target(client, table)
    match = _TTL_DAYS.search(target.engine_full) if target is not None else None
    return int(match[2]) if match else None


# Legal holds (docs/retention.md, "Legal holds"). A TTL cannot ask the control DB, so the
# control process keeps the holds that stand in this table (rights.holds syncs it) and
# every TTL rule deletes only rows of orgs it does not name. A hold carries its expiry, so
# it stops protecting on time even while the control process is down; a lifted hold is
# written again with an expiry in the past (insert only: a row read before its
# replacement is merged still protects, which errs on the side of keeping).
LEGAL_HOLDS_TABLE: Final = f"{SHARED_DATABASE}.legal_holds"
NOT_HELD_CONDITION: Final = (
    f"org_id NOT IN (SELECT org_id FROM {LEGAL_HOLDS_TABLE} FINAL WHERE until > now64())"  # noqa: S608
)


def ensure_legal_holds_table(client: Any) -> None:
    """The table the TTL conditions read; created before any TTL names it."""
    client.command(
        f"CREATE TABLE IF NOT EXISTS {LEGAL_HOLDS_TABLE} "
        "(hold_id String COMMENT 'Id of a legal hold in the control DB', "
        "org_id String COMMENT 'Organisation whose rows no TTL deletes while the hold stands', "
        "until DateTime64(6, 'UTC') COMMENT "
        "'Expiry of the hold (1970 once lifted); it protects while until > now64()', "
        "version UInt64 COMMENT 'Write time in microseconds: the latest row of a hold wins') "
        "ENGINE = ReplacingMergeTree(version) ORDER BY hold_id"
    )


def _held_rule(target: TtlTarget) -> bool:
    # The local tables of a cluster are merged on every server, each reading its own
    # legal_holds; holds are not replicated there yet, so the rule stays unconditional.
    return not target.on_cluster


def set_ttl_days(client: Client, table: str, days: int, column: str = "ts") -> bool:
    """Make the table's TTL `<column> + INTERVAL days DAY`, skipping held orgs' rows;
    True when it had to change."""
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise AnalyticsError(f"TTL for {table} must be a positive number of days, got {days!r}")
    if column not in _TTL_COLUMNS:
        raise AnalyticsError(f"no TTL on column {column!r}")
    target = ttl_target(client, table) or TtlTarget(table, "", "")
    held = _held_rule(target)
    wanted = f"{column} + toIntervalDay({days})" + (f" WHERE {NOT_HELD_CONDITION}" if held else "")
    if current_ttl(client, table) == wanted:
        return False
    clause = f"{column} + INTERVAL {days} DAY" + (
        f" DELETE WHERE {NOT_HELD_CONDITION}" if held else ""
    )
    if held:
        ensure_legal_holds_table(client)
    # The days value is a validated int and the names come from system.tables matched
    # against identifier characters, so formatting them into DDL is safe.
    client.command(f"ALTER TABLE {target.table}{target.on_cluster} MODIFY TTL {clause}")
    logger.info("analytics.ttl_changed", extra={"kind": table, "count": days})
    return True


LOGIN_KINDS_CONDITION = "startsWith(kind, 'auth.')"
_TTL_RULES = re.compile(r"\bTTL\s+(.*?)(?:\s+SETTINGS\s|$)", re.DOTALL)


def security_log_ttl(security_days: int, login_days: int, *, held: bool = True) -> str:
    """The TTL clause of security_log: login records may be kept for a shorter (or
    longer) period than the rest. With `held`, one rule whose period depends on the kind
    and which deletes no held org's rows: two rules reading the table of holds each leave
    a TTL mutation that never finishes (measured on chDB 4.4), one does not."""
    for days in (security_days, login_days):
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise ValueError("retention periods must be positive numbers of days")
    if held:
        return (
            f"ts + toIntervalDay(if({LOGIN_KINDS_CONDITION}, {login_days}, {security_days})) "
            f"DELETE WHERE {NOT_HELD_CONDITION}"
        )
    return (
        f"ts + INTERVAL {login_days} DAY DELETE WHERE {LOGIN_KINDS_CONDITION}, "
        f"ts + INTERVAL {security_days} DAY"
    )


def current_ttl(client: Any, table: str) -> str:
    target = ttl_target(client, table)
    match = _TTL_RULES.search(target.engine_full) if target is not None else None
    return match[1].strip() if match else ""


def ensure_security_log_ttl(client: Any, security_days: int, login_days: int) -> bool:
    """Make security_log's TTL match the settings; True when it had to change."""
    target = ttl_target(client, SECURITY_LOG_TABLE) or TtlTarget(SECURITY_LOG_TABLE, "", "")
    held = _held_rule(target)
    # As ClickHouse writes the clause back (system.tables).
    wanted = (
        f"ts + toIntervalDay(if({LOGIN_KINDS_CONDITION}, {login_days}, {security_days})) "
        f"WHERE {NOT_HELD_CONDITION}"
        if held
        else f"ts + toIntervalDay({login_days}) WHERE {LOGIN_KINDS_CONDITION}, "
        f"ts + toIntervalDay({security_days})"
    )
    if current_ttl(client, SECURITY_LOG_TABLE) == wanted:
        return False
    if held:
        ensure_legal_holds_table(client)
    # Both values are validated ints, so formatting them into DDL is safe.
    client.command(
        f"ALTER TABLE {target.table}{target.on_cluster} "
        f"MODIFY TTL {security_log_ttl(security_days, login_days, held=held)}"
    )
    logger.info("analytics.ttl_changed", extra={"kind": SECURITY_LOG_TABLE, "count": security_days})
    return True


def log_databases(client: Any) -> list[str]:
    """The shared database and every gateway pool's, as they exist."""
    rows = client.query(
        "SELECT name FROM system.databases WHERE match(name, {dbs:String}) ORDER BY name",
        parameters={"dbs": LOG_DATABASES},
    ).result_rows
    return [str(r[0]) for r in rows]


def call_log_tables(client: Any) -> list[str]:
    """Every call_log table: the shared database's and each pool database's."""
    rows = client.query(
        "SELECT database FROM system.tables WHERE name = 'call_log' "
        "AND match(database, {dbs:String}) ORDER BY database",
        parameters={"dbs": LOG_DATABASES},
    ).result_rows
    return [call_log_table(str(r[0])) for r in rows]


def set_call_log_ttl_days(client: Client, database: str, days: int) -> None:
    """The call_log TTL of one log database, on the call_log and on its rollup: the rollup
    keeps no minute whose calls call_log has dropped."""
    set_ttl_days(client, call_log_table(database), days)
    if str(client.command(f"EXISTS TABLE {call_stats_table(database)}")).strip() == "1":
        set_ttl_days(client, call_stats_table(database), days, column="minute")


def ensure_pool_database(client: Client, database: str, call_log_ttl_days: int) -> None:
    """A pool's database with its call_log current and its TTL the configured one."""
    apply_migrations(client, database)
    set_call_log_ttl_days(client, database, call_log_ttl_days)


def ensure_ttls(client: Client, settings: ClickHouseSettings) -> None:
    """Apply the configured retention periods (settings may change between starts), to
    every call_log: the shared one and the pools'."""
    for table in call_log_tables(client):
        set_call_log_ttl_days(client, table.split(".", 1)[0], settings.call_log_ttl_days)
    security_days: Any = getattr(settings, "security_log_ttl_days", None)
    login_days: Any = getattr(settings, "login_records_ttl_days", None)
    if security_days is not None and login_days is not None:
        # Login records (auth.*) have their own period: a second, conditional TTL rule.
        ensure_security_log_ttl(client, int(security_days), int(login_days))
    elif security_days is not None:
        set_ttl_days(client, SECURITY_LOG_TABLE, int(security_days))


#: Written as a lifted hold's expiry: the Unix epoch, long past.
_LIFTED = datetime(1970, 1, 1, tzinfo=UTC)


def sync_legal_holds(client: Any, holds: Sequence[tuple[str, str, datetime]]) -> int:
    """Make LEGAL_HOLDS_TABLE name exactly the holds that stand, given as (hold id, org id,
    until); returns how many rows were written. Holds placed are written before holds
    lifted, and nothing is ever deleted, so no moment exists in which a standing hold is
    missing from the table."""
    ensure_legal_holds_table(client)
    current = {
        str(h): (str(o), u)
        for h, o, u in client.query(
            f"SELECT hold_id, org_id, until FROM {LEGAL_HOLDS_TABLE} FINAL "  # noqa: S608
            "WHERE until > now64()"
        ).result_rows
    }
    wanted = {hold_id: (org_id, until) for hold_id, org_id, until in holds}
    rows: list[list[Any]] = [
        [hold_id, org_id, until]
        for hold_id, (org_id, until) in wanted.items()
        if current.get(hold_id, (None, None))[0] != org_id
        or _utc(current[hold_id][1]) != _utc(until)
    ]
    rows += [
        [hold_id, org_id, _LIFTED] for hold_id, (org_id, _) in current.items()
        if hold_id not in wanted
    ]
    if rows:
        # One version for the whole write, later than any before it on this clock.
        version = time.time_ns() // 1000
        client.insert(
            LEGAL_HOLDS_TABLE,
            [[*r, version] for r in rows],
            column_names=["hold_id", "org_id", "until", "version"],
        )
    return len(rows)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
