"""The control DB's schema against this release's migrations, read without changing it
(what `onetoken ingest` waits on: docs/deploy.md, "Upgrades and migrations")."""

from __future__ import annotations

from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import text

from onetoken.db.migrate import alembic_config, schema_state, upgrade
from onetoken.db.session import make_engine


def test_schema_state_tells_empty_behind_current_and_ahead(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    script = ScriptDirectory.from_config(alembic_config(engine))
    (head,) = script.get_heads()
    previous = script.get_revision(head).down_revision
    assert isinstance(previous, str)
    try:
        empty = schema_state(engine)
        assert (empty.kind, empty.current, empty.expected) == ("empty", (), (head,))
        with engine.connect() as conn:
            # Reading created nothing, not even alembic's version table.
            assert conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar() == 0
        upgrade(engine, previous)
        behind = schema_state(engine)
        assert (behind.kind, behind.current) == ("behind", (previous,))
        assert behind.describe() == (
            f"the control database is at {previous}; this release needs {head}")
        upgrade(engine)
        assert schema_state(engine).kind == "current"
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'next_release'"))
        ahead = schema_state(engine)
        assert (ahead.kind, ahead.current) == ("ahead", ("next_release",))
        assert f"newer than this release ({head})" in ahead.describe()
    finally:
        engine.dispose()
