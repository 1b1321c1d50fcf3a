"""Engine and session factory for the control database."""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from onetoken.db.base import ConfigRevision
from onetoken.kit.errors import NotFound
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


def config_changed(session: Session, log: logging.Logger, event: str, **ids: Any) -> None:
    """After a change the engine must see: its config marked stale, the change flushed,
    and the log line `event` with `ids` (identifiers only, never content)."""
    bump_revision(session)
    session.flush()
    log.info(event, extra=ids)


def current_revision(session: Session) -> int:
    value = session.scalar(select(ConfigRevision.revision).where(ConfigRevision.id == 1))
    return int(value or 0)


class _OrgScoped(Protocol):
    @property
    def org_id(self) -> str | None: ...


_Row = TypeVar("_Row", bound=_OrgScoped)


def get_scoped(
    session: Session,
    model: type[_Row],
    row_id: str,
    orgs: Container[str | None] | None,
    missing: str,
) -> _Row:
    """The row `row_id` of `model` if its org is one of `orgs` (None: any org's, the
    operator's view), else NotFound(`missing`): a row of another org cannot be told from
    one that does not exist."""
    row = session.get(model, row_id)
    if row is None or (orgs is not None and row.org_id not in orgs):
        raise NotFound(missing)
    return row


def list_in_org(session: Session, model: type[_Row], org_id: str) -> Sequence[_Row]:
    """The org's rows of `model`, oldest first."""
    table: Any = model  # the mapped class: its columns, not a row's values
    return session.scalars(
        select(model).where(table.org_id == org_id).order_by(table.created_at, table.id)
    ).all()


def scoped_loader(
    model: type[_Row], missing: str, *, with_platform: bool = False
) -> Callable[[Session, str | None, str], _Row]:
    """`load(session, org_id, row_id)`: the row of exactly that scope (an org's, or with
    None the platform's); `with_platform`: an org's own or the platform's, what it sees."""

    def load(session: Session, org_id: str | None, row_id: str) -> _Row:
        orgs = (org_id, None) if with_platform else (org_id,)
        return get_scoped(session, model, row_id, orgs, missing)

    return load
