"""The real engine's journal through the Ingestor: every request the engine answered is
one call_log row and is charged once in the ledger, exactly as call_log says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from clickhouse_connect.driver.client import Client
from pydantic import SecretStr
from sqlalchemy import func, select

from onetoken import _core
from onetoken.analytics import queries
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.sink import CallLogSink
from onetoken.billing.models import LedgerEntry
from onetoken.billing.reconcile import reconcile
from onetoken.control import build_state
from onetoken.demo import setup_demo
from onetoken.gateway.snapshot import build_snapshot, snapshot_json
from onetoken.gateway.supervisor import engine_config
from onetoken.ingest.ingestor import Ingestor
from onetoken.ingest.marks import spent_marks
from onetoken.settings import Settings
from tests.support import TEST_SECRET

REQUESTS = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-journal")


@pytest.fixture(scope="module")
def ch_client(data_dir: Path) -> Iterator[Client]:
    client = open_client(Settings(data_dir=data_dir))
    yield client
    client.close()


def test_engine_journal_reaches_call_log_and_ledger_once(data_dir: Path, ch_client: Client) -> None:
    settings = Settings(
        data_dir=data_dir,
        secret_key=SecretStr(TEST_SECRET),
        gateway_listen="127.0.0.1:0",
        upstream_private_cidrs="127.0.0.0/8",
    )
    settings.ensure_dirs()
    state = build_state(settings)
    mock = _core.MockUpstream("127.0.0.1:0")
    demo = setup_demo(state.session_factory, state.secrets, mock.start())
    engine = _core.Engine(orjson.dumps(engine_config(settings, state.secrets)))
    address = engine.start()
    try:
        with state.session_factory() as s:
            snap = build_snapshot(s, state.secrets, version=1, spent_marks={})
        engine.load_snapshot(snapshot_json(snap))
        ids = []
        with httpx.Client(base_url=f"http://{address}", timeout=10) as http:
            for n in range(REQUESTS):
                r = http.post(
                    "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {demo.api_key}"},
                    json={"model": "demo-chat", "messages": [{"role": "user", "content": f"{n}"}]},
                )
                assert r.status_code == 200, r.text
                ids.append(r.headers["x-request-id"])
    finally:
        engine.stop(5)
        mock.stop()
    assert list(settings.spool_dir.glob("journal-*.jsonl")), "the engine journals every record"

    ingestor = Ingestor(
        settings, state.session_factory, sink=CallLogSink(settings, client=ch_client)
    )
    assert ingestor.catch_up() == REQUESTS
    assert ingestor.catch_up() == 0
    assert ingestor.bad_lines == 0
    assert queries.count_distinct_requests(ch_client, org_id=demo.org_id) == REQUESTS
    rows = queries.org_calls(ch_client, demo.org_id, limit=REQUESTS).rows
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    cost = sum(int(r["cost"]) for r in rows)
    assert cost > 0
    with state.session_factory() as s:
        calls, amount = s.execute(
            select(func.sum(LedgerEntry.calls), func.sum(LedgerEntry.amount)).where(
                LedgerEntry.org_id == demo.org_id, LedgerEntry.kind == "usage"
            )
        ).one()
        assert (int(calls), -int(amount)) == (REQUESTS, cost)
        assert spent_marks(s, engine.instance_id) == ({}, {}), "a finished instance is forgotten"
        lines = [r for r in reconcile(s, ch_client) if r.org_id == demo.org_id]
    assert lines and all(r.difference == 0 and r.calls_difference == 0 for r in lines)
    assert not list(settings.spool_dir.glob("journal-*"))
    ingestor.stop()
    state.db_engine.dispose()
