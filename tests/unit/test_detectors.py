"""The risk detectors on synthetic record batches (the integration test drives real
traffic through a server; these pin the thresholds and the edges)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from onetoken import webhooks
from onetoken.control import build_state, new_event_bus
from onetoken.db.session import current_revision
from onetoken.ingest.batch import Batch
from onetoken.risk.detectors import Detectors, attach
from onetoken.security import blocking
from onetoken.security import log as security_log
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.support import TEST_SECRET

from .batches import summarize

SECOND = 1_000_000
T0 = 1_800_000_000 * SECOND


class Emitted:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def submit(self, org_id: str, kind: str, data: dict[str, Any]) -> None:
        self.events.append((org_id, kind, data))


@pytest.fixture
def emitted() -> Iterator[Emitted]:
    sink = Emitted()
    webhooks.install(sink)  # type: ignore[arg-type]
    yield sink
    webhooks.install(None)


@pytest.fixture
def seclog(tmp_path: Path) -> Iterator[security_log.SecurityLog]:
    previous = security_log.current()
    # Wired as in a control process: recorded events go out on its bus.
    events = new_event_bus()
    writer = security_log.install(security_log.SecurityLog(tmp_path / "spool", events=events))
    yield writer
    if previous is not None:
        security_log.install(previous)


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "secret_key": SecretStr(TEST_SECRET),
        "anomaly_bucket_seconds": 1.0,
        "anomaly_warmup_buckets": 3,
        "anomaly_min_requests": 20,
        "anomaly_min_errors": 20,
        "anomaly_ip_threshold": 50,
        "attack_401_threshold": 30,
        "attack_401_window_seconds": 10.0,
    }
    base.update(kw)
    return Settings(**base)


def batch(rows: list[dict[str, Any]]) -> Batch:
    defaults = {
        "ts": T0, "request_id": "", "org_id": "org_a", "account_id": "acc_a", "key_id": "key_a",
        "status": 200, "error_code": "", "source_ip": "10.0.0.1", "provider": "prov_a",
    }
    out: dict[str, list[Any]] = {k: [] for k in defaults}
    for i, row in enumerate(rows):
        merged = {**defaults, "request_id": f"r{i}-{id(rows)}", **row}
        for k in defaults:
            out[k].append(merged[k])
    return summarize(out)


def traffic(second: int, n: int, **row: Any) -> Batch:
    return batch([{"ts": T0 + second * SECOND + i, **row} for i in range(n)])


def kinds(writer: security_log.SecurityLog) -> list[str]:
    return [r[2] for r in writer.drain()]


def test_twenty_times_the_baseline_triggers_once(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path))
    for second in range(5):
        assert d.observe(traffic(second, 2)) == []
    found = d.observe(traffic(5, 40))
    assert [f.kind for f in found] == ["calls.rate_anomaly"]
    assert found[0].subject_id == "key_a" and found[0].org_id == "org_a"
    assert found[0].detail["count"] == 40
    # The cooldown keeps one incident from flooding the log.
    assert d.observe(traffic(5, 40)) == []
    rows = seclog.drain()
    assert [r[2] for r in rows] == ["calls.rate_anomaly"]
    assert orjson.loads(rows[0][-1])["count"] == 40
    assert [(o, k) for o, k, _ in emitted.events] == [("org_a", "frequency_anomaly")]


def test_a_busy_but_steady_key_does_not_trigger(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path))
    for second in range(10):
        assert d.observe(traffic(second, 100)) == []
    # 3x its baseline: busy, not anomalous.
    assert d.observe(traffic(10, 300)) == []
    # No history yet: a new key is not judged before the warm-up.
    assert d.observe(traffic(10, 500, key_id="key_new")) == []
    assert emitted.events == []


def test_error_rate_far_above_baseline(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path))
    for second in range(4):
        d.observe(batch([{"ts": T0 + second * SECOND + i,
                          "status": 500 if i == 0 else 200} for i in range(30)]))
    found = d.observe(traffic(4, 30, status=502, error_code="upstream_error"))
    assert "calls.error_anomaly" in [f.kind for f in found]


def test_fifty_source_addresses_trigger(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path))
    few = batch([{"source_ip": f"10.1.0.{i}"} for i in range(49)])
    assert d.observe(few) == []
    found = d.observe(batch([{"source_ip": "10.1.1.1"}]))
    assert [f.kind for f in found] == ["calls.many_sources"]
    assert found[0].detail["sources"] == 50
    assert emitted.events[-1][1] == "abnormal_calls"


def test_auth_flood_blocks_the_source(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    state: AppState = build_state(_settings(tmp_path))
    try:
        with state.session_factory() as s:
            revision = current_revision(s)
        d = Detectors(state.settings, state.session_factory)
        flood = traffic(0, 29, status=401, error_code="invalid_api_key", key_id="",
                        org_id="", account_id="", source_ip="203.0.113.9")
        assert d.observe(flood) == []
        found = d.observe(traffic(1, 1, status=401, error_code="invalid_api_key", key_id="",
                                  org_id="", account_id="", source_ip="203.0.113.9"))
        assert [f.kind for f in found] == ["attack.auth_flood_blocked"]
        assert found[0].source_ip == "203.0.113.9" and found[0].detail["blocked"] is True
        with state.session_factory() as s:
            # Gateways see the block at their next snapshot poll.
            assert current_revision(s) > revision
            entry = blocking.snapshot_entries(s)[0]
        # The flood's source loses its failing attempts, not the valid keys behind it.
        assert entry["cidr"] == "203.0.113.9/32" and entry["mode"] == "unauthenticated"
        assert emitted.events[-1][1] == "attack_blocked"
        writer = security_log.current()  # build_state installed its own
        assert writer is not None
        row = writer.drain()[-1]
        assert row[2] == "attack.auth_flood_blocked" and row[7] == "203.0.113.9"
        # 401s from another source, spread out in time, stay below the window's threshold.
        for second in range(0, 60, 3):
            assert d.observe(traffic(second, 4, status=401, source_ip="203.0.113.10")) == []
    finally:
        state.db_engine.dispose()


def test_exempt_sources_are_recorded_not_blocked(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    state = build_state(_settings(tmp_path, attack_block_exempt="198.51.100.0/24"))
    try:
        d = Detectors(state.settings, state.session_factory)
        found = d.observe(traffic(0, 40, status=401, source_ip="198.51.100.7"))
        assert [f.kind for f in found] == ["attack.auth_flood"]
        with state.session_factory() as s:
            assert blocking.snapshot_entries(s) == []
    finally:
        state.db_engine.dispose()


def test_key_risks_emit_webhooks_once_per_cooldown(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path))
    rows = [{"status": 401, "error_code": "key_revoked"}] * 3 + [
        {"status": 403, "error_code": "key_ip_not_allowed", "source_ip": "192.0.2.1"}
    ]
    found = d.observe(batch(rows))
    assert sorted(f.kind for f in found) == ["key.ip_not_allowed", "key.revoked_used"]
    assert {k for _, k, _ in emitted.events} == {"key_risk"}
    # The rows themselves are written by onetoken.risk.keyrisk.
    assert seclog.drain() == []
    assert d.observe(batch(rows)) == []


def test_call_log_insert_failures_raise_a_system_alarm(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path))
    assert d.check_pipeline({"batches_failed": 0, "records_dropped": 0}) == []
    found = d.check_pipeline({"batches_failed": 2, "records_dropped": 0})
    assert [f.kind for f in found] == ["system.call_log_delayed"]
    assert kinds(seclog) == ["system.call_log_delayed"]
    assert emitted.events == [("", "system_alarm", emitted.events[0][2])]


def test_unreadable_journal_lines_raise_the_records_dropped_alarm(
    tmp_path: Path, emitted: Emitted
) -> None:
    # The alarm as the control process wires it: the ingestor's flush hook reads its
    # bad-line counter (lines neither call_log nor the ledger got).
    state = build_state(_settings(tmp_path))
    try:
        writer = security_log.current()  # build_state installed its own
        assert writer is not None
        ingestor = SimpleNamespace(batch_observers=[], flush_hooks=[], sink=None, bad_lines=0)
        attach(state.events, ingestor, state.settings, state.session_factory)
        (hook,) = ingestor.flush_hooks
        hook()
        assert kinds(writer) == []
        ingestor.bad_lines = 3
        hook()
        assert kinds(writer) == ["system.records_dropped"]
        hook()  # no new bad lines, no new alarm
        assert kinds(writer) == []
    finally:
        state.db_engine.dispose()


def test_failing_upstream_raises_a_system_alarm(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path, upstream_alarm_failures=10))
    found = d.observe(traffic(0, 12, status=502, error_code="upstream_unreachable"))
    assert [f.kind for f in found] == ["system.upstream_failing"]
    assert found[0].subject_id == "prov_a"


def test_oversized_answers_mean_a_failing_upstream_refused_addresses_do_not(
    tmp_path: Path, emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    d = Detectors(_settings(tmp_path, upstream_alarm_failures=10))
    # A base_url leading to a refused address is configuration, not the provider's health.
    refused = traffic(0, 12, status=502, error_code="upstream_address_refused")
    assert d.observe(refused) == []
    found = d.observe(traffic(1, 24, status=502, error_code="upstream_response_too_large"))
    assert [f.kind for f in found] == ["system.upstream_failing"]


def test_permission_changes_and_abnormal_logins_become_webhooks(
    emitted: Emitted, seclog: security_log.SecurityLog
) -> None:
    security_log.record(security_log.SecurityEvent(
        kind="admin.role_changed", severity="medium", org_id="org_a", actor_id="acc_owner",
        subject_id="acc_b",
        detail={"role.before": "viewer", "role.after": "admin", "email.before": "b@x.test",
                "email.after": "c@x.test", "changed": "role,email"},
    ))
    security_log.record(security_log.SecurityEvent(
        kind="auth.login_abnormal", severity="medium", org_id="org_a", actor_id="acc_b",
        detail={"reason": "new_network", "net": "192.0.2.0/24"},
    ))
    security_log.record(security_log.SecurityEvent(kind="auth.login", severity="info"))
    assert [(o, k) for o, k, _ in emitted.events] == [
        ("org_a", "permission_change"), ("org_a", "abnormal_login"),
    ]
    change = emitted.events[0][2]
    assert change["role.before"] == "viewer" and change["role.after"] == "admin"
    assert change["subject_id"] == "acc_b" and change["actor_id"] == "acc_owner"
    assert not any("email" in k for k in change)
    assert emitted.events[1][2]["reason"] == "new_network"
