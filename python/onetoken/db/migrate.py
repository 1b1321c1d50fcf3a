"""Alembic, run programmatically: the migrations ship inside the package."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
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
