"""Monthly statements, invoices and call statistics against a real chDB call_log and a real
control DB, fed through the supervisor's record pump: a test month's statement and invoice
match the ledger to the unit."""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from sqlalchemy import update

from onetoken.analytics import clickhouse as ch
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.analytics.sink import CallLogSink
from onetoken.billing import service as billing
from onetoken.db.models import LedgerEntry
from onetoken.deps import AppState
from onetoken.gateway.supervisor import GatewaySupervisor
from onetoken.settings import Settings
from tests.unit.conftest import Admin, contract

API = "/api/v1"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(at: datetime) -> int:
    d = at - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _blank(column_type: str) -> Any:
    return "" if "String" in column_type else 0


# Columns this test does not care about (the contract grows) get an empty value.
BLANK = {name: _blank(ctype) for name, ctype, _ in contract("call_log_columns.json")["columns"]}


def record(org: str, rid: str, at: datetime, cost: int, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict(BLANK)
    row |= {
        "ts": micros(at),
        "request_id": rid,
        "org_id": org,
        "account_id": "acc",
        "key_id": "key_a",
        "path": "/v1/chat/completions",
        "model_requested": "chat-a",
        "model_served": "up-a",
        "provider": "prov",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 0,
        "usage_source": "upstream",
        "cost": cost,
        "status": 200,
        "error_code": "",
        "latency_us": 1000,
        "ttfb_us": 500,
        "streamed": 0,
        "source_ip": "127.0.0.1",
        "user_agent": "t",
        "rate_limit": "pass",
        "attempts": 1,
    }
    row.update(kw)
    return row


class QueueEngine:
    """Just enough of the engine for the pump: a queue of records and acks."""

    def __init__(self, config_json: bytes) -> None:
        self.queue: list[dict[str, Any]] = []
        self.acked = 0
        self.lock = threading.Lock()
        self.instance_id = "statements"

    def start(self) -> str:
        return "127.0.0.1:1"

    def load_snapshot(self, data: bytes) -> int:
        return int(orjson.loads(data)["version"])

    def drain_records(self, max_records: int) -> dict[str, list[Any]] | None:
        with self.lock:
            rows, self.queue = self.queue[:max_records], self.queue[max_records:]
        return {c: [r[c] for r in rows] for c in CALL_LOG_COLUMNS} if rows else None

    def ack_records(self, count: int) -> int:
        self.acked += count
        return count

    def stop(self, grace_seconds: float) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"queue_depth": len(self.queue)}


@pytest.fixture(scope="module")
def ch_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("stmt"))


@pytest.fixture(scope="module")
def ch_client(ch_settings: Settings) -> Iterator[Client]:
    client = ch.open_client(ch_settings)
    yield client
    client.close()


@dataclass
class Runtime:
    """The parts of a running server the control API reads call_log through."""

    sink: CallLogSink

    def push_snapshot(self) -> None:
        return None


@pytest.fixture
def pumped(
    state: AppState, ch_settings: Settings, ch_client: Client, admin: Admin
) -> Iterator[tuple[GatewaySupervisor, QueueEngine]]:
    sink = CallLogSink(ch_settings, client=ch_client)
    sup = GatewaySupervisor(
        state.settings, state.secrets, state.session_factory, engine_factory=QueueEngine, sink=sink
    )
    engine = QueueEngine(b"{}")
    sup.engine = engine
    state.runtime = Runtime(sink)  # type: ignore[assignment]
    yield sup, engine
    state.runtime = None


def _previous_month() -> tuple[datetime, datetime]:
    # A recent month: call_log's TTL drops rows older than ONETOKEN_CALL_LOG_TTL_DAYS.
    first = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = (first - timedelta(days=1)).replace(day=1)
    return start, first


MAY, JUNE = _previous_month()
LABEL = f"{MAY.year:04d}-{MAY.month:02d}"


