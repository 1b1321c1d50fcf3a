"""Read-only SQL over call metadata, for analysts and operators (docs/sql.md).

What a query may do is decided by ClickHouse, not by parsing SQL here:

- ClickHouse's own parser (`formatQuery`) turns the text into one canonical statement,
  refusing several statements; the statement runs as the subquery of
  `SELECT * FROM (...) LIMIT n`, which only a SELECT parses as (no INSERT, SET, FORMAT or
  INTO OUTFILE, which chDB would write even in readonly mode).
- It runs with `readonly=1`, so it cannot write, create or change a setting (a SETTINGS
  clause that tries to lift the filters or limits is refused by the engine), and with
  `additional_table_filters` on every table that holds org rows, so ClickHouse adds the
  org condition to each read of those tables: in subqueries, JOINs, UNIONs, CTEs and FINAL.
- What the statement reads comes from ClickHouse's analyzer (EXPLAIN QUERY TREE): twice,
  first before name resolution, which evaluates nothing (table functions, reads of other
  databases such as `system`, and functions that read files or dictionaries are refused
  there: the second pass evaluates scalar subqueries, and these would escape the filters,
  merge() above all), then resolved, where every table read must be on the allow-list.
- Time, memory, rows read and result size are the engine's limits (SqlLimits).

On chDB the settings go on a session of their own (a second handle on the same engine),
never on the shared client that ingestion writes through: readonly cannot be lifted on a
session once set. On a ClickHouse server they ride with each request.

Nothing here logs the query or its results; callers audit its hash and length.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import partial
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, Literal
from uuid import UUID

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from onetoken.analytics.clickhouse import AnalyticsError
from onetoken.analytics.columns import LOG_DATABASES
from onetoken.settings import Settings

#: Tables an org-scoped query may read, in the shared database and each pool's; each holds
#: an org_id column that the row filter matches (docs/analytics.md describes them).
READABLE_TABLES: Final = (
    "call_log",
    "call_stats_1m",
    "security_log",
    "dim_orgs",
    "dim_providers",
    "dim_models",
    "dim_keys",
    "dim_applications",
)
#: Dimension tables whose platform-wide rows (org_id '') every org may read: the names
#: of the providers and models its calls went to.
_PLATFORM_ROWS: Final = frozenset({"dim_providers", "dim_models"})
#: What `SELECT 1` (no FROM) reads: one constant row.
_CONSTANT_TABLE: Final = "system.one"
#: Functions that read what the row filters do not cover: files on the server, dictionaries
#: and Join tables by name, model files.
_REFUSED_FUNCTION: Final = re.compile(r"^(file|dict\w*|joinGet\w*|catboostEvaluate)$", re.I)

SqlErrorCode = Literal["sql_refused", "sql_error", "sql_limit_exceeded"]

# ClickHouse error codes: READONLY, ACCESS_DENIED / the engine refusing an action.
_REFUSED_CODES: Final = frozenset({164, 497})
# TOO_MANY_ROWS, TIMEOUT_EXCEEDED, TOO_SLOW, MEMORY_LIMIT_EXCEEDED, TOO_MANY_BYTES,
# TOO_MANY_ROWS_OR_BYTES.
_LIMIT_CODES: Final = frozenset({158, 159, 160, 241, 307, 396})
_CH_CODE: Final = re.compile(r"Code: (\d+)\.")
_CH_TRAILER: Final = re.compile(r"\s*\(version [^)]*\)|\s*\([A-Z_]+\)\s*$")
_MULTI_STATEMENT: Final = "Multi-statements are not allowed"


@dataclass(frozen=True, slots=True)
class SqlLimits:
    """The engine limits of one query (ONETOKEN_SQL_*, onetoken.settings)."""

    max_execution_time_s: int
    max_memory_bytes: int
    max_result_rows: int
    max_result_bytes: int
    max_rows_to_read: int


class SqlQueryError(AnalyticsError):
    """A query refused or failed; `code` says which (sql_refused, sql_error,
    sql_limit_exceeded). The message is ClickHouse's about the caller's own query, or a
    fixed text: it never echoes other orgs' rows, which the query could not read."""

    def __init__(self, code: SqlErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: SqlErrorCode = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SqlResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    #: True when the result had more than max_result_rows rows and was cut there.
    truncated: bool
    elapsed_ms: float

    @property
    def row_count(self) -> int:
        return len(self.rows)


def query_fingerprint(query: str) -> dict[str, str | int]:
    """What the audit keeps of a query: its hash and length, never its text (which may
    quote anything, a secret included)."""
    return {
        "query_sha256": hashlib.sha256(query.encode("utf-8", "surrogatepass")).hexdigest(),
        "query_length": len(query),
    }


def run_sql(
    client: Any,
    query: str,
    *,
    org_id: str | None,
    limits: SqlLimits,
    tables: Collection[str] = READABLE_TABLES,
) -> SqlResult:
    """Run one read-only query on `client` (the process's ClickHouse client), limited to
    `org_id`'s rows, or to every org's when None (operators who asked for all orgs), and
    to `tables` (a part of READABLE_TABLES: what the caller's role may read)."""
    if not query.strip():
        raise SqlQueryError("sql_error", "The query is empty.")
    # A NUL would end a C string on the way into chDB; a lone surrogate is no UTF-8.
    if "\x00" in query or not _encodable(query):
        raise SqlQueryError("sql_error", "The query holds a NUL or a lone surrogate.")
    with _session(client) as session:
        canonical = _single_statement(session.run, query)
        wrapped = _wrap(session.run, canonical, limits.max_result_rows)
        # The catalogue first: the restricted session may not read system tables.
        existing = _readable_tables(session.run)
        databases = _databases(session.run)
        # Filters on every table holding org rows, whatever this caller may read.
        session.restrict(_engine_settings(existing, org_id, limits))
        _check_unresolved(session.run, wrapped, databases, tables)
        _check_resolved(
            session.run, wrapped, [t for t in existing if t.rsplit(".", 1)[1] in tables]
        )
        started = time.monotonic()
        result = _guarded(lambda: session.query(wrapped))
        elapsed_ms = (time.monotonic() - started) * 1000
    rows = [[_jsonable(v) for v in row] for row in result.result_rows]
    truncated = len(rows) > limits.max_result_rows
    return SqlResult(
        columns=list(result.column_names),
        types=[t.name for t in result.column_types],
        rows=rows[: limits.max_result_rows],
        truncated=truncated,
        elapsed_ms=round(elapsed_ms, 3),
    )


# -- sessions ---------------------------------------------------------------------------


class _Session:
    """Where the query's statements run. On chDB a handle of its own whose session takes
    the settings (readonly last, after which nothing can change them); on a server, the
    shared client with the settings on each request (server sessions are per request)."""

    def __init__(self, client: Any, own: bool) -> None:
        self._client = client
        self._own = own
        self._settings: dict[str, Any] = {}
        self._restricted = False

    def restrict(self, settings: dict[str, Any]) -> None:
        if self._own:
            for name, value in settings.items():
                _guarded(partial(self._client.command, f"SET {name} = {_literal(value)}"))
        else:
            # URL parameters take a setting's text: a map as its literal, the rest bare.
            self._settings = {
                name: _literal(value) if isinstance(value, dict) else value
                for name, value in settings.items()
            }
        self._restricted = True

    def query(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        assert self._restricted, "the query's settings come first"
        return self._client.query(
            sql, parameters=parameters, settings=None if self._own else self._settings
        )

    def run(self, sql: str, parameters: Mapping[str, Any] | None = None) -> Any:
        """A statement of the checks: restricted once restrict() ran."""
        if self._restricted:
            return self.query(sql, parameters)
        return self._client.query(sql, parameters=parameters)

    def close(self) -> None:
        if self._own:
            with contextlib.suppress(Exception):
                self._client.close()


@contextlib.contextmanager
def _session(client: Any) -> Iterator[_Session]:
    path = getattr(client, "path", None)
    # By name: importing clickhouse-connect's chDB client class would load chDB into a
    # process that talks to a server.
    if type(client).__name__ == "ChdbClient" and isinstance(path, str):
        # Same path, same engine: chDB hands out any number of handles to the engine this
        # process runs, each with its own session settings.
        session = _Session(_guarded(lambda: clickhouse_connect.get_client(
            interface="chdb", path=path)), own=True)
    else:
        session = _Session(client, own=False)
    try:
        yield session
    finally:
        session.close()


# -- the checks -------------------------------------------------------------------------

Run = Callable[..., Any]


def _single_statement(run: Run, query: str) -> str:
    """ClickHouse's own rendering of the query: one statement without comments."""
    try:
        result = run("SELECT formatQuery({q:String})", {"q": query})
    except ClickHouseError as exc:
        if _MULTI_STATEMENT in str(exc):
            raise SqlQueryError("sql_refused", "Send one statement at a time.") from None
        raise _translate(exc) from None
    return str(result.result_rows[0][0])


def _wrap(run: Run, canonical: str, max_rows: int) -> str:
    """The statement as the subquery of a bounded SELECT. One more row than the limit
    says whether the result was cut."""
    # The statement is ClickHouse's own rendering, parsed once already; parsing the whole
    # again below is what admits it.
    wrapped = f"SELECT * FROM (\n{canonical}\n) LIMIT {int(max_rows) + 1}"  # noqa: S608
    try:
        run("SELECT formatQuery({q:String})", {"q": wrapped})
    except ClickHouseError:
        raise SqlQueryError(
            "sql_refused",
            "Only a SELECT statement (without FORMAT or INTO OUTFILE) can run here.",
        ) from None
    return wrapped


def _readable_tables(run: Run) -> list[str]:
    rows = run(
        "SELECT database, name FROM system.tables WHERE match(database, {dbs:String}) "
        "AND name IN {names:Array(String)} ORDER BY database, name",
        {"dbs": LOG_DATABASES, "names": list(READABLE_TABLES)},
    ).result_rows
    return [f"{db}.{name}" for db, name in rows]


def _databases(run: Run) -> frozenset[str]:
    return frozenset(str(r[0]) for r in run("SELECT name FROM system.databases").result_rows)


def _engine_settings(
    readable: list[str], org_id: str | None, limits: SqlLimits
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "max_execution_time": limits.max_execution_time_s,
        "timeout_overflow_mode": "throw",
        "max_memory_usage": limits.max_memory_bytes,
        # Rows are cut by the wrapper's LIMIT (max_result_rows there would count whole
        # blocks before that LIMIT, failing a sorted query that returns few rows). Bytes
        # fail the query: a cut inside a block could not say where it fell.
        "max_result_bytes": limits.max_result_bytes,
        "result_overflow_mode": "throw",
        "max_rows_to_read": limits.max_rows_to_read,
        "read_overflow_mode": "throw",
    }
    if org_id is not None:
        settings["additional_table_filters"] = {
            table: _org_condition(table, org_id) for table in readable
        }
    # Last: from here on the session refuses any change, the query's SETTINGS clause too.
    settings["readonly"] = 1
    return settings


def _org_condition(table: str, org_id: str) -> str:
    if table.rsplit(".", 1)[1] in _PLATFORM_ROWS:
        return f"org_id IN ({_quote(org_id)}, '')"
    return f"org_id = {_quote(org_id)}"


_IDENTIFIER: Final = re.compile(r"\bidentifier: ([^\s,]+)")
_FUNCTION: Final = re.compile(r"\bfunction_name: ([^\s,]+)")
_SETTINGS_NODE: Final = re.compile(r"^\s*SETTINGS ")
_TABLE_NODE: Final = re.compile(r"^\s*TABLE id: \d+,")
_TABLE_NAME: Final = re.compile(r"^\s*TABLE id: \d+, (?:alias: .*, )?table_name: ([^\s,]+)"
    r"(?:, (?:final|sample_size|sample_offset): [^,]+)*$"
)


def _explain(run: Run, sql: str, *, resolved: bool) -> list[str]:
    passes = "" if resolved else "run_passes = 0 "
    result = _guarded(lambda: run(f"EXPLAIN QUERY TREE {passes}{sql}"))
    return [str(r[0]) for r in result.result_rows]


def _check_unresolved(
    run: Run, sql: str, databases: frozenset[str], tables: Collection[str]
) -> None:
    """Before names are resolved (nothing is evaluated yet): no table function, no
    other database, no function that reads past the filters. A name is matched wherever
    it appears in a node line, so a strange alias can only add refusals."""
    log_databases = re.compile(LOG_DATABASES)
    lowered = {d.lower() for d in databases if not log_databases.match(d)}
    for line in _explain(run, sql, resolved=False):
        if "TABLE_FUNCTION" in line:
            raise SqlQueryError("sql_refused", "Table functions cannot be used here.")
        if _SETTINGS_NODE.match(line):
            # The engine refuses a change of settings in readonly mode at the top and
            # ignores one in a subquery; refused here either way, so none seems to work.
            raise SqlQueryError(
                "sql_refused", "A SETTINGS clause cannot be used here: the limits are fixed."
            )
        for name in _FUNCTION.findall(line):
            if _REFUSED_FUNCTION.match(name):
                raise SqlQueryError("sql_refused", f"The function {name} cannot be used here.")
        for identifier in _IDENTIFIER.findall(line):
            if identifier == _CONSTANT_TABLE:
                continue
            parts = identifier.split(".")
            if parts[0].lower() in lowered or parts[0].lower() in ("system", "information_schema"):
                raise SqlQueryError(
                    "sql_refused", f"Only the tables listed in docs/sql.md can be read "
                    f"(not {parts[0]}.*)."
                )
            if log_databases.match(parts[0]) and len(parts) > 1 and (
                parts[1] not in tables
            ):
                raise SqlQueryError(
                    "sql_refused", f"The table {parts[0]}.{parts[1]} cannot be read here."
                )


def _check_resolved(run: Run, sql: str, readable: list[str]) -> None:
    """After resolution: every table the query reads is on the allow-list."""
    allowed = {*readable, _CONSTANT_TABLE}
    for line in _explain(run, sql, resolved=True):
        if "TABLE_FUNCTION" in line:
            raise SqlQueryError("sql_refused", "Table functions cannot be used here.")
        if not _TABLE_NODE.match(line):
            continue
        match = _TABLE_NAME.match(line)
        if match is None or match[1] not in allowed:
            name = match[1] if match else "this table"
            raise SqlQueryError("sql_refused", f"The table {name} cannot be read here.")


# -- values and errors ------------------------------------------------------------------


def _guarded(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ClickHouseError as exc:
        raise _translate(exc) from None


def _translate(exc: ClickHouseError) -> SqlQueryError:
    text = str(exc)
    match = _CH_CODE.search(text)
    code = int(match[1]) if match else 0
    # The last "DB::Exception:" carries the engine's own words; the rest is transport.
    message = text.rsplit("DB::Exception:", 1)[-1].strip().splitlines()[0] if text else ""
    message = _CH_TRAILER.sub("", _CH_TRAILER.sub("", message)).strip() or "Query failed."
    if code in _REFUSED_CODES:
        return SqlQueryError("sql_refused", message)
    if code in _LIMIT_CODES:
        return SqlQueryError("sql_limit_exceeded", message)
    return SqlQueryError("sql_error", message)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_quote(k)}: {_quote(v)}" for k, v in value.items()) + "}"
    return _quote(str(value))


def _jsonable(value: Any) -> Any:
    """A ClickHouse value as JSON can carry it (and the CLI prints it)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | UUID | IPv4Address | IPv6Address):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def limits_from(settings: Settings) -> SqlLimits:
    """The ONETOKEN_SQL_* limits."""
    return SqlLimits(
        max_execution_time_s=settings.sql_max_execution_time_s,
        max_memory_bytes=settings.sql_max_memory_bytes,
        max_result_rows=settings.sql_max_result_rows,
        max_result_bytes=settings.sql_max_result_bytes,
        max_rows_to_read=settings.sql_max_rows_to_read,
    )
