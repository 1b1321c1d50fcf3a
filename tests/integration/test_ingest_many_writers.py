"""Many `onetoken ingest` processes against one PostgreSQL ledger, as at scale (one per
gateway machine, each on its own spool dir), one of them SIGKILLed mid-run and restarted,
and two on the same spool dir, where the cursors' compare-and-set makes one lose.

What this covers is the ledger path. The call_log consumer points at a ClickHouse server
that refuses connections (the outage ingestion is built to ride out: only the call_log
cursor waits), since `onetoken ingest` takes a ClickHouse server and none runs here;
call_log's own idempotency is tested against chDB in tests/unit/test_ingest.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

import onetoken.registry  # noqa: F401  (every table mapped)
from onetoken.billing import packages
from onetoken.billing import service as billing
from onetoken.billing.models import LedgerEntry
from onetoken.db.migrate import upgrade
from onetoken.db.session import make_engine, make_session_factory
from onetoken.ingest.journal import segment_name
from onetoken.ingest.models import IngestCursor, IngestMark
from onetoken.orgs import service as orgs
from tests.support import TEST_SECRET, free_port, wait_until
from tests.unit.journal_files import append, dead, record

POSTGRES_URL = os.environ.get("ONETOKEN_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="ONETOKEN_TEST_POSTGRES_URL not set")

DAY_US = 86_400 * 1_000_000
NOON_US = int(datetime.now(UTC).replace(hour=12).timestamp()) * 1_000_000
SEGMENTS = 3
RECORDS_PER_SEGMENT = 150
# Small batches: many ledger transactions per process, so a kill lands inside one.
BATCH_ROWS = 25


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A database of its own, migrated once: ingest processes connect to it by URL."""
    assert POSTGRES_URL
    name = f"onetoken_ingest_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def engine(database: str) -> Iterator[Engine]:
    e = make_engine(database)
    yield e
    e.dispose()


@dataclass
class Journals:
    """What the journals hold: the truth the ledger must end up with."""

    # (org, day) -> (cost, charged calls)
    per_day: dict[tuple[str, int], tuple[int, int]]
    # instance -> org -> cost
    per_instance: dict[str, dict[str, int]]
    # instance -> the ledger cursor once read to the end (past its last segment)
    ends: dict[str, tuple[int, int]]


def make_orgs(engine: Engine, tag: str) -> list[str]:
    """Three orgs, two of them with packages, so allocations from different processes
    meet on the same package rows."""
    session_factory = make_session_factory(engine)
    ids = []
    with session_factory() as s:
        for i in range(3):
            org = orgs.create_org(s, f"{tag}-{i}")
            billing.credit(s, org.id, amount=10**15, kind="grant", idempotency_key=f"{tag}{i}")
            if i < 2:
                for p in range(2):
                    packages.grant_package(
                        s,
                        org.id,
                        credit=10**9,
                        validity_days=30 + p,
                        idempotency_key=f"{tag}{i}pkg{p}",
                        now=datetime.fromtimestamp((NOON_US - 2 * DAY_US) / 1e6, UTC),
                    )
            ids.append(org.id)
        s.commit()
    return ids


def write_journals(spool: Path, instances: list[str], org_ids: list[str], seed: int) -> Journals:
    rng = random.Random(seed)  # noqa: S311  (reproducible journals, not secrets)
    per_day: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    per_instance: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    ends = {}
    n = 0
    for instance in instances:
        for seg in range(1, SEGMENTS + 1):
            rows = []
            for _ in range(RECORDS_PER_SEGMENT):
                n += 1
                org = rng.choice(org_ids)
                cost = rng.choice((0, rng.randrange(1, 10**6)))
                ts = NOON_US - rng.choice((0, DAY_US)) + rng.randrange(10**6)
                rows.append(
                    record(
                        f"{instance}-{n}",
                        org_id=org,
                        cost=cost,
                        ts_us=ts,
                        key_id=f"key{rng.randrange(3)}",
                        model=rng.choice(("m1", "m2")),
                    )
                )
                if cost:
                    day = ts // DAY_US
                    per_day[(org, day)][0] += cost
                    per_day[(org, day)][1] += 1
                    per_instance[instance][org] += cost
            append(spool, instance, seg, rows)
        dead(spool, instance)
        ends[instance] = (SEGMENTS + 1, 0)
    return Journals(
        {k: (v[0], v[1]) for k, v in per_day.items()},
        {i: dict(v) for i, v in per_instance.items()},
        ends,
    )


