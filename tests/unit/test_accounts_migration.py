"""0002_accounts on a database that already holds accounts, keys and sessions (SQLite
rebuilds the accounts table that other tables reference)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from onetoken.db.migrate import upgrade
from tests.builders import database_at


def test_upgrade_keeps_existing_rows(tmp_path: Path) -> None:
    now = "2026-01-01 00:00:00+00:00"
    engine = database_at(f"sqlite:///{tmp_path / 'c.db'}", "0001", now)
    with engine.begin() as c:
        c.execute(text("INSERT INTO orgs VALUES ('org_2', 'Second', 'active', '2026-02-01')"))
        for acc, org, email, role in (("acc_1", "org_1", "boss@one.test", "owner"),
                                      ("acc_2", "org_1", "dev@one.test", "developer"),
                                      ("acc_3", "org_2", "boss@two.test", "owner")):
            c.execute(text("INSERT INTO accounts VALUES (:a, :o, :e, 'h', :r, 'active', :t)"),
                      {"a": acc, "o": org, "e": email, "r": role, "t": now})
        c.execute(text(
            "INSERT INTO api_keys (id, org_id, created_by, hash, display, name, status, "
            "created_at) VALUES ('key_1', 'org_1', 'acc_2', 'h1', 'ot-…', 'k', 'active', :t)"
        ), {"t": now})
        c.execute(text(
            "INSERT INTO admin_sessions VALUES ('ses_1', 'acc_1', 'th', :t, :t)"), {"t": now})
    upgrade(engine)
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT id, login_name, email, auth_status, is_operator FROM accounts ORDER BY id"
        )).all()
        assert [tuple(r) for r in rows] == [
            ("acc_1", "boss@one.test", "boss@one.test", "password", 1),
            ("acc_2", "dev@one.test", "dev@one.test", "password", 0),
            ("acc_3", "boss@two.test", "boss@two.test", "password", 0),
        ]
        key = c.execute(text("SELECT owner_id, secret_version FROM api_keys")).one()
        assert tuple(key) == ("acc_2", 1)
        assert c.execute(text("SELECT count(*) FROM admin_sessions")).scalar() == 1
        assert c.execute(text("PRAGMA foreign_key_check")).all() == []
    engine.dispose()
