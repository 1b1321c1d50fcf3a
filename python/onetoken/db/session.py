"""Engine and session factory for the control database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from onetoken.db.base import ConfigRevision
from onetoken.kit.files import private_file

SessionFactory = sessionmaker[Session]


def make_engine(database_url: str) -> Engine:
    url = database_url
    connect_args: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # FastAPI runs sync endpoints in a thread pool; the pump has its own thread.
        connect_args = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        _private_sqlite_file(engine.url.database)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def _private_sqlite_file(database: str | None) -> None:
    """Create the database file 0600 before SQLite does (with the umask's mode); SQLite
    gives its -wal and -shm files the mode of the database file."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.parent.is_dir():
        private_file(path)


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


def bump_revision(session: Session) -> None:
    """Mark the engine's config stale; committed together with the change itself."""
    res = session.execute(
        update(ConfigRevision)
        .where(ConfigRevision.id == 1)
        .values(revision=ConfigRevision.revision + 1)
    )
    if getattr(res, "rowcount", 1) == 0:
        session.add(ConfigRevision(id=1, revision=1))


def current_revision(session: Session) -> int:
    value = session.scalar(select(ConfigRevision.revision).where(ConfigRevision.id == 1))
    return int(value or 0)
