"""`onetoken backup OUT` and `onetoken restore IN`: the embedded default's stores (control
DB, chDB, ticket attachments) in one encrypted file, taken while serving
(onetoken.backup; docs/operations.md, "Backup and restore")."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from onetoken.cli.common import EXIT_OK, CliError, settings_from_env


def _key_file(path: str | None) -> bytes | None:
    from onetoken.kit.sealed import BackupFileError, read_key_file

    if path is None:
        return None
    try:
        return read_key_file(Path(path).read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read the key file: {exc.strerror or exc}") from None
    except BackupFileError as exc:
        raise CliError(str(exc)) from None


def cmd_backup(args: argparse.Namespace) -> int:
    import secrets

    from onetoken.analytics.clickhouse import (
        AnalyticsError,
        ChdbLockedError,
        chdb_locked_elsewhere,
        open_client,
    )
    from onetoken.backup.archive import write_backup
    from onetoken.backup.snapshot import (
        MANIFEST,
        BackupError,
        Manifest,
        audited,
        check_embedded,
        staging_dir,
        take,
    )
    from onetoken.cli.ops_client import OpsClient, OpsError
    from onetoken.kit.sealed import derive_key, new_header
    from onetoken.security import log as security_log
    from onetoken.settings import SECRET_KEY_FILE

    settings = settings_from_env()
    out = Path(args.out)
    if out.exists():
        raise CliError(f"{out} exists: a backup never overwrites a file")
    if not out.parent.is_dir():
        raise CliError(f"{out.parent} is not a directory")
    try:
        check_embedded(settings)
    except BackupError as exc:
        raise CliError(str(exc)) from None
    if settings.secret_key is None and not (settings.data_dir / SECRET_KEY_FILE).exists():
        raise CliError(f"{settings.data_dir} has no master secret: nothing to back up there")
    key_file = _key_file(args.key_file)
    master = settings.secret_key_bytes()
    header = new_header("key-file" if key_file is not None else "master", master)
    key = derive_key(header, master=master, key_file=key_file)
    name = secrets.token_hex(16)
    staging = staging_dir(settings, name)
    try:
        locked = chdb_locked_elsewhere(settings)
        if locked is not None:
            with OpsClient(settings, locked) as ops:
                ops.backup(name)
        else:
            try:
                client = open_client(settings, migrate=False)
            except ChdbLockedError:
                raise CliError("a server started meanwhile: run onetoken backup again") from None
            except AnalyticsError as exc:
                raise CliError(f"cannot open ClickHouse: {exc}") from None
            try:
                manifest = take(settings, client, staging)
            finally:
                client.close()
            # To the spool: the server writes it to the security log at its next start.
            security_log.install(security_log.SecurityLog(settings.spool_dir))
            audited("backup.taken", manifest, serving=False)
        written = Manifest.read(staging / MANIFEST)
        size = write_backup(staging, out, header, key)
    except (BackupError, OpsError) as exc:
        raise CliError(str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"backup written to {out} ({size} bytes, encrypted): {written.call_log_rows} "
          f"call_log row(s), {written.security_log_rows} security event(s), "
          f"{written.ticket_files} ticket file(s)")
    _remind(settings.data_dir / SECRET_KEY_FILE, settings.secret_key is None,
            key_file is not None)
    return EXIT_OK


def _remind(secret_file: Path, generated: bool, with_key_file: bool) -> None:
    if generated:
        print(
            f"the master secret is {secret_file} and is not in the backup: keep a copy of it "
            "apart from the backup; `onetoken restore` needs it (--secret-file)",
            file=sys.stderr,
        )
    else:
        print(
            "the master secret (ONETOKEN_SECRET_KEY) is not in the backup: a restore runs "
            "with the same one",
            file=sys.stderr,
        )
    if with_key_file:
        print("keep the key file apart from the backup: without it nothing opens it",
              file=sys.stderr)


def _master_for_restore(settings: Any, secret_file: str | None) -> tuple[bytes, bytes | None]:
    """(the master secret the restored service will run with, the secret to write as the
    data dir's secret.key or None). Never a new one: that would orphan every key hash."""
    from onetoken.settings import MIN_SECRET_KEY_LEN, SECRET_KEY_FILE

    if settings.secret_key is not None:
        if secret_file is not None:
            raise CliError("ONETOKEN_SECRET_KEY is set: --secret-file would not be used")
        return settings.secret_key.get_secret_value().encode(), None
    if secret_file is not None:
        try:
            secret = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise CliError(f"cannot read the secret file: {exc.strerror or exc}") from None
        if len(secret) < MIN_SECRET_KEY_LEN:
            raise CliError(f"the secret file holds fewer than {MIN_SECRET_KEY_LEN} characters")
        return secret, secret
    existing = settings.data_dir / SECRET_KEY_FILE
    if existing.exists():
        return existing.read_bytes().strip(), None
    raise CliError(
        "a restore needs the master secret the backup was made with: set "
        "ONETOKEN_SECRET_KEY, or give a copy of the old data dir's secret.key with --secret-file"
    )


def cmd_restore(args: argparse.Namespace) -> int:
    from onetoken.analytics.clickhouse import AnalyticsError
    from onetoken.backup.restore import restore
    from onetoken.backup.snapshot import SECRET_FROM_ENVIRONMENT, BackupError, audited
    from onetoken.kit.sealed import BackupFileError
    from onetoken.security import log as security_log

    settings = settings_from_env()
    source = Path(args.file)
    if not source.is_file():
        raise CliError(f"{source} is not a file")
    master, install = _master_for_restore(settings, args.secret_file)
    try:
        manifest = restore(settings, source, master=master, key_file=_key_file(args.key_file),
                           install_secret=install, force=args.force)
    except (BackupError, BackupFileError) as exc:
        raise CliError(str(exc)) from None
    except AnalyticsError as exc:
        raise CliError(f"cannot restore ClickHouse: {exc}") from None
    # In the restored data dir's spool: its server writes it to the security log at start.
    security_log.install(security_log.SecurityLog(settings.spool_dir))
    audited("backup.restored", manifest, serving=False)
    print(f"restored into {settings.data_dir}: backup of {manifest.created_at}, "
          f"{manifest.call_log_rows} call_log row(s), {manifest.security_log_rows} security "
          f"event(s), {manifest.ticket_files} ticket file(s)")
    if manifest.secret_source == SECRET_FROM_ENVIRONMENT:
        print("start the server with the same ONETOKEN_SECRET_KEY", file=sys.stderr)
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser(
        "backup",
        help="write the embedded stores (control DB, chDB, ticket files) to one encrypted "
        "file; works while serving",
    )
    p.add_argument("out", metavar="OUT", help="the backup file to create")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="encrypt with the key (or passphrase) in FILE instead of one derived "
                   "from the master secret")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "restore",
        help="restore a backup into an empty data dir (ONETOKEN_DATA_DIR), then serve it",
    )
    p.add_argument("file", metavar="IN", help="the backup file")
    p.add_argument("--key-file", default=None, metavar="FILE",
                   help="the key file the backup was made with, if any")
    p.add_argument("--secret-file", default=None, metavar="FILE",
                   help="a copy of the old data dir's secret.key (when ONETOKEN_SECRET_KEY "
                   "was not set); written into the new data dir")
    p.add_argument("--force", action="store_true",
                   help="replace the stores of a non-empty (stopped) data dir")
    p.set_defaults(func=cmd_restore)
