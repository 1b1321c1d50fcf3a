"""The security log writer: event shape, queue, ClickHouse batches, spool and replay,
the pump hooks, and key-risk events derived from call records."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.client import Client

from onetoken.analytics.clickhouse import open_client
from onetoken.control import wire_ingestion
from onetoken.ingest.batch import Batch
from onetoken.kit.events import EventBus
from onetoken.risk import keyrisk
from onetoken.security import log as seclog
from onetoken.security.log import SecurityEvent, SecurityEventError, SecurityLog
from onetoken.settings import Settings

from .batches import summarize


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    client = open_client(Settings(data_dir=tmp_path_factory.mktemp("seclog")))
    yield client
    client.close()


def run_on(client: Client) -> Callable[[Callable[[Any], Any]], Any]:
    return lambda query: query(client)


def failing(_: Callable[[Any], Any]) -> Any:
    raise ConnectionError("clickhouse down")


def rows_for(client: Client, org_id: str) -> list[dict[str, Any]]:
    result = client.query(
        "SELECT event_id, kind, severity, actor_id, subject_id, source_ip, user_agent, detail "
        "FROM onetoken.security_log FINAL WHERE org_id = {o:String} ORDER BY ts",
        parameters={"o": org_id},
    )
    names = ["event_id", "kind", "severity", "actor_id", "subject_id", "source_ip",
             "user_agent", "detail"]
    return [dict(zip(names, r, strict=True)) for r in result.result_rows]


def ev(org: str, kind: str = "test.event", **detail: Any) -> SecurityEvent:
    return SecurityEvent(kind=kind, severity="low", org_id=org, actor_id="acc_1",
                         subject_id="key_1", source_ip="192.0.2.1", user_agent="ua",
                         detail=detail)


def test_events_are_metadata_shaped() -> None:
    with pytest.raises(SecurityEventError):
        SecurityEvent(kind="Bad Kind", severity="low")
    with pytest.raises(SecurityEventError):
        SecurityEvent(kind="a.b", severity="urgent")  # type: ignore[arg-type]
    with pytest.raises(SecurityEventError):
        SecurityEvent(kind="a.b", severity="low", detail={"nested": {"x": 1}})  # type: ignore[dict-item]
    with pytest.raises(SecurityEventError):
        SecurityEvent(kind="a.b", severity="low", detail={"Bad Key": 1})
    row = SecurityEvent(kind="a.b", severity="low", detail={"s": "x" * 5000},
                        user_agent="u" * 1000).row()
    assert len(orjson.loads(row[-1])["s"]) == 512 and len(row[8]) == 256


def test_flush_writes_a_batch_to_clickhouse(ch: Client, tmp_path: Path) -> None:
    log = SecurityLog(tmp_path / "spool")
    for i in range(3):
        log.record(ev("org_flush", n=i))
    assert log.pending() == 3
    assert log.flush(run_on(ch)) == 3
    assert log.pending() == 0
    rows = rows_for(ch, "org_flush")
    assert [orjson.loads(r["detail"])["n"] for r in rows] == [0, 1, 2]
    assert rows[0]["source_ip"] == "192.0.2.1" and rows[0]["subject_id"] == "key_1"


def test_failed_insert_spools_and_replay_is_idempotent(ch: Client, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    log = SecurityLog(spool)
    log.record(ev("org_spool", n=1))
    log.record(ev("org_spool", n=2))
    assert log.flush(failing) == 0
    files = log.spool_files()
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert not list(spool.glob("*.tmp"))
    # A second process (the CLI) spooling meanwhile is picked up too.
    other = SecurityLog(spool)
    other.record(ev("org_spool", n=3))
    other.flush_to_spool()
    copy = spool / "seclog-copy.jsonl"
    copy.write_bytes(files[0].read_bytes())  # the same events twice: replay must not double
    assert log.replay_spool(run_on(ch)) == 5
    assert log.spool_files() == []
    assert sorted(orjson.loads(r["detail"])["n"] for r in rows_for(ch, "org_spool")) == [1, 2, 3]


def test_metrics_count_the_queue_and_the_spool_until_it_is_replayed(
    ch: Client, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    log = SecurityLog(spool)

    def metrics() -> dict[str, float]:
        return {m.name: m.samples[0][2] for m in log.metrics()}

    for i in range(3):
        log.record(ev("org_metrics", n=i))
    assert metrics()["onetoken_security_log_queue_events"] == 3
    assert log.flush(failing) == 0
    log.record(ev("org_metrics", n=3))
    log.flush_to_spool()
    got = metrics()
    files = log.spool_files()
    assert len(files) == 2
    assert got["onetoken_security_log_spool_files"] == 2
    assert got["onetoken_security_log_spool_bytes"] == sum(f.stat().st_size for f in files)
    assert got["onetoken_security_log_queue_events"] == 0
    assert got["onetoken_security_log_spooled_total"] == 4
    assert log.replay_spool(run_on(ch)) == 4
    got = metrics()
    assert got["onetoken_security_log_spool_files"] == got["onetoken_security_log_spool_bytes"] == 0
    assert got["onetoken_security_log_replayed_total"] == 4


def test_replay_keeps_files_while_clickhouse_is_down(tmp_path: Path) -> None:
    log = SecurityLog(tmp_path)
    log.record(ev("org_down"))
    log.flush_to_spool()
    assert log.replay_spool(failing) == 0
    assert len(log.spool_files()) == 1


def test_a_full_queue_spills_to_the_spool_instead_of_dropping(tmp_path: Path) -> None:
    log = SecurityLog(tmp_path, capacity=10)
    for i in range(25):
        log.record(ev("org_full", n=i))
    spooled = sum(1 for f in log.spool_files() for _ in f.open("rb"))
    assert spooled + log.pending() == 25 and log.pending() < 10


def test_record_goes_to_the_installed_writer(tmp_path: Path) -> None:
    previous = seclog.current()
    first = seclog.install(SecurityLog(tmp_path / "a"))
    try:
        seclog.record(ev("org_installed"))
        assert first.pending() == 1
        second = seclog.install(SecurityLog(tmp_path / "b"))
        # The replaced writer's queue went to its spool, not lost.
        assert first.pending() == 0 and len(first.spool_files()) == 1
        seclog.record(ev("org_installed"))
        assert second.pending() == 1
    finally:
        if previous is not None:
            seclog.install(previous)


class FakeSink:
    def __init__(self, client: Client) -> None:
        self.client = client

    def read(self, query: Callable[[Any], Any]) -> Any:
        return query(self.client)


class FakeSupervisor:
    def __init__(self, client: Client) -> None:
        self.sink = FakeSink(client)
        self.flush_hooks: list[Callable[[], None]] = []
        self.batch_observers: list[Callable[[Batch], None]] = []


def test_supervisor_hooks_flush_and_derive_key_risks(ch: Client, tmp_path: Path) -> None:
    previous = seclog.current()
    writer = seclog.install(SecurityLog(tmp_path))
    try:
        sup = FakeSupervisor(ch)
        events = EventBus()
        wire_ingestion(events, sup)
        assert len(sup.flush_hooks) == 1 and sup.batch_observers == [events.publish]
        assert events.subscribers(Batch) == (keyrisk.observe,)
        # A batch as ingestion hands it over (call groups), metadata only.
        n = 7
        batch = summarize({
            "request_id": [f"r{i}" for i in range(n)],
            "org_id": ["org_risk"] * n,
            "key_id": ["key_a"] * 3 + ["key_b"] * 2 + ["key_c", "key_d"],
            "error_code": ["key_revoked"] * 3 + ["key_ip_not_allowed"] * 2 + ["", "key_expired"],
            "source_ip": ["198.51.100.1"] * 3 + ["203.0.113.9"] * 2 + ["192.0.2.1"] * 2,
            "user_agent": ["curl/8"] * n,
            "path": ["/v1/chat/completions"] * n,
        })
        for observe in sup.batch_observers:
            observe(batch)
        for hook in sup.flush_hooks:
            hook()
        assert writer.pending() == 0
        rows = rows_for(ch, "org_risk")
        got = sorted((r["kind"], r["subject_id"], orjson.loads(r["detail"])["requests"],
                      r["severity"]) for r in rows)
        assert got == [
            ("key.expired_used", "key_d", 1, "low"),
            ("key.ip_not_allowed", "key_b", 2, "high"),
            ("key.revoked_used", "key_a", 3, "medium"),
        ]
        assert {r["source_ip"] for r in rows if r["subject_id"] == "key_b"} == {"203.0.113.9"}
        # Each event names the first request it stands for, with its path and client.
        firsts = {r["subject_id"]: orjson.loads(r["detail"])["first_request_id"] for r in rows}
        assert firsts == {"key_a": "r0", "key_b": "r3", "key_d": "r6"}
        assert {r["user_agent"] for r in rows} == {"curl/8"}
    finally:
        if previous is not None:
            seclog.install(previous)


def test_spool_lines_hold_only_the_event_columns(tmp_path: Path) -> None:
    log = SecurityLog(tmp_path)
    log.record(ev("org_cols", reason="x"))
    log.flush_to_spool()
    (path,) = log.spool_files()
    (line,) = path.read_bytes().splitlines()
    assert tuple(orjson.loads(line)) == seclog.SECURITY_LOG_COLUMNS
    assert os.stat(path).st_size == len(line) + 1
