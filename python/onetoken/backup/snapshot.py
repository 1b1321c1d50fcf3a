"""One consistent copy of the embedded stores in a staging directory, taken by the process
that holds them (the serving control process, over the ops channel; else the CLI itself).

- The control DB: `VACUUM INTO`, not the page-copying online backup API. Both read in one
  transaction while others write, but a page copy keeps free pages as they are, and those
  can still hold the bytes of rows erased or purged since: a backup must not bring back
  what retention and erasure removed. VACUUM INTO writes the live rows only.
- chDB: ClickHouse's own `BACKUP DATABASE ... TO File(...)` of every log database (the
  shared one and each pool's), with its rollup and migration record, restored with
  `RESTORE`. Parts replaced by an erasure's mutation are outdated and not backed up.
- Ticket attachments: hard links of the attachment files (copies across file systems),
  taken right after the database copy.

The caller keeps ingestion still while this runs (Ingestor.paused), so the ledger and
call_log hold the same batches and reconcile to zero in the copy as in the original.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy.engine import make_url

from onetoken.analytics.clickhouse import (
    applied_migrations,
    backup_root,
    log_databases,
    parse_dsn,
    sql_string,
)
from onetoken.kit.files import private_dir
from onetoken.security import audit
from onetoken.settings import Settings

MANIFEST: Final = "manifest.json"
CONTROL_DB: Final = "control.db"
CLICKHOUSE: Final = "clickhouse"
TICKETS: Final = "tickets"
# The staging directory's name: the CLI makes it up, the serving process writes there.
STAGING_NAME: Final = re.compile(r"^[0-9a-f]{32}$")


class BackupError(Exception):
    """A backup or restore cannot be made: a message for the operator, never data."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a backup holds: counts and versions, nothing of the rows themselves."""

    format: int
    created_at: str
    #: "environment" (ONETOKEN_SECRET_KEY) or "data_dir" (a generated secret.key): where a
    #: restore finds the master secret. The backup never carries it (docs/operations.md).
    secret_source: str
    databases: list[str]
    clickhouse_migrations: list[int]
    call_log_rows: int
    security_log_rows: int
    ticket_files: int

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise BackupError("the backup's manifest is missing or malformed") from exc


def audited(kind: str, manifest: Manifest, *, serving: bool) -> None:
    """A platform-wide security event: a backup copies every org's records, so taking or
    restoring one is audited like any operator action (counts only)."""
    audit.event(
        audit.CliActor(), kind, "medium",
        detail={
            "call_log_rows": manifest.call_log_rows,
            "security_log_rows": manifest.security_log_rows,
            "ticket_files": manifest.ticket_files,
            "serving": serving,
        },
    )


def check_embedded(settings: Settings) -> tuple[Path, Path]:
    """(control DB file, chDB directory); BackupError unless both stores are embedded."""
    url = make_url(settings.database_url)
    dsn = parse_dsn(settings.clickhouse_dsn, settings.data_dir)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        raise BackupError(
            "onetoken backup covers the embedded default (SQLite); back a PostgreSQL control "
            "DB up with pg_dump or PITR (docs/operations.md, \"Backup and restore\")"
        )
    if dsn.kind != "chdb" or dsn.chdb_path is None:
        raise BackupError(
            "onetoken backup covers the embedded default (chDB); back a ClickHouse server up "
            "with BACKUP ... TO S3/Disk or clickhouse-backup (docs/operations.md)"
        )
    return Path(url.database), dsn.chdb_path


def remove_stale_staging(settings: Settings) -> int:
    """Remove what backups killed half-way left in staging: plaintext copies of the
    stores, which would keep rows erased or purged since. Only for a serving process at
    start, holding chDB (inside its sink's read): every backup goes through it then, and
    none is under way yet. Returns how many were removed."""
    root = backup_root(settings.data_dir)
    stale = [p for p in root.iterdir() if STAGING_NAME.match(p.name)] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def staging_dir(settings: Settings, name: str) -> Path:
    if not STAGING_NAME.match(name):
        raise BackupError("a staging name is 32 lowercase hex digits")
    return backup_root(settings.data_dir) / name


SECRET_FROM_ENVIRONMENT: Final = "environment"  # noqa: S105 (where it is, not what)
SECRET_FROM_DATA_DIR: Final = "data_dir"  # noqa: S105 (where it is, not what)


def secret_source(settings: Settings) -> str:
    if settings.secret_key is not None:
        return SECRET_FROM_ENVIRONMENT
    return SECRET_FROM_DATA_DIR


def take(settings: Settings, client: Any, staging: Path) -> Manifest:
    """Copy the stores into `staging` (created here; removed again on failure). `client`
    is the ClickHouse client of the process holding chDB; a serving process calls this
    with its ingestion paused (Ingestor.paused)."""
    database, _ = check_embedded(settings)
    private_dir(staging.parent)
    staging.mkdir(mode=0o700)
    try:
        manifest = _copy(settings, client, database, staging, secret_source(settings))
        manifest.write(staging / MANIFEST)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy(
    settings: Settings, client: Any, database: Path, staging: Path, secret_source: str
) -> Manifest:
    copy_control_db(database, staging / CONTROL_DB)
    # None on a data dir whose server never ran: the restored one creates them at start.
    databases = log_databases(client)
    if databases:
        listed = ", ".join(f"DATABASE {d}" for d in databases)
        # Database names are the engine's, matched against LOG_DATABASES; the path is ours.
        client.command(f"BACKUP {listed} TO File({sql_string(str(staging / CLICKHOUSE))})")
    tickets = _link_tree(settings.ticket_store_dir, staging / TICKETS)
    return Manifest(
        format=1,
        created_at=datetime.now(UTC).isoformat(),
        secret_source=secret_source,
        databases=databases,
        clickhouse_migrations=sorted(applied_migrations(client)),
        call_log_rows=_count(client, databases, "call_log"),
        security_log_rows=_count(client, ["onetoken"], "security_log"),
        ticket_files=tickets,
    )


def copy_control_db(database: Path, target: Path) -> None:
    """The live rows of the SQLite control DB into a new file, in one read transaction
    (free pages, and what erased rows left in them, stay behind)."""
    src = sqlite3.connect(database, timeout=30)
    try:
        src.execute("VACUUM INTO ?", (str(target),))
    finally:
        src.close()


def _count(client: Any, databases: list[str], table: str) -> int:
    total = 0
    for db in databases:
        if str(client.command(f"EXISTS TABLE {db}.{table}")).strip() == "1":
            # Names from system.databases matched against LOG_DATABASES, and our own.
            total += int(client.command(f"SELECT count() FROM {db}.{table} FINAL"))  # noqa: S608
    return total


def _link_tree(source: Path, target: Path) -> int:
    """Hard-link every attachment file under `source` into `target`; the number linked.
    Files still being written (`*.partial`) are left out: their rows are not committed."""
    count = 0
    if not source.is_dir():
        return 0
    for root, _, files in os.walk(source):
        rel = Path(root).relative_to(source)
        for name in files:
            if name.endswith(".partial"):
                continue
            private_dir(target / rel)
            try:
                try:
                    os.link(Path(root) / name, target / rel / name)
                except FileNotFoundError:
                    raise
                except OSError:  # another file system
                    shutil.copy2(Path(root) / name, target / rel / name)
            except FileNotFoundError:
                continue  # purged meanwhile: its ticket was due for deletion
            count += 1
    return count
