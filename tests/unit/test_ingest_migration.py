"""0011_ingest on a ledger that already holds per-request usage entries: each counts one
call, other entries none, so invoices that now sum `calls` read the same as before."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from onetoken.db.migrate import upgrade
from tests.builders import database_at


def test_existing_usage_entries_count_one_call_each(tmp_path: Path) -> None:
    now = "2026-01-01 00:00:00.000000"
    engine = database_at(f"sqlite:///{tmp_path / 'c.db'}", "0010_key_scope_setter", now)
    with engine.begin() as c:
        for key, kind, amount, rid in (
            ("usage:r1", "usage", -5, "r1"),
            ("usage:r2", "usage", -7, "r2"),
            ("credit:org_1:g", "grant", 100, None),
        ):
            c.execute(
                text(
                    "INSERT INTO ledger_entries (org_id, kind, amount, idempotency_key, "
                    "request_id, created_at) VALUES ('org_1', :k, :a, :i, :r, :t)"
                ),
                {"k": kind, "a": amount, "i": key, "r": rid, "t": now},
            )
    upgrade(engine)
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT idempotency_key, calls FROM ledger_entries ORDER BY idempotency_key")
        ).all()
        assert [tuple(r) for r in rows] == [("credit:org_1:g", 0), ("usage:r1", 1), ("usage:r2", 1)]
        assert c.execute(text("SELECT count(*) FROM ingest_cursors")).scalar() == 0
        assert c.execute(text("SELECT count(*) FROM ingest_marks")).scalar() == 0
    engine.dispose()
