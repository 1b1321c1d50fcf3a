"""The embedded default writes usage rows through sqlite3 directly; they must read back
exactly as rows written through the ORM would."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from sqlalchemy.dialects.sqlite import DATETIME

from onetoken.billing.service import sqlite_time, usage_time


def test_sqlite_time_is_what_sqlalchemy_writes() -> None:
    write = DATETIME().bind_processor(None)  # type: ignore[arg-type]
    rng = random.Random(7)  # noqa: S311 - test data, not secrets
    instants = [0, 1, 999_999, 1_000_000, 4_102_444_799_999_999] + [
        rng.randrange(0, 4_102_444_800_000_000) for _ in range(5000)
    ]
    for ts_us in instants:
        assert sqlite_time(ts_us) == write(usage_time(ts_us))


def test_sqlite_time_keeps_the_utc_day() -> None:
    last_micro = int(datetime(2026, 11, 30, 23, 59, 59, 999_999, tzinfo=UTC).timestamp()) * 10**6
    assert sqlite_time(last_micro + 999_999) == "2026-11-30 23:59:59.999999"
    assert sqlite_time(last_micro + 1_000_000) == "2026-12-01 00:00:00.000000"
