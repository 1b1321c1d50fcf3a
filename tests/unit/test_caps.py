"""The money cap publisher against a real redis-server: caps = balance + live marks at the
config revision, published when money moves and in full rounds, never overwritten by an
older read, and dead instances retired so that Redis never allows more than the truth."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select

from onetoken.billing import budgets
from onetoken.billing import service as billing
from onetoken.control import start_background
from onetoken.db.session import current_revision
from onetoken.ingest import caps
from onetoken.ingest.caps import CapPublisher, read_caps, read_plan
from onetoken.ingest.ingestor import Ingestor
from onetoken.ingest.marks import spent_marks
from onetoken.ingest.models import IngestCursor, IngestRetired
from onetoken.orgs import service as orgs
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.support import RedisServer, wait_until
from tests.unit.journal_files import AcceptingSink, append, dead, live, record

BALANCE = 10_000
NOW_US = int(datetime.now(UTC).replace(hour=12).timestamp()) * 1_000_000


@pytest.fixture
def publisher(
    settings: Settings, state: AppState, redis_server: RedisServer
) -> Iterator[CapPublisher]:
    settings.redis_url = SecretStr(redis_server.url)
    settings.cap_publish_interval_seconds = 0.2
    pub = CapPublisher(settings, state.session_factory)
    yield pub
    pub.stop()


@pytest.fixture
def api(client: TestClient) -> TestClient:
    return client


@pytest.fixture
def org_id(state: AppState) -> str:
    with state.session_factory() as s:
        org = orgs.create_org(s, "A")
        billing.credit(s, org.id, amount=BALANCE, kind="grant", idempotency_key="g")
        s.commit()
        return org.id


def cap(redis_db: redis.Redis, org_id: str) -> tuple[int, int] | None:
    """(cap, revision) in Redis, or None when unpublished."""
    got = redis_db.hgetall(caps.cap_key("ot:", org_id))
    return (int(got["cap"]), int(got["rev"])) if got else None


def holds(redis_db: redis.Redis, org_id: str) -> dict[str, int]:
    return {k: int(v) for k, v in redis_db.hgetall(caps.hold_key("ot:", org_id)).items()}


def revision(state: AppState) -> int:
    with state.session_factory() as s:
        return current_revision(s)


def test_a_full_round_publishes_balance_plus_the_marks_of_live_instances(
    state: AppState, publisher: CapPublisher, redis_db: redis.Redis, org_id: str, settings: Settings
) -> None:
    with state.session_factory() as s:
        other = orgs.create_org(s, "B").id
        s.commit()
    append(settings.spool_dir, "i1", 1, [record("r1", org_id=org_id, cost=300, ts_us=NOW_US)])
    ingestor = Ingestor(settings, state.session_factory, sink=AcceptingSink())  # type: ignore[arg-type]
    with live(settings.spool_dir, "i1"):
        ingestor.catch_up()
    publisher.publish_all()
    # 10 000 credited - 300 ingested + 300 marked: what the gateways may hold together.
    assert cap(redis_db, org_id) == (BALANCE, revision(state))
    assert cap(redis_db, other) == (0, revision(state))


def test_a_balance_beyond_the_leases_exact_range_is_published_as_its_largest_cap(
    state: AppState, publisher: CapPublisher, redis_db: redis.Redis, org_id: str
) -> None:
    # 100 million currency units is 10^17 nano-units, past 2^53: the grow script would
    # grant nothing against it, and the org would be refused with money in the bank.
    with state.session_factory() as s:
        billing.credit(s, org_id, amount=10**17, kind="grant", idempotency_key="big")
        s.commit()
    publisher.publish_all()
    assert cap(redis_db, org_id)[0] == caps.LEASE_EXACT_MAX == 2**53 - 1


def test_ingestion_moves_neither_the_cap_nor_its_revision(
    state: AppState, publisher: CapPublisher, redis_db: redis.Redis, org_id: str, settings: Settings
) -> None:
    publisher.start()
    before = wait_until(lambda: cap(redis_db, org_id), message="first full round")
    ingestor = Ingestor(settings, state.session_factory, sink=AcceptingSink())  # type: ignore[arg-type]
    rows = [record(f"r{i}", org_id=org_id, cost=100 + i, ts_us=NOW_US) for i in range(5)]
    append(settings.spool_dir, "i1", 1, rows)
    with live(settings.spool_dir, "i1"):
        assert ingestor.catch_up() == 5
    with state.session_factory() as s:
        assert billing.balance(s, org_id) == BALANCE - sum(100 + i for i in range(5))
        assert read_caps(s, [org_id]) == (before[1], {org_id: before[0]})
    publisher.publish_all()
    assert cap(redis_db, org_id) == before


def test_money_moved_in_or_out_is_published_after_its_commit(
    state: AppState, publisher: CapPublisher, redis_db: redis.Redis, org_id: str
) -> None:
    # Full rounds every 0.2 s would publish it too: one at start, then only the wake-ups.
    publisher._interval = 3600
    publisher.start()
    wait_until(lambda: cap(redis_db, org_id) is not None, message="first full round")
    with state.session_factory() as s:
        billing.credit(s, org_id, amount=500, kind="recharge", idempotency_key="top-up")
        s.commit()
    wait_until(lambda: cap(redis_db, org_id) == (BALANCE + 500, revision(state)), timeout=5)
    with state.session_factory() as s:
        billing.credit(s, org_id, amount=-700, kind="adjustment", idempotency_key="refund")
        s.commit()
    wait_until(lambda: cap(redis_db, org_id) == (BALANCE - 200, revision(state)), timeout=5)
    assert publisher.failures == 0


def test_a_credit_limit_is_published_after_its_commit(
    state: AppState, publisher: CapPublisher, redis_db: redis.Redis, org_id: str
) -> None:
    """The gateways' leases may take the org's balance below zero by its credit limit
    (a commercial term), and by no more: the cap moves with the limit, either way."""
    publisher._interval = 3600
    publisher.start()
    wait_until(lambda: cap(redis_db, org_id) is not None, message="first full round")
    with state.session_factory() as s:
        budgets.update_org_settings(s, org_id, credit_limit=2_500)
        s.commit()
    wait_until(lambda: cap(redis_db, org_id) == (BALANCE + 2_500, revision(state)), timeout=5)
    with state.session_factory() as s:
        budgets.update_org_settings(s, org_id, credit_limit=0)
        s.commit()
    wait_until(lambda: cap(redis_db, org_id) == (BALANCE, revision(state)), timeout=5)
    assert publisher.failures == 0


def test_a_cap_read_before_a_newer_one_never_overwrites_it(
    state: AppState, publisher: CapPublisher, redis_db: redis.Redis, org_id: str
) -> None:
    with state.session_factory() as s:
        old = read_plan(s)
        billing.credit(s, org_id, amount=-4000, kind="adjustment", idempotency_key="out")
        s.commit()
    with state.session_factory() as s:
        new = read_plan(s)
    assert new.revision > old.revision
    # Two control replicas, the slower one writing last: the refund stays in Redis.
    publisher.write(new)
    publisher.write(old)
    assert cap(redis_db, org_id) == (BALANCE - 4000, new.revision)
    assert publisher.stale_writes == 1
    # The same revision again (the next full round) writes the same cap.
    publisher.write(new)
    assert cap(redis_db, org_id) == (BALANCE - 4000, new.revision)


def test_a_serving_control_process_publishes_and_shows_it_on_healthz(
    state: AppState,
    settings: Settings,
    redis_server: RedisServer,
    redis_db: redis.Redis,
    client: TestClient,
) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}  # no Redis, no field
    with state.session_factory() as s:
        org = orgs.create_org(s, "A").id
        billing.credit(s, org, amount=70, kind="grant", idempotency_key="g")
        s.commit()
    settings.redis_url = SecretStr(redis_server.url)
    ingestor = Ingestor(settings, state.session_factory, sink=AcceptingSink())  # type: ignore[arg-type]
    background = start_background(state, ingestor)
    try:
        wait_until(
            lambda: cap(redis_db, org) == (70, revision(state)), message="published at start"
        )
        assert client.get("/healthz").json() == {"status": "ok", "cap_publisher": "ok"}
    finally:
        background.stop()


def test_a_round_without_orgs_still_notices_redis_down(
    publisher: CapPublisher, redis_server: RedisServer
) -> None:
    publisher.publish_all()
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        publisher.publish_all()


def test_redis_down_fails_rounds_visibly_and_the_next_round_heals_a_restart(
    state: AppState,
    publisher: CapPublisher,
    redis_server: RedisServer,
    org_id: str,
    caplog: pytest.LogCaptureFixture,
    api: TestClient,
) -> None:
    state.caps = publisher
    publisher.start()
    rc = redis.Redis.from_url(redis_server.url, decode_responses=True)
    wait_until(lambda: cap(rc, org_id) is not None, message="first full round")
    rc.close()
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="onetoken.caps"), state.session_factory() as s:
        # The API call commits without waiting for Redis.
        billing.credit(s, org_id, amount=250, kind="grant", idempotency_key="while-down")
        s.commit()
        wait_until(lambda: publisher.failing >= 2, timeout=15, message="failed rounds")
    assert api.get("/healthz").json() == {"status": "ok", "cap_publisher": "failing"}
    shown = {m.name: m.samples[0][2] for m in publisher.metrics()}
    assert shown["onetoken_cap_publisher_failing_rounds"] >= 2
    assert shown["onetoken_cap_publisher_failures_total"] >= 2
    published_at = shown["onetoken_cap_publisher_last_success_timestamp_seconds"]
    assert 0 < published_at <= time.time()
    failed = [r for r in caplog.records if r.getMessage() == "caps.publish_failed"]
    assert failed and all(r.exc_type for r in failed)  # type: ignore[attr-defined]
    # A restarted Redis holds no caps: the next full round writes them again.
    redis_server.start()
    rc = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        wait_until(
            lambda: cap(rc, org_id) == (BALANCE + 250, revision(state)),
            timeout=10,
            message="caps republished",
        )
    finally:
        rc.close()
    wait_until(lambda: publisher.health() == "ok")
    shown = {m.name: m.samples[0][2] for m in publisher.metrics()}
    assert shown["onetoken_cap_publisher_failing_rounds"] == 0
    assert shown["onetoken_cap_publisher_last_success_timestamp_seconds"] > published_at


# -- retiring a dead instance -------------------------------------------------------------


def headroom(redis_db: redis.Redis, org_id: str) -> int:
    """What the gateways could still lease in Redis: cap - Σ hold."""
    got = cap(redis_db, org_id)
    assert got is not None
    return got[0] - sum(holds(redis_db, org_id).values())


def true_headroom(state: AppState, redis_db: redis.Redis, org_id: str, live_ids: list[str]) -> int:
    """The truth: balance + marks of the live instances - their holds."""
    with state.session_factory() as s:
        balance = billing.balance(s, org_id)
        marked = sum(spent_marks(s, i)[0].get(org_id, 0) for i in live_ids)
    held = holds(redis_db, org_id)
    return balance + marked - sum(held.get(i, 0) for i in live_ids)


def test_retiring_a_dead_instance_is_safe_at_every_crash_point(
    state: AppState,
    publisher: CapPublisher,
    redis_db: redis.Redis,
    org_id: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = settings.spool_dir
    publisher.publish_all()
    # Leases the gateways took, cumulative: never below what each instance spent.
    redis_db.hset(caps.hold_key("ot:", org_id), mapping={"dead1": 500, "live1": 400})
    append(spool, "dead1", 1, [record("d1", org_id=org_id, cost=300, ts_us=NOW_US)])
    dead(spool, "dead1")
    append(spool, "live1", 1, [record("l1", org_id=org_id, cost=200, ts_us=NOW_US)])
    with state.session_factory() as s:
        before_retiring = read_plan(s)
    ingestor = Ingestor(settings, state.session_factory, sink=AcceptingSink())  # type: ignore[arg-type]
    with live(spool, "live1"):
        ingestor.catch_up()

        # Crash point 1: retired in the DB (its journal gone), Redis not touched yet. The
        # old cap still counts its marks, but its hold still counts too.
        with state.session_factory() as s:
            assert s.get(IngestRetired, "dead1") is not None
        assert not (spool / "journal-dead1.lock").exists()
        assert headroom(redis_db, org_id) <= true_headroom(state, redis_db, org_id, ["live1"])
        assert headroom(redis_db, org_id) == BALANCE - 900

        # Crash point 2: Redis lowered the cap and dropped the hold in one script; the DB
        # rows are still there.
        def crash(*_: object) -> None:
            raise RuntimeError("killed")

        monkeypatch.setattr(caps, "forget_retired", crash)
        with pytest.raises(RuntimeError):
            publisher.publish_all()
        assert holds(redis_db, org_id) == {"live1": 400}
        assert headroom(redis_db, org_id) == true_headroom(state, redis_db, org_id, ["live1"])
        assert headroom(redis_db, org_id) == BALANCE - 300 - 400
        with state.session_factory() as s:
            assert s.get(IngestRetired, "dead1") is not None
            assert spent_marks(s, "dead1")[0] == {org_id: 300}

        # A replica that read before the retirement writes last: refused, as its
        # revision is older.
        publisher.write(before_retiring)
        assert headroom(redis_db, org_id) == BALANCE - 700

        # Restarted: the next full round finishes the retirement.
        monkeypatch.undo()
        publisher.publish_all()
        with state.session_factory() as s:
            assert s.get(IngestRetired, "dead1") is None
            assert spent_marks(s, "dead1") == ({}, {})
            assert s.scalar(select(func.count()).where(IngestCursor.instance_id == "dead1")) == 0
            assert s.scalar(select(func.count()).select_from(IngestCursor)) == 2  # live1's
        assert cap(redis_db, org_id) == (BALANCE - 300, revision(state))
        assert headroom(redis_db, org_id) == true_headroom(state, redis_db, org_id, ["live1"])


def test_marking_retired_twice_bumps_the_revision_once(state: AppState) -> None:
    # A crash after the commit, before the lock file went: the next round retires again.
    with state.session_factory() as s:
        caps.mark_retired(s, "gone")
        s.commit()
    after = revision(state)
    with state.session_factory() as s:
        caps.mark_retired(s, "gone")
        s.commit()
    assert revision(state) == after
