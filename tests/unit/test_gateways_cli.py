"""`onetoken gateways list|retire` against a real redis-server: seeing the instances that
share Redis, and writing off one whose journal was lost with its disk."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from pydantic import SecretStr

from onetoken import cli
from onetoken.billing import service as billing
from onetoken.ingest import caps, gateways, journal
from onetoken.ingest.caps import CapPublisher
from onetoken.ingest.gateways import HEARTBEAT_EXPIRY_MS, heartbeat_key
from onetoken.ingest.ingestor import Ingestor
from onetoken.ingest.marks import spent_marks
from onetoken.ingest.models import IngestCursor, IngestRetired
from onetoken.orgs import service as orgs
from onetoken.security import log as security_log
from onetoken.security.audit import CliActor
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.support import RedisServer, wait_until
from tests.unit.journal_files import AcceptingSink, append, dead, live, record

BALANCE = 10_000
NOW_US = int(datetime.now(UTC).replace(hour=12).timestamp()) * 1_000_000


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONETOKEN_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("ONETOKEN_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ONETOKEN_SECRET_KEY", settings.secret_key.get_secret_value())  # type: ignore[union-attr]


@pytest.fixture
def org_id(state: AppState) -> str:
    with state.session_factory() as s:
        org = orgs.create_org(s, "A")
        billing.credit(s, org.id, amount=BALANCE, kind="grant", idempotency_key="g")
        s.commit()
        return org.id


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """(exit code, stdout as JSON when it parses, stderr)."""
    code = cli.main(list(argv))
    out = capsys.readouterr()
    try:
        parsed = json.loads(out.out)
    except ValueError:
        parsed = out.out
    return code, parsed, out.err


def beat(redis_db: redis.Redis, instance: str, age_ms: int) -> None:
    """A heartbeat in `ot:gateways` as a gateway writes it, `age_ms` old on Redis' clock."""
    seconds, micros = redis_db.time()
    redis_db.zadd(heartbeat_key("ot:"), {instance: seconds * 1000 + micros // 1000 - age_ms})


def holds(redis_db: redis.Redis, org_id: str) -> dict[str, int]:
    return {k: int(v) for k, v in redis_db.hgetall(caps.hold_key("ot:", org_id)).items()}


def headroom(redis_db: redis.Redis, org_id: str) -> int:
    got = redis_db.hgetall(caps.cap_key("ot:", org_id))
    return int(got["cap"]) - sum(holds(redis_db, org_id).values())


def true_headroom(state: AppState, redis_db: redis.Redis, org_id: str, live_ids: list[str]) -> int:
    """balance + marks of the live instances - their holds."""
    with state.session_factory() as s:
        balance = billing.balance(s, org_id)
        marked = sum(spent_marks(s, i)[0].get(org_id, 0) for i in live_ids)
    held = holds(redis_db, org_id)
    return balance + marked - sum(held.get(i, 0) for i in live_ids)


def written_off_events() -> list[dict[str, Any]]:
    writer = security_log.current()
    assert writer is not None
    rows = [r for r in writer.drain() if r[2] == "gateway.written_off"]
    cols = security_log.SECURITY_LOG_COLUMNS
    return [
        {**dict(zip(cols, r, strict=True)), "detail": orjson.loads(r[cols.index("detail")])}
        for r in rows
    ]


def lose(
    settings: Settings,
    state: AppState,
    org_id: str,
    instance: str,
    cost: int,
    *,
    keep: Path | None = None,
) -> None:
    """An instance that ran here, had `cost` ingested, then lost its journal (moved to
    `keep`, if given, as a node that comes back would have it)."""
    spool = settings.spool_dir
    append(spool, instance, 1, [record(f"{instance}-r", org_id=org_id, cost=cost, ts_us=NOW_US)])
    ingestor = Ingestor(settings, state.session_factory, sink=AcceptingSink())  # type: ignore[arg-type]
    with live(spool, instance):
        ingestor.catch_up()
    for path in spool.glob(f"journal-{instance}*"):
        if keep is None:
            path.unlink()
        else:
            keep.mkdir(exist_ok=True)
            path.rename(keep / path.name)


def test_list_shows_live_and_lost_instances_and_retire_writes_off_only_the_lost_one(
    settings: Settings,
    state: AppState,
    redis_server: RedisServer,
    redis_db: redis.Redis,
    org_id: str,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings.redis_url = SecretStr(redis_server.url)
    monkeypatch.setenv("ONETOKEN_REDIS_URL", redis_server.url)
    spool = settings.spool_dir
    # "lost1" ran on a node that died: 300 of its cost was ingested while it lived, then
    # its journal went with the node's disk. Its lease (500) and marks stay behind.
    lose(settings, state, org_id, "lost1", 300)
    # "other1" serves on another node; "here1" serves on this one; "journaled1" died here
    # and its journal waits for ingestion.
    redis_db.hset(caps.hold_key("ot:", org_id), mapping={"lost1": 500, "other1": 400, "here1": 100})
    beat(redis_db, "lost1", 60_000)
    beat(redis_db, "other1", 100)
    append(spool, "journaled1", 1, [record("j1", org_id=org_id, cost=50, ts_us=NOW_US)])
    dead(spool, "journaled1")
    publisher = CapPublisher(settings, state.session_factory)
    publisher.publish_all()

    with live(spool, "here1"):
        code, listed, _ = run(capsys, "gateways", "list", "--json")
        assert code == 0 and listed["redis"] is True
        by_id = {i["instance_id"]: i for i in listed["instances"]}
        assert set(by_id) == {"lost1", "other1", "here1", "journaled1"}
        lost = by_id["lost1"]
        assert lost["live"] is False and lost["retired"] is False
        assert lost["heartbeat_age_ms"] >= 60_000
        assert lost["journal"] == "absent"
        assert lost["ingested"] == {org_id: 300} and lost["held"] == {org_id: 500}
        assert by_id["other1"]["live"] is True
        assert by_id["other1"]["heartbeat_age_ms"] < HEARTBEAT_EXPIRY_MS
        assert by_id["here1"]["live"] is True and by_id["here1"]["journal"] == "live"
        assert by_id["journaled1"]["journal"] == "complete"
        assert by_id["journaled1"]["live"] is False

        code, table, _ = run(capsys, "gateways", "list")
        assert code == 0
        assert any(line.split()[:2] == ["lost1", "dead"] for line in table.splitlines())

        # Refused: live by heartbeat, live by its lock here, journal still here.
        for instance, why in (
            ("other1", "heartbeat"),
            ("here1", "journal lock"),
            ("journaled1", "still here"),
        ):
            code, _, err = run(
                capsys, "gateways", "retire", instance, "--lost", "--reason", "node gone"
            )
            assert code == 2 and why in err and "nothing written off" in err
        assert holds(redis_db, org_id) == {"lost1": 500, "other1": 400, "here1": 100}
        assert written_off_events() == []

    code, out, _ = run(
        capsys, "gateways", "retire", "lost1", "--lost", "--reason", "node n3 lost", "--json"
    )
    assert code == 0
    assert out == {
        "instance_id": "lost1",
        "written_off": True,
        "published": True,
        "orgs": {org_id: {"held": 500, "ingested": 300}},
    }
    assert holds(redis_db, org_id) == {"other1": 400, "here1": 100}
    with state.session_factory() as s:
        assert s.get(IngestRetired, "lost1") is None
        assert spent_marks(s, "lost1") == ({}, {})
        # Kept: a journal that turns up after all is read on from there.
        assert s.get(IngestCursor, ("ledger", "lost1")) is not None
    # The control's own next round agrees: cap - Σ hold is the truth again.
    publisher.publish_all()
    assert headroom(redis_db, org_id) == BALANCE - 300 - 500
    assert headroom(redis_db, org_id) == true_headroom(state, redis_db, org_id, ["other1", "here1"])

    (event,) = written_off_events()
    assert event["org_id"] == org_id and event["subject_id"] == "lost1"
    assert event["severity"] == "high" and event["user_agent"] == "onetoken-cli"
    assert event["detail"] == {
        "instance_id": "lost1",
        "reason": "node n3 lost",
        "orgs": 1,
        "held": 500,
        "ingested": 300,
        "unledgered_at_most": 200,
    }

    # Again: nothing left to do, nothing recorded, the other leases untouched.
    code, out, _ = run(
        capsys, "gateways", "retire", "lost1", "--lost", "--reason", "again", "--json"
    )
    assert code == 0 and out["written_off"] is False
    assert holds(redis_db, org_id) == {"other1": 400, "here1": 100}
    assert written_off_events() == []
    code, listed, _ = run(capsys, "gateways", "list", "--json")
    lost = {i["instance_id"]: i for i in listed["instances"]}["lost1"]
    assert lost["held"] == {} and lost["ingested"] == {} and lost["retired"] is False
    assert lost["written_off_at"] is not None
    code, table, _ = run(capsys, "gateways", "list")
    assert any(line.split()[:2] == ["lost1", "written-off"] for line in table.splitlines())


def test_without_redis_the_list_is_what_the_control_db_knows_and_retire_forgets_the_rows(
    settings: Settings,
    state: AppState,
    org_id: str,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("ONETOKEN_REDIS_URL", raising=False)
    lose(settings, state, org_id, "lost1", 300)
    assert journal.scan(settings.spool_dir) == {}

    code, listed, _ = run(capsys, "gateways", "list", "--json")
    assert code == 0 and listed["redis"] is False
    (lost,) = listed["instances"]
    assert lost["instance_id"] == "lost1" and lost["heartbeat_age_ms"] is None
    assert lost["ingested"] == {org_id: 300} and lost["held"] == {}

    code, out, _ = run(capsys, "gateways", "retire", "lost1", "--lost", "--reason", "disk")
    assert code == 0 and "written off" in out
    with state.session_factory() as s:
        assert spent_marks(s, "lost1") == ({}, {})
        # What was ingested stays charged.
        assert billing.balance(s, org_id) == BALANCE - 300
    (event,) = written_off_events()
    assert event["detail"]["held"] == 0 and event["detail"]["ingested"] == 300
    code, listed, _ = run(capsys, "gateways", "list", "--json")
    (lost,) = listed["instances"]
    assert lost["ingested"] == {} and lost["written_off_at"] is not None


def test_a_write_off_whose_publish_round_fails_is_finished_by_the_control_publisher(
    settings: Settings,
    state: AppState,
    redis_server: RedisServer,
    redis_db: redis.Redis,
    org_id: str,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings.redis_url = SecretStr(redis_server.url)
    settings.cap_publish_interval_seconds = 0.2
    monkeypatch.setenv("ONETOKEN_REDIS_URL", redis_server.url)
    lose(settings, state, org_id, "lost1", 300)
    redis_db.hset(caps.hold_key("ot:", org_id), mapping={"lost1": 500, "other1": 400})
    control = CapPublisher(settings, state.session_factory)
    control.publish_all()

    def redis_gone(self: CapPublisher) -> None:
        raise redis.ConnectionError("gone")

    with monkeypatch.context() as m:
        m.setattr(CapPublisher, "publish_all", redis_gone)
        code, out, err = run(
            capsys, "gateways", "retire", "lost1", "--lost", "--reason", "n3", "--json"
        )
    assert code == 0 and out["written_off"] is True and out["published"] is False
    assert "next full round" in err
    # Retired in the DB only: Redis keeps the old cap and the hold, headroom below the truth.
    with state.session_factory() as s:
        assert s.get(IngestRetired, "lost1") is not None
    assert holds(redis_db, org_id) == {"lost1": 500, "other1": 400}
    assert headroom(redis_db, org_id) <= true_headroom(state, redis_db, org_id, ["other1"])

    control.start()
    try:
        wait_until(
            lambda: holds(redis_db, org_id) == {"other1": 400}, message="the control's round"
        )
        assert headroom(redis_db, org_id) == true_headroom(state, redis_db, org_id, ["other1"])
        assert headroom(redis_db, org_id) == BALANCE - 300 - 400
    finally:
        control.stop()


def test_redis_down_lists_what_the_control_db_knows_and_refuses_to_retire(
    settings: Settings,
    state: AppState,
    redis_server: RedisServer,
    org_id: str,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ONETOKEN_REDIS_URL", redis_server.url)
    lose(settings, state, org_id, "lost1", 300)
    redis_server.stop()
    code, listed, _ = run(capsys, "gateways", "list", "--json")
    assert code == 0 and listed["redis"] is False and listed["redis_error"] == "ConnectionError"
    assert [i["instance_id"] for i in listed["instances"]] == ["lost1"]
    code, _, err = run(capsys, "gateways", "retire", "lost1", "--lost", "--reason", "n3")
    assert code == 2 and "Redis did not answer" in err
    with state.session_factory() as s:
        assert s.get(IngestRetired, "lost1") is None
        assert spent_marks(s, "lost1")[0] == {org_id: 300}
    assert written_off_events() == []


def test_a_journal_that_turns_up_after_a_write_off_is_read_on_never_charged_twice(
    settings: Settings,
    state: AppState,
    redis_server: RedisServer,
    redis_db: redis.Redis,
    org_id: str,
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # The node was only cut off: written off, then back with its journal, which holds
    # one more call (50) than the ledger took before.
    settings.redis_url = SecretStr(redis_server.url)
    monkeypatch.setenv("ONETOKEN_REDIS_URL", redis_server.url)
    node = tmp_path / "node"
    lose(settings, state, org_id, "lost1", 300, keep=node)
    append(node, "lost1", 1, [record("late", org_id=org_id, cost=50, ts_us=NOW_US)])
    redis_db.hset(caps.hold_key("ot:", org_id), mapping={"lost1": 500})
    code, out, _ = run(capsys, "gateways", "retire", "lost1", "--lost", "--reason", "n3", "--json")
    assert code == 0 and out["written_off"] is True
    with state.session_factory() as s:
        assert billing.balance(s, org_id) == BALANCE - 300

    for path in node.iterdir():
        path.rename(settings.spool_dir / path.name)
    dead(settings.spool_dir, "lost1")
    ingestor = Ingestor(settings, state.session_factory, sink=AcceptingSink())  # type: ignore[arg-type]
    assert ingestor.catch_up() == 1
    with state.session_factory() as s:
        assert billing.balance(s, org_id) == BALANCE - 350
        # Ingested to its end: retired the normal way again.
        assert s.get(IngestRetired, "lost1") is not None
    publisher = CapPublisher(settings, state.session_factory)
    publisher.publish_all()
    publisher.stop()
    assert headroom(redis_db, org_id) == BALANCE - 350 == true_headroom(state, redis_db, org_id, [])
    # Still written off: another run is a no-op.
    code, out, _ = run(capsys, "gateways", "retire", "lost1", "--lost", "--reason", "n3", "--json")
    assert code == 0 and out["written_off"] is False


def test_two_write_offs_racing_release_and_record_once(
    settings: Settings,
    state: AppState,
    redis_server: RedisServer,
    redis_db: redis.Redis,
    org_id: str,
) -> None:
    settings.redis_url = SecretStr(redis_server.url)
    lose(settings, state, org_id, "lost1", 300)
    redis_db.hset(caps.hold_key("ot:", org_id), mapping={"lost1": 500})
    security_log.current().drain()  # type: ignore[union-attr]
    # B reads the inventory (not written off yet), then A writes it off entirely, then B
    # goes on: the written-off row's key turns B away.
    b_read, a_done = threading.Event(), threading.Event()
    real = gateways.inventory

    def inventory_then_wait(*args: Any) -> gateways.Inventory:
        found = real(*args)
        if threading.current_thread().name == "b":
            b_read.set()
            assert a_done.wait(10)
        return found

    results: dict[str, gateways.WriteOff] = {}

    def write_off(name: str) -> None:
        client = gateways.open_redis(settings)
        try:
            results[name] = gateways.write_off(
                settings, state.session_factory, client, "lost1", reason=name, actor=CliActor()
            )
        finally:
            assert client is not None
            client.close()

    with pytest.MonkeyPatch.context() as m:
        m.setattr(gateways, "inventory", inventory_then_wait)
        b = threading.Thread(target=write_off, args=("b",), name="b")
        b.start()
        assert b_read.wait(10)
        write_off("a")
        a_done.set()
        b.join(10)
    assert results["a"].done is True and results["a"].orgs == {org_id: (500, 300)}
    assert results["b"].done is False
    (event,) = written_off_events()
    assert event["detail"]["reason"] == "a"
