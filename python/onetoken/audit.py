"""`onetoken audit-retention --needle STRING`: look for a string in everything persisted.

The privacy promise is checkable (DESIGN.md section 3.6): put a unique string into
requests, then search every persisted byte for it. Stores searched:

a. every file under the data dir (recursively, raw bytes, in overlapping chunks), which
   covers the SQLite control DB, the spool, logs and the secret file; chDB compresses its
   column files, so a miss there proves nothing about ClickHouse, hence
b. every String-ish column of every table in ClickHouse, with SQL `position()`, through
   the caller's client, or one opened here, or the caller's `clickhouse_scan` (the CLI asks
   the running control process, which holds the chDB path, over the ops channel:
   onetoken.ops); a path that could not be opened is reported as not scanned;
c. extra paths given by the operator, and PostgreSQL when ONETOKEN_DATABASE_URL points to
   one (all text/varchar/json/bytea columns of the public schema).

A store that could not be searched is never silently "clean": it is listed in
`AuditReport.problems`. Findings name locations only (path and offset, table.column and
count), never the surrounding bytes.

Tickets are the one place content is kept by design: what a customer chose to submit in a
work order (docs/tickets.md). Hits there are reported apart (`ticket_findings`) and do not
fail the audit: files of the attachment store, ticket tables of PostgreSQL, and the SQLite
control DB's files when a search of its tables finds the string in ticket tables only. A
hit anywhere else, including the SQLite files when its tables do not explain it, is a
finding.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from onetoken.analytics.clickhouse import (
    ChdbLockedError,
    ClickHouseSettings,
    ClickHouseUnavailableError,
    covered_table,
    log_databases,
    open_client,
    parse_dsn,
)
from onetoken.tickets.models import Ticket, TicketAttachment, TicketMessage

logger = logging.getLogger("onetoken.audit")

CHUNK_BYTES: Final = 4 * 1024 * 1024
MAX_OFFSETS_SHOWN: Final = 5
# System databases hold no onetoken data; on chDB everything else is ours to scan.
_SYSTEM_DATABASES: Final = frozenset({"system", "information_schema", "INFORMATION_SCHEMA"})
# Engines that store no rows of their own (scanning them would re-scan or hit remote data).
_VIEW_ENGINES: Final = frozenset({"View", "MaterializedView", "LiveView", "WindowView"})
_PLAIN_STRING_TYPES: Final = ("String", "FixedString(")
TICKET_TABLES: Final = frozenset(
    t.__tablename__ for t in (Ticket, TicketMessage, TicketAttachment)
)
# Where the attachment store keeps its files when the settings do not say
# (Settings.ticket_store_dir).
TICKET_STORE_DIR: Final = "tickets"
# The files SQLite keeps a database in.
_SQLITE_SUFFIXES: Final = ("", "-wal", "-journal", "-shm")


@dataclass
class AuditReport:
    findings: list[str] = field(default_factory=list)
    #: Hits in tickets: content a customer submitted to a work order, kept by design (they
    #: do not fail the audit).
    ticket_findings: list[str] = field(default_factory=list)
    #: Stores or files that could not be searched; a scan with problems proves nothing
    #: about them.
    problems: list[str] = field(default_factory=list)
    files_scanned: int = 0
    bytes_scanned: int = 0
    columns_scanned: int = 0

    @property
    def found(self) -> bool:
        return bool(self.findings)

    @property
    def exit_code(self) -> int:
        """1 when found, 2 when nothing was found but part of the scan could not run; hits
        in tickets only are 0."""
        if self.findings:
            return 1
        return 2 if self.problems else 0

    def render(self) -> str:
        lines = [f"FOUND {f}" for f in self.findings]
        lines += [f"IN TICKETS {f}" for f in self.ticket_findings]
        lines += [f"NOT SCANNED {p}" for p in self.problems]
        lines.append(
            f"scanned {self.files_scanned} files ({self.bytes_scanned} bytes), "
            f"{self.columns_scanned} ClickHouse columns, {len(self.findings)} finding(s), "
            f"{len(self.ticket_findings)} in tickets (submitted by customers, kept by design)"
        )
        return "\n".join(lines)


def needle_variants(needle: str) -> dict[str, bytes]:
    """The byte forms in which a persisted copy of `needle` would appear.

    UTF-8 is how nearly everything is written; JSON's \\u escapes and UTF-16 catch the
    encoders that do not write raw UTF-8.
    """
    if not needle:
        raise ValueError("the needle must not be empty")
    variants: dict[str, bytes] = {"utf-8": needle.encode("utf-8")}
    escaped = json.dumps(needle, ensure_ascii=True)[1:-1].encode("ascii")
    if escaped not in variants.values():
        variants["json-escaped"] = escaped
    variants["utf-16-le"] = needle.encode("utf-16-le")
    variants["utf-16-be"] = needle.encode("utf-16-be")
    return variants


def scan_file(path: Path, variants: dict[str, bytes], report: AuditReport) -> None:
    """Search one regular file in chunks that overlap by the longest variant minus one."""
    counts: dict[str, list[int]] = {name: [] for name in variants}
    totals: dict[str, int] = dict.fromkeys(variants, 0)
    overlap = max(len(v) for v in variants.values()) - 1
    try:
        with path.open("rb") as handle:
            base = 0  # file offset of buffer[0]
            tail = b""
            while True:
                chunk = handle.read(CHUNK_BYTES)
                if not chunk:
                    break
                buffer = tail + chunk
                for name, pattern in variants.items():
                    # Matches starting inside the carried-over tail were already counted
                    # unless they reach into the new chunk.
                    start = 0
                    while (hit := buffer.find(pattern, start)) != -1:
                        if hit + len(pattern) > len(tail):
                            totals[name] += 1
                            if len(counts[name]) < MAX_OFFSETS_SHOWN:
                                counts[name].append(base + hit)
                        start = hit + 1
                report.bytes_scanned += len(chunk)
                keep = min(overlap, len(buffer))
                tail = buffer[len(buffer) - keep :] if keep else b""
                base += len(buffer) - len(tail)
    except OSError as exc:
        report.problems.append(f"{path}: could not be read ({type(exc).__name__}: {exc.strerror})")
        return
    report.files_scanned += 1
    for name, total in totals.items():
        if total:
            offsets = ", ".join(str(o) for o in counts[name])
            more = " ..." if total > len(counts[name]) else ""
            report.findings.append(
                f"{path}: {total} occurrence(s) ({name}) at offset {offsets}{more}"
            )


def scan_tree(
    root: Path,
    variants: dict[str, bytes],
    report: AuditReport,
    _visited: set[Path] | None = None,
) -> None:
    """Every file below `root` (or `root` itself); anything unreadable is a problem.

    Symlinks whose target lies inside `root` are skipped (the target is scanned in place;
    chDB's Atomic databases link data/<db>/<table> into store/); links leading outside are
    followed once each.
    """
    visited = _visited if _visited is not None else set()
    try:
        info = root.lstat()
        real_root = root.resolve()
    except (OSError, RuntimeError) as exc:
        report.problems.append(f"{root}: could not be read ({type(exc).__name__})")
        return
    if real_root in visited:
        return
    visited.add(real_root)
    if not stat.S_ISDIR(info.st_mode):
        _scan_entry(root, info, variants, report, real_root, visited)
        return

    def on_error(exc: OSError) -> None:
        report.problems.append(f"{exc.filename}: directory could not be listed ({exc.strerror})")

    for directory, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames.sort()
        links = [d for d in dirnames if Path(directory, d).is_symlink()]
        for name in [*sorted(filenames), *links]:
            path = Path(directory, name)
            try:
                entry_info = path.lstat()
            except OSError as exc:
                report.problems.append(f"{path}: could not be read ({type(exc).__name__})")
                continue
            _scan_entry(path, entry_info, variants, report, real_root, visited)


def _scan_entry(
    path: Path,
    info: os.stat_result,
    variants: dict[str, bytes],
    report: AuditReport,
    real_root: Path,
    visited: set[Path],
) -> None:
    if stat.S_ISREG(info.st_mode):
        scan_file(path, variants, report)
    elif stat.S_ISLNK(info.st_mode):
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            report.problems.append(f"{path}: dangling symlink, not read")
            return
        if target.is_relative_to(real_root) and target != real_root:
            return
        scan_tree(target, variants, report, visited)
    else:
        # FIFOs, sockets and devices would block or never end; they hold no stored data
        # but are listed so the operator knows they were not read.
        report.problems.append(f"{path}: not a regular file, not read")


# ---------------------------------------------------------------------------------------
# ClickHouse


def _clickhouse_string_expression(column: str, ch_type: str) -> str | None:
    """SQL giving a String to search for a column, None when it cannot hold text."""
    from clickhouse_connect.driver.binding import quote_identifier

    quoted = quote_identifier(column)
    inner = ch_type
    for wrapper in ("LowCardinality(", "Nullable("):
        while inner.startswith(wrapper):
            inner = inner[len(wrapper) : -1]
    if inner == "String" or inner.startswith("FixedString("):
        return f"assumeNotNull({quoted})" if "Nullable(" in ch_type else quoted
    if "String" in inner or inner.startswith(("JSON", "Object(", "Dynamic", "Variant(")):
        # Arrays, maps, tuples and JSON of strings: search their text form.
        return f"toString({quoted})"
    return None


def scan_clickhouse(
    client: Any, needle: str, report: AuditReport, databases: Sequence[str] | None = None
) -> None:
    """Count rows whose String-ish columns contain `needle`, table by table.

    `databases` None means every non-system database (right for chDB, whose whole path is
    ours); a server scan passes ("onetoken",).

    On a cluster (analytics.cluster) the scan meets a Distributed table, which reads every
    shard, and the local table under it, which holds this server's shard only: a local
    table is skipped once a Distributed table over it in the same scan was read, so each
    finding is reported once. When the Distributed table cannot be read (a shard down),
    the local table is still scanned, and the failure is reported.
    """
    if databases is None:
        rows = client.query("SELECT name FROM system.databases").result_rows
        databases = [str(r[0]) for r in rows if str(r[0]) not in _SYSTEM_DATABASES]
    tables = client.query(
        "SELECT database, name, engine, engine_full FROM system.tables "
        "WHERE database IN {dbs:Array(String)} ORDER BY database, name",
        parameters={"dbs": list(databases)},
    ).result_rows
    from clickhouse_connect.driver.binding import quote_identifier

    # Distributed tables first, so that what they read is known before the local tables.
    covering = {(str(db), str(t)): covered_table(str(db), str(full)) for db, t, _, full in tables}
    tables = sorted(tables, key=lambda r: covering[(str(r[0]), str(r[1]))] is None)
    covered: set[tuple[str, str]] = set()
    for database, table, engine, _ in tables:
        if str(engine) in _VIEW_ENGINES or (str(database), str(table)) in covered:
            continue
        columns = client.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} "
            "AND table = {t:String} ORDER BY position",
            parameters={"db": database, "t": table},
        ).result_rows
        exprs = [
            (str(name), expr)
            for name, ch_type in columns
            if (expr := _clickhouse_string_expression(str(name), str(ch_type))) is not None
        ]
        if not exprs:
            continue
        # One pass over the table for all its columns: countIf per column.
        select = ", ".join(f"countIf(position({expr}, {{needle:String}}) > 0)" for _, expr in exprs)
        qualified = f"{quote_identifier(str(database))}.{quote_identifier(str(table))}"
        try:
            counts = client.query(
                f"SELECT {select} FROM {qualified}",  # noqa: S608 (quoted identifiers)
                parameters={"needle": needle},
            ).result_rows[0]
        except Exception as exc:
            report.problems.append(
                f"ClickHouse table {database}.{table}: could not be scanned ({type(exc).__name__})"
            )
            continue
        report.columns_scanned += len(exprs)
        if (local := covering[(str(database), str(table))]) is not None:
            covered.add(local)
        for (name, _), count in zip(exprs, counts, strict=True):
            if int(count):
                report.findings.append(f"ClickHouse {database}.{table}.{name}: {int(count)} row(s)")


#: Runs the ClickHouse part of the audit elsewhere (the needle, the report to add findings
#: and problems to).
ClickHouseScan = Callable[[str, "AuditReport"], None]


def scan_clickhouse_client(
    settings: ClickHouseSettings, client: Any, needle: str, report: AuditReport
) -> None:
    """The ClickHouse part of the audit through an open client: every database of a chDB
    path (all of it is ours), the onetoken databases of a server (the shared one and the
    gateway pools')."""
    dsn = parse_dsn(settings.clickhouse_dsn, settings.data_dir)
    try:
        databases = None if dsn.kind == "chdb" else log_databases(client)
        scan_clickhouse(client, needle, report, databases)
    except Exception as exc:
        report.problems.append(f"ClickHouse ({dsn.display}): scan failed ({type(exc).__name__})")


def _scan_clickhouse_from_settings(
    settings: ClickHouseSettings, needle: str, report: AuditReport
) -> None:
    dsn = parse_dsn(settings.clickhouse_dsn, settings.data_dir)
    if dsn.kind == "chdb":
        if dsn.chdb_path is None:
            report.problems.append("ClickHouse: in-memory chDB keeps nothing on disk, not scanned")
            return
        if not (dsn.chdb_path / "metadata").exists():
            # Nothing was ever written there; opening it would only create an empty store.
            return
    try:
        client = open_client(settings, migrate=False)
    except ChdbLockedError as exc:
        report.problems.append(
            f"ClickHouse ({dsn.display}): {exc} Run the scan through the running server "
            "instead (`onetoken audit-retention` asks a running control process)."
        )
        return
    except ClickHouseUnavailableError as exc:
        report.problems.append(f"ClickHouse ({dsn.display}): {exc}")
        return
    try:
        scan_clickhouse_client(settings, client, needle, report)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------
# SQL control database (PostgreSQL; SQLite files are covered by the file scan)

_SQL_TEXT_TYPES: Final = ("char", "text", "json", "uuid", "xml", "citext", "name")


def scan_sql_database(url: str, needle: str, report: AuditReport) -> None:
    """Search every text-like column of every table (PostgreSQL: the public schema).

    Works with any SQLAlchemy URL; PostgreSQL uses strpos on the text form (and on raw
    bytes for bytea), others instr. The needle is a bound parameter, never SQL text.
    """
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(url)
    try:
        is_postgres = engine.dialect.name == "postgresql"
        schema = "public" if is_postgres else None
        quote = engine.dialect.identifier_preparer.quote
        with engine.connect() as conn:
            inspector = inspect(conn)
            for table in sorted(inspector.get_table_names(schema=schema)):
                for column in inspector.get_columns(table, schema=schema):
                    type_name = str(column["type"]).lower()
                    is_bytes = "bytea" in type_name or "blob" in type_name
                    if not (is_bytes or any(t in type_name for t in _SQL_TEXT_TYPES)):
                        continue
                    qualified = f"{quote(schema)}.{quote(table)}" if schema else quote(table)
                    col = quote(str(column["name"]))
                    if is_postgres and is_bytes:
                        cond = f"position(:needle_bytes in {col}) > 0"
                    elif is_postgres:
                        cond = f"strpos(CAST({col} AS TEXT), :needle) > 0"
                    else:
                        cond = f"instr(CAST({col} AS TEXT), :needle) > 0"
                    try:
                        count = conn.execute(
                            text(f"SELECT count(*) FROM {qualified} WHERE {cond}"),  # noqa: S608
                            {"needle": needle, "needle_bytes": needle.encode("utf-8")},
                        ).scalar_one()
                    except Exception as exc:
                        conn.rollback()
                        report.problems.append(
                            f"control DB {table}.{column['name']}: could not be scanned "
                            f"({type(exc).__name__})"
                        )
                        continue
                    report.columns_scanned += 1
                    if count:
                        found = f"control DB {table}.{column['name']}: {int(count)} row(s)"
                        if table in TICKET_TABLES:
                            report.ticket_findings.append(found)
                        else:
                            report.findings.append(found)
    except Exception as exc:
        report.problems.append(
            f"control DB ({engine.url.render_as_string(hide_password=True)}): "
            f"could not be scanned ({type(exc).__name__})"
        )
    finally:
        engine.dispose()


def _set_ticket_hits_apart(report: AuditReport, store: Path, url: str, needle: str) -> None:
    """Move the file findings that are ticket content to `ticket_findings`: files of the
    attachment store, and the SQLite control DB's files when its ticket tables, and only
    they, hold the needle (a hit its tables do not explain, e.g. in a freed page, stays a
    finding)."""
    store = store.resolve()
    sqlite_files: set[Path] = set()
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database:
            sqlite_files = {Path(f"{database}{s}").resolve() for s in _SQLITE_SUFFIXES}

    def where(finding: str) -> Path:
        return Path(finding.split(": ", 1)[0]).resolve()

    in_store = [f for f in report.findings if where(f).is_relative_to(store)]
    in_sqlite = [f for f in report.findings if where(f) in sqlite_files]
    if in_sqlite:
        tables = AuditReport()
        scan_sql_database(url, needle, tables)
        if tables.problems or tables.findings or not tables.ticket_findings:
            in_sqlite = []
        else:
            report.ticket_findings.extend(tables.ticket_findings)
    moved = set(in_store) | set(in_sqlite)
    report.ticket_findings.extend(f for f in report.findings if f in moved)
    report.findings[:] = [f for f in report.findings if f not in moved]


def _database_url(settings: ClickHouseSettings) -> str:
    value: Any = getattr(settings, "database_url", None) or os.environ.get(
        "ONETOKEN_DATABASE_URL", ""
    )
    return str(value or "")


# ---------------------------------------------------------------------------------------


def audit(
    settings: ClickHouseSettings,
    needle: str,
    *,
    client: Any | None = None,
    extra_paths: Iterable[Path] = (),
    clickhouse_scan: ClickHouseScan | None = None,
) -> AuditReport:
    """Run the whole audit; see the module docstring for what is searched.

    `client`: an open ClickHouse client (the running server passes its own, since chDB
    lets only one process open the path). `clickhouse_scan`: the ClickHouse part done
    elsewhere (the CLI asks the running control process). Without either, a client is
    opened from the settings.
    """
    variants = needle_variants(needle)
    report = AuditReport()
    data_dir = Path(settings.data_dir)
    if data_dir.exists():
        scan_tree(data_dir, variants, report)
        store = Path(getattr(settings, "ticket_store_dir", data_dir / TICKET_STORE_DIR))
        _set_ticket_hits_apart(report, store, _database_url(settings), needle)
    else:
        report.problems.append(f"{data_dir}: data directory does not exist")
    for extra in extra_paths:
        scan_tree(Path(extra), variants, report)

    if client is not None:
        scan_clickhouse_client(settings, client, needle, report)
    elif clickhouse_scan is not None:
        clickhouse_scan(needle, report)
    else:
        _scan_clickhouse_from_settings(settings, needle, report)

    url = _database_url(settings)
    if url and not url.startswith("sqlite"):
        scan_sql_database(url, needle, report)
    return report


def scan(
    settings: ClickHouseSettings,
    needle: str,
    *,
    client: Any | None = None,
    extra_paths: Iterable[Path] = (),
) -> list[str]:
    """Locations where `needle` was found (empty when clean). Use `audit()` to also get
    the stores that could not be searched: an empty list from `scan` does not say that
    everything could be read."""
    report = audit(settings, needle, client=client, extra_paths=extra_paths)
    if report.problems:
        logger.warning("audit.incomplete", extra={"count": len(report.problems)})
    return report.findings
