"""What `onetoken restore` refuses before it writes anything (another master secret, a
backup from a newer release), and what `onetoken backup` leaves to the engines' own tools
(a PostgreSQL control DB, a ClickHouse server)."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import pytest
from pydantic import SecretStr

from onetoken.backup import restore as restore_mod
from onetoken.backup.snapshot import BackupError, Manifest, check_embedded, copy_control_db
from onetoken.kit.sealed import EncryptingWriter, derive_key, new_header
from onetoken.settings import Settings
from tests.support import TEST_SECRET

OTHER_SECRET = "another-master-secret-0123456789abcdefXYZ"


def _manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = {
        "format": 1, "created_at": "2026-12-07T00:00:00+00:00", "secret_source": "data_dir",
        "databases": ["onetoken"], "clickhouse_migrations": [1, 2, 3],
        "call_log_rows": 0, "security_log_rows": 0, "ticket_files": 0,
    }
    return Manifest(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_backup_under_another_master_secret_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    header = new_header("master", OTHER_SECRET.encode())
    sealed = io.BytesIO()
    writer = EncryptingWriter(sealed, header, derive_key(header, master=OTHER_SECRET.encode(),
                                                         key_file=None))
    writer.close()
    source = tmp_path / "old.backup"
    source.write_bytes(sealed.getvalue())
    data_dir = tmp_path / "new"
    settings = Settings(data_dir=data_dir, secret_key=SecretStr(TEST_SECRET))
    with pytest.raises(BackupError, match="another master secret"):
        restore_mod.restore(settings, source, master=TEST_SECRET.encode(), key_file=None,
                            install_secret=None, force=False)
    assert not data_dir.exists()


def test_a_backup_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "control.db")
    db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    db.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    db.commit()
    db.close()
    with pytest.raises(BackupError, match="newer release"):
        restore_mod._check_versions(tmp_path, _manifest())


def test_a_clickhouse_schema_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "control.db").close()
    with pytest.raises(BackupError, match="ClickHouse schema"):
        restore_mod._check_versions(tmp_path, _manifest(clickhouse_migrations=[1, 999]))


@pytest.mark.parametrize(
    ("env", "tool"),
    [
        ({"database_url": "postgresql+psycopg://u:p@db/onetoken"}, "pg_dump"),
        ({"clickhouse_dsn": "http://u:p@clickhouse:8123/onetoken"}, "clickhouse-backup"),
    ],
)
def test_stores_at_scale_are_left_to_their_own_tools(
    tmp_path: Path, env: dict[str, str], tool: str
) -> None:
    settings = Settings(data_dir=tmp_path, secret_key=SecretStr(TEST_SECRET), **env)
    with pytest.raises(BackupError, match=tool):
        check_embedded(settings)


def test_the_control_db_copy_leaves_erased_rows_behind(tmp_path: Path) -> None:
    """A page copy would carry the erased row's bytes in a free page; the backup's copy
    holds live rows only."""
    planted = b"backup-erased-row-5a7d0c3e19"
    original = tmp_path / "control.db"
    db = sqlite3.connect(original, isolation_level=None)
    # As SQLite builds without SECURE_DELETE leave them (Debian's has it on).
    db.execute("PRAGMA secure_delete = OFF")
    db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT)")
    # Between live rows, so that its page stays in use and keeps the deleted cell's bytes.
    emails = [f"kept-{i}@example.com" for i in range(100)] + [planted.decode()] + [
        f"kept-{i}@example.com" for i in range(100, 200)]
    db.executemany("INSERT INTO accounts (email) VALUES (?)", [(e,) for e in emails])
    db.execute("DELETE FROM accounts WHERE email = ?", (planted.decode(),))
    db.close()
    assert planted in original.read_bytes()  # still there, in a free page
    copy = tmp_path / "copy.db"
    copy_control_db(original, copy)
    assert planted not in copy.read_bytes()
    assert b"kept-199@example.com" in copy.read_bytes()
