"""Alembic, run programmatically: the migrations ship inside the package."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

log = logging.getLogger("onetoken.db")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Percent signs in passwords would otherwise be read as interpolation.
    cfg.set_main_option(
        "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    cfg.attributes["engine"] = engine
    return cfg


def current(engine: Engine) -> tuple[str, ...]:
    with engine.connect() as conn:
        return tuple(sorted(MigrationContext.configure(conn).get_current_heads()))


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Upgrade to every head: each domain's tables are their own migration branch off
    0001, so domains can grow their schemas independently."""
    before = current(engine)
    command.upgrade(alembic_config(engine), revision)
    after = current(engine)
    if after != before:
        log.info("db.migrated", extra={"version": ",".join(after)})


@dataclass(frozen=True)
class SchemaState:
    """Where the control DB's schema stands against this release's migrations."""

    #: The revisions the DB is at (empty: never migrated).
    current: tuple[str, ...]
    #: This release's heads.
    expected: tuple[str, ...]
    #: "current", "empty" (no schema), "behind" (this release's migrations pending), or
    #: "ahead" (a revision this release does not know: a newer release migrated it).
    kind: str

    def describe(self) -> str:
        want = ",".join(self.expected)
        if self.kind == "empty":
            return f"the control database has no schema yet; this release needs {want}"
        at = ",".join(self.current)
        if self.kind == "ahead":
            return f"the control database is at {at}, newer than this release ({want})"
        return f"the control database is at {at}; this release needs {want}"


def schema_state(engine: Engine) -> SchemaState:
    """Compare the DB with this release's heads, without changing either."""
    script = ScriptDirectory.from_config(alembic_config(engine))
    expected = tuple(sorted(script.get_heads()))
    now = current(engine)
    known = {rev.revision for rev in script.walk_revisions()}
    if now == expected:
        kind = "current"
    elif not now:
        kind = "empty"
    elif not set(now) <= known:
        kind = "ahead"
    else:
        kind = "behind"
    return SchemaState(now, expected, kind)