def test_statement_and_invoice_match_the_ledger_to_the_unit(
    client: TestClient,
    admin: Admin,
    other_admin: Admin,
    operator: Admin,
    state: AppState,
    pumped: tuple[GatewaySupervisor, QueueEngine],
) -> None:
    sup, engine = pumped
    org = admin.org_id
    # Odd costs so any rounding or float would show; the edges of the month included.
    rows = [
        record(org, "before", MAY - timedelta(microseconds=1), 1_000_000_007),
        record(org, "first", MAY, 123_456_789),
        record(org, "m2", MAY + timedelta(days=3, hours=5), 987_654_321, key_id="key_b"),
        record(org, "m3", MAY + timedelta(days=3, hours=6), 5, model_requested="chat-b"),
        record(
            org, "err", MAY + timedelta(days=4), 0, status=502, error_code="upstream_unreachable"
        ),
        record(org, "last", JUNE - timedelta(microseconds=1), 333_333_333),
        record(org, "after", JUNE, 777),
        record(other_admin.org_id, "other", MAY + timedelta(days=1), 999),
    ]
    engine.queue.extend(rows)
    assert sup.pump_once() == len(rows)
    assert engine.acked == len(rows)
    # Replaying the same records (a crash before the ack) changes nothing.
    engine.queue.extend(rows)
    sup.pump_once()
    with state.session_factory() as s:
        billing.credit(s, org, amount=50_000_000_000, kind="recharge", idempotency_key="may")
        billing.credit(s, org, amount=2_000_000_000, kind="grant", idempotency_key="april")
        s.execute(
            update(LedgerEntry)
            .where(LedgerEntry.idempotency_key.like("credit:%may"))
            .values(created_at=MAY + timedelta(days=2))
        )
        s.execute(
            update(LedgerEntry)
            .where(LedgerEntry.idempotency_key.like("credit:%april"))
            .values(created_at=MAY - timedelta(days=2))
        )
        s.commit()

    in_may = 123_456_789 + 987_654_321 + 5 + 333_333_333
    r = client.get(f"{API}/billing/statements/{LABEL}", headers=admin.headers)
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["ledger_usage"] == st["call_log_cost"] == f"{in_may // 10**9}.{in_may % 10**9:09d}"
    assert st["difference"] == "0.000000000"
    assert st["calls"] == 5
    opening = 2_000_000_000 - 1_000_000_007
    assert st["opening_balance"] == _money(opening)
    assert st["closing_balance"] == _money(opening + 50_000_000_000 - in_may)
    assert st["movement"] == {"recharge": _money(50_000_000_000), "usage": _money(-in_may)}
    assert [c["kind"] for c in st["credits"]] == ["recharge"]
    by_model = {x["group"]: x for x in st["by_model"]}
    assert by_model["chat-b"]["cost"] == _money(5)
    for section in ("by_model", "by_key", "by_day"):
        assert sum(_nano(x["cost"]) for x in st[section]) == in_may, section
    days = {MAY, MAY + timedelta(days=3), MAY + timedelta(days=4), JUNE - timedelta(days=1)}
    assert {x["group"] for x in st["by_day"]} == {d.strftime("%Y-%m-%d") for d in days}
    r = client.get(f"{API}/billing/statements/{LABEL}/csv", headers=admin.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")

    # The invoice: lines per model from the ledger, total equal to the ledger's usage.
    body = {
        "period": LABEL,
        "title": "Acme <b>Ltd</b>",
        "tax_id": "91310000MA1FL0000X",
        "address": '1 Road "A" & Co',
    }
    r = client.post(f"{API}/billing/invoices", json=body, headers=admin.headers)
    assert r.status_code == 201, r.text
    inv = r.json()
    assert _nano(inv["amount"]) == in_may
    assert sum(_nano(line["amount"]) for line in inv["lines"]) == in_may
    assert {line["description"] for line in inv["lines"]} == {"Usage: chat-a", "Usage: chat-b"}
    again = client.post(f"{API}/billing/invoices", json=body, headers=admin.headers)
    assert again.status_code == 409
    doc = client.get(f"{API}/billing/invoices/{inv['id']}/document", headers=admin.headers)
    assert doc.status_code == 200 and doc.headers["content-type"].startswith("text/html")
    assert "Acme &lt;b&gt;Ltd&lt;/b&gt;" in doc.text and "<b>Ltd" not in doc.text
    assert _money(in_may) in doc.text
    lines = client.get(f"{API}/billing/invoices/{inv['id']}/lines.csv", headers=admin.headers)
    parsed = list(csv.DictReader(io.StringIO(lines.text)))
    assert sum(_nano(x["amount"]) for x in parsed) == in_may
    for path in ("", "/document", "/lines.csv"):
        r = client.get(f"{API}/billing/invoices/{inv['id']}{path}", headers=other_admin.headers)
        assert r.status_code == 404
    # The org requests the invoice; the operator issues (or voids) it.
    r = client.post(f"{API}/billing/invoices/{inv['id']}/issue", headers=admin.headers)
    assert r.status_code == 403
    r = client.post(f"{API}/billing/invoices/{inv['id']}/issue", headers=operator.headers)
    assert r.json()["status"] == "issued"
    r = client.post(f"{API}/billing/invoices/{inv['id']}/issue", headers=operator.headers)
    assert r.status_code == 409
    # The other org's statement holds only its own call.
    other = client.get(f"{API}/billing/statements/{LABEL}", headers=other_admin.headers).json()
    assert other["calls"] == 1 and other["call_log_cost"] == _money(999)


def test_call_stats_by_day_and_key(
    client: TestClient, admin: Admin, state: AppState, pumped: tuple[GatewaySupervisor, QueueEngine]
) -> None:
    sup, engine = pumped
    now = datetime.now(UTC).replace(microsecond=0)
    engine.queue.extend(
        [
            record(admin.org_id, "s1", now - timedelta(hours=1), 10, key_id="k1"),
            record(admin.org_id, "s2", now - timedelta(hours=1), 20, key_id="k2"),
            record(admin.org_id, "s3", now - timedelta(hours=1), 0, key_id="k2", status=429),
        ]
    )
    sup.pump_once()
    r = client.get(f"{API}/billing/call-stats", params={"group_by": "key"}, headers=admin.headers)
    assert r.status_code == 200, r.text
    data = {x["group"]: x for x in r.json()["data"]}
    assert data["k1"]["calls"] == 1 and data["k2"]["calls"] == 2 and data["k2"]["errors"] == 1
    assert data["k2"]["cost"] == _money(20)
    r = client.get(
        f"{API}/billing/call-stats",
        params={
            "group_by": "model",
            "start": (now + timedelta(hours=1)).isoformat(),
            "end": now.isoformat(),
        },
        headers=admin.headers,
    )
    assert r.status_code == 422


def _money(nano: int) -> str:
    sign = "-" if nano < 0 else ""
    return f"{sign}{abs(nano) // 10**9}.{abs(nano) % 10**9:09d}"


def _nano(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    return sign * (int(whole) * 10**9 + int(frac.ljust(9, "0")))


def test_only_dead_instances_journals_are_replayed(
    state: AppState, admin: Admin, ch_settings: Settings, ch_client: Client
) -> None:
    sink = CallLogSink(ch_settings, client=ch_client)
    sink.live_instance = "live"
    spool = ch_settings.data_dir / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    dead = spool / "journal-dead-00000000.jsonl"
    live = spool / "journal-live-00000000.jsonl"
    dead.write_bytes(orjson.dumps(record(admin.org_id, "j-dead", now, 11)) + b"\n")
    live.write_bytes(orjson.dumps(record(admin.org_id, "j-live", now, 13)) + b"\n")
    sup = GatewaySupervisor(
        state.settings, state.secrets, state.session_factory, engine_factory=QueueEngine, sink=sink
    )
    assert sink.replay_spool(sup._ingest_replayed) == 1
    assert not dead.exists() and live.exists()
    with state.session_factory() as s:
        assert billing.balance(s, admin.org_id) == -11
    # Replaying the same journal again (a crash before it was deleted) charges nothing more.
    dead.write_bytes(orjson.dumps(record(admin.org_id, "j-dead", now, 11)) + b"\n")
    sink.replay_spool(sup._ingest_replayed)
    with state.session_factory() as s:
        assert billing.balance(s, admin.org_id) == -11
    live.unlink()
