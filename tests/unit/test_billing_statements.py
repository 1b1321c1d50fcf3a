"""Monthly statements, invoices and call statistics against a real chDB call_log and a real
control DB, fed through journal files and the ingestor: a test month's statement and
invoice match the ledger to the unit, and reconcile finds no difference on any day."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from sqlalchemy import update

from onetoken.analytics import clickhouse as ch
from onetoken.analytics.columns import CALL_LOG_SCHEMA
from onetoken.analytics.sink import CallLogSink
from onetoken.billing import service as billing
from onetoken.billing import usage
from onetoken.billing.models import LedgerEntry
from onetoken.billing.reconcile import reconcile
from onetoken.ingest.ingestor import Ingestor
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.unit import journal_files
from tests.unit.conftest import Admin
from tests.unit.journal_files import append, dead

API = "/api/v1"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(at: datetime) -> int:
    d = at - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _blank(column_type: str) -> Any:
    return "" if "String" in column_type else 0


# Columns this test does not care about (the contract grows) get an empty value.
BLANK = {name: _blank(ctype) for name, ctype in CALL_LOG_SCHEMA}


def record(org: str, rid: str, at: datetime, cost: int, **kw: Any) -> dict[str, Any]:
    row = journal_files.record(rid, org_id=org, cost=cost, ts_us=micros(at), model="chat-a")
    return {**BLANK, **row, "model_served": "up-a", "provider": "prov", **kw}


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


class Feed:
    """Records into a dead engine instance's journal, then one ingestion round."""

    def __init__(self, ingestor: Ingestor, settings: Settings) -> None:
        self.ingestor = ingestor
        self.spool = settings.spool_dir
        self.segment = 0

    def __call__(self, rows: list[dict[str, Any]]) -> int:
        self.segment += 1
        append(self.spool, "statements", self.segment, rows)
        dead(self.spool, "statements")
        return self.ingestor.catch_up()


@pytest.fixture
def feed(
    state: AppState, ch_settings: Settings, ch_client: Client, admin: Admin
) -> Iterator[Feed]:
    sink = CallLogSink(ch_settings, client=ch_client)
    state.settings.ensure_dirs()
    ingestor = Ingestor(state.settings, state.session_factory, sink=sink)
    state.runtime = Runtime(sink)  # type: ignore[assignment]
    yield Feed(ingestor, state.settings)
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
    feed: Feed,
    ch_client: Client,
) -> None:
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
    assert feed(rows) == len(rows)
    # Another round (a restart with nothing new journaled) changes nothing.
    assert feed.ingestor.catch_up() == 0
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
    # Calls, not ledger rows: the four charged calls of May ("err" cost nothing).
    assert sum(line["calls"] for line in inv["lines"]) == 4
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
    client: TestClient, admin: Admin, state: AppState, feed: Feed
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    feed(
        [
            record(admin.org_id, "s1", now - timedelta(hours=1), 10, key_id="k1"),
            record(admin.org_id, "s2", now - timedelta(hours=1), 20, key_id="k2"),
            record(admin.org_id, "s3", now - timedelta(hours=1), 0, key_id="k2", status=429),
        ]
    )
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


def test_reconcile_is_exact_per_org_and_utc_day(
    state: AppState, admin: Admin, other_admin: Admin, feed: Feed, ch_client: Client
) -> None:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    org, other = admin.org_id, other_admin.org_id
    rows = [
        record(org, "rc-late", midnight - timedelta(microseconds=1), 1_000_000_001),
        record(org, "rc-early", midnight, 7),
        record(org, "rc-early2", midnight + timedelta(seconds=1), 9, key_id="key_b"),
        record(org, "rc-free", midnight + timedelta(seconds=2), 0),
        record(other, "rc-other", midnight, 5),
    ]
    feed(rows)
    start, end = midnight - timedelta(days=1), midnight + timedelta(days=1)
    mine = {org, other}  # call_log is shared by the module's tests
    with state.session_factory() as s:
        lines = [r for r in reconcile(s, ch_client, start=start, end=end) if r.org_id in mine]
    got = {(r.org_id, r.day): (r.ledger_usage, r.call_log_cost, r.ledger_calls) for r in lines}
    assert got == {
        (org, (midnight - timedelta(days=1)).date()): (1_000_000_001, 1_000_000_001, 1),
        (org, midnight.date()): (16, 16, 2),
        (other, midnight.date()): (5, 5, 1),
    }
    assert all(r.difference == 0 and r.calls_difference == 0 for r in lines)
    # A usage entry the call log does not back shows on its day, to the nano-unit.
    with state.session_factory() as s:
        usage.record_usage(
            s,
            [billing.Usage(org_id=org, entry_id="stray", cost=1, ts_us=micros(midnight), calls=1)],
        )
        s.commit()
        lines = [r for r in reconcile(s, ch_client, start=start, end=end) if r.org_id in mine]
    bad = [(r.org_id, r.day, r.difference, r.calls_difference) for r in lines if r.difference]
    assert bad == [(org, midnight.date(), 1, 1)]