def start_ingest(data_dir: Path, database: str, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ONETOKEN_DATA_DIR": str(data_dir),
        "ONETOKEN_DATABASE_URL": database,
        "ONETOKEN_SECRET_KEY": TEST_SECRET,
        # A ClickHouse server that refuses connections: the ledger path only (module doc).
        "ONETOKEN_CLICKHOUSE_DSN": f"http://default:@127.0.0.1:{free_port()}/onetoken",
        "ONETOKEN_FLUSH_INTERVAL_MS": "50",
        "ONETOKEN_FLUSH_MAX_ROWS": str(BATCH_ROWS),
    }
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.out").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "onetoken", "ingest"], env=env, stdout=out, stderr=out
        )


def ledger_cursors(engine: Engine, instances: list[str]) -> dict[str, tuple[int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(IngestCursor.instance_id, IngestCursor.segment, IngestCursor.offset).where(
                IngestCursor.consumer == "ledger", IngestCursor.instance_id.in_(instances)
            )
        ).all()
    return {str(i): (int(s), int(o)) for i, s, o in rows}


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (catch up, then exit 0) to all at once: they stop in parallel."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=60) for proc in procs] == [0] * len(procs)


def assert_ledger_matches(engine: Engine, org_ids: list[str], truth: Journals) -> None:
    day = func.floor(func.extract("epoch", LedgerEntry.created_at) / 86_400)
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                LedgerEntry.org_id, day, func.sum(LedgerEntry.amount), func.sum(LedgerEntry.calls)
            )
            .where(LedgerEntry.kind == "usage", LedgerEntry.org_id.in_(org_ids))
            .group_by(LedgerEntry.org_id, day)
        ).all()
        keys = conn.execute(
            select(func.count(), func.count(LedgerEntry.idempotency_key.distinct())).where(
                LedgerEntry.org_id.in_(org_ids)
            )
        ).one()
        marks = conn.execute(
            select(IngestMark.instance_id, IngestMark.subject_id, IngestMark.amount).where(
                IngestMark.scope == "org", IngestMark.instance_id.in_(list(truth.ends))
            )
        ).all()
    got = {(str(o), int(d)): (-int(a), int(c)) for o, d, a, c in rows}
    assert got == truth.per_day
    assert keys[0] == keys[1]
    got_marks: dict[str, dict[str, int]] = defaultdict(dict)
    for instance, org, amount in marks:
        got_marks[str(instance)][str(org)] = int(amount)
    assert got_marks == truth.per_instance


def test_many_ingest_processes_one_killed_charge_every_record_once(
    tmp_path: Path, engine: Engine, database: str
) -> None:
    """Three nodes, each with its own spool dir and ingest process; a fourth process on
    node 0's spool dir too (the compare-and-set race); node 1's process is SIGKILLed part
    way and restarted. One test, so the processes start in one wave."""
    org_ids = make_orgs(engine, "many")
    dirs = [tmp_path / f"node{n}" for n in range(3)]
    instances = {d: [f"n{n}i{j}" for j in range(3)] for n, d in enumerate(dirs)}
    truths = [
        write_journals(d / "spool", instances[d], org_ids, seed=n) for n, d in enumerate(dirs)
    ]
    every = [i for d in dirs for i in instances[d]]
    truth = Journals(
        {},
        {i: v for t in truths for i, v in t.per_instance.items()},
        {i: v for t in truths for i, v in t.ends.items()},
    )
    for t in truths:
        for k, (cost, calls) in t.per_day.items():
            before = truth.per_day.get(k, (0, 0))
            truth.per_day[k] = (before[0] + cost, before[1] + calls)

    procs = [start_ingest(d, database, "first") for d in dirs]
    procs.append(start_ingest(dirs[0], database, "second"))
    victim = instances[dirs[1]]

    def victim_busy() -> bool:
        # Some of its ledger batches committed and some are left: it is mid-run.
        at = ledger_cursors(engine, victim)
        return bool(at) and at != {i: truth.ends[i] for i in victim}

    wait_until(victim_busy, timeout=60, interval=0.01, message="the victim ingesting")
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=10)
    assert ledger_cursors(engine, victim) != {i: truth.ends[i] for i in victim}
    procs[1] = start_ingest(dirs[1], database, "restarted")

    wait_until(
        lambda: ledger_cursors(engine, every) == truth.ends,
        timeout=90,
        message="every ledger cursor at its journal's end",
    )
    stop(procs)
    assert_ledger_matches(engine, org_ids, truth)
    assert ledger_cursors(engine, every) == truth.ends
    for d in dirs:
        # A ClickHouse outage keeps the journals (call_log has not read them).
        assert (d / "spool" / segment_name(instances[d][0], 1)).exists()
    # No round failed: on the shared spool dir the loser of each race gave up the batch
    # cleanly, and allocations to the same packages queued instead of deadlocking.
    out = [p.read_text() for d in dirs for p in (d / "logs").glob("*.out")]
    assert len(out) == 5
    assert not any("ingest.failed" in o for o in out), out
