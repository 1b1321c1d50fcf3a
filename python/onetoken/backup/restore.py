"""A backup file into an empty data dir (or, with force, over the stores of a stopped
one), ready for `onetoken serve`."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from sqlalchemy import delete
from sqlalchemy.orm import Session

from onetoken.analytics.clickhouse import (
    backup_root,
    chdb_lock_holder,
    load_migrations,
    open_client,
    sql_string,
)
from onetoken.backup.archive import unpack
from onetoken.backup.snapshot import (
    CLICKHOUSE,
    CONTROL_DB,
    MANIFEST,
    TICKETS,
    BackupError,
    Manifest,
    check_embedded,
)
from onetoken.db.migrate import schema_state
from onetoken.db.session import make_engine
from onetoken.ingest.models import IngestCursor, IngestMark, IngestRetired
from onetoken.kit.files import PRIVATE_FILE_MODE, private_dir
from onetoken.kit.sealed import derive_key, fingerprints_match, read_header
from onetoken.ops import control_file
from onetoken.settings import SECRET_KEY_FILE, Settings


def restore(
    settings: Settings,
    source: Path,
    *,
    master: bytes,
    key_file: bytes | None,
    install_secret: bytes | None,
    force: bool,
) -> Manifest:
    """Restore `source` into settings.data_dir. `master` is the master secret the restored
    service will run with (checked against the backup's before anything is written);
    `install_secret`, when given, is written as the data dir's secret.key."""
    database, chdb_path = check_embedded(settings)
    data_dir = settings.data_dir
    if control_file.read(data_dir) is not None or chdb_lock_holder(chdb_path)[0]:
        raise BackupError(f"a onetoken server is running on {data_dir}: stop it first")
    if data_dir.exists() and any(data_dir.iterdir()) and not force:
        raise BackupError(
            f"{data_dir} is not empty: restore into an empty data dir, or pass --force to "
            "replace its stores"
        )
    existing = data_dir / SECRET_KEY_FILE
    if install_secret is not None and existing.exists():
        if existing.read_bytes().strip() != install_secret:
            raise BackupError(f"{existing} holds another master secret than --secret-file")
        install_secret = None
    with open(source, "rb") as handle:
        header = read_header(handle)
        if not fingerprints_match(header, master):
            raise BackupError(
                "this backup was made under another master secret: with this one the "
                "restored API keys would not verify and provider credentials would not "
                "decrypt (give the old data dir's secret.key with --secret-file, or its "
                "ONETOKEN_SECRET_KEY)"
            )
        key = derive_key(header, master=master, key_file=key_file)
        private_dir(data_dir)
        staging = backup_root(data_dir) / secrets.token_hex(16)
        private_dir(staging)
        try:
            unpack(handle, header, key, staging)
            manifest = Manifest.read(staging / MANIFEST)
            _check_versions(staging, manifest)
            try:
                if force:
                    _clear_stores(settings, database, chdb_path)
                _place(settings, staging, database, manifest)
                if install_secret is not None:
                    _install_secret(data_dir / SECRET_KEY_FILE, install_secret)
            except Exception as exc:
                # The class only: an engine's message may quote what it was restoring.
                raise BackupError(
                    f"the restore failed half-way ({type(exc).__name__}): {data_dir} holds "
                    "part of the backup; run onetoken restore again with --force"
                ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _check_versions(staging: Path, manifest: Manifest) -> None:
    """Refuse a backup from a newer release: this one could not run on its schemas."""
    engine = make_engine(f"sqlite:///{staging / CONTROL_DB}")
    try:
        state = schema_state(engine)
    finally:
        engine.dispose()
    if state.kind == "ahead":
        raise BackupError(f"the backup is from a newer release: {state.describe()}")
    known = {m.version for m in load_migrations()}
    if not set(manifest.clickhouse_migrations) <= known:
        raise BackupError("the backup's ClickHouse schema is from a newer release")


def _clear_stores(settings: Settings, database: Path, chdb_path: Path) -> None:
    """--force: the old stores go. The spool goes too: its journals belong to the replaced
    ledger, and ingesting them into the restored one would charge calls it never had."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{database}{suffix}").unlink()
    for tree in (chdb_path, settings.ticket_store_dir, settings.spool_dir):
        shutil.rmtree(tree, ignore_errors=True)


def _place(settings: Settings, staging: Path, database: Path, manifest: Manifest) -> None:
    private_dir(database.parent)
    os.replace(staging / CONTROL_DB, database)
    _forget_journals(database)
    if (staging / TICKETS).is_dir():
        private_dir(settings.ticket_store_dir.parent)
        os.replace(staging / TICKETS, settings.ticket_store_dir)
    if not manifest.databases:
        return
    client = open_client(settings, migrate=False)
    try:
        listed = ", ".join(f"DATABASE {d}" for d in manifest.databases)
        client.command(f"RESTORE {listed} FROM File({sql_string(str(staging / CLICKHOUSE))})")
    finally:
        client.close()


def _forget_journals(database: Path) -> None:
    """The ingestion cursors and spent marks name the old gateways' journals, which a
    backup does not hold (docs/operations.md): the restored service starts new ones."""
    engine = make_engine(f"sqlite:///{database}")
    try:
        with Session(engine) as session:
            for model in (IngestCursor, IngestMark, IngestRetired):
                session.execute(delete(model))
            session.commit()
    finally:
        engine.dispose()


def _install_secret(path: Path, secret: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
