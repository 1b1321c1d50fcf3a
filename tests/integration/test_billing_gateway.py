"""Money through a real server: the openai SDK's 402, prices changed mid-traffic, budgets,
and hundreds of concurrent requests (streaming and not, cut mid-stream, clients that go
away) against balances that run out, checked against the documented overspend bound, the
ledger, call_log and `onetoken billing reconcile`.

The tests share one server and run in file order; the last one stops it to reconcile.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import select

from onetoken import _core
from onetoken.billing import prices as price_book
from onetoken.providers.models import Model
from tests.support import wait_until

from .billing_world import (
    PASSWORD,
    BillingOrg,
    balance,
    charged_calls,
    control_db,
    cost,
    ledger_usage,
    make_org,
    wait_for_key,
)
from .harness import Admin, Server, bootstrap, cli
from .records import exported_calls, org_calls, reconcile, wait_for_calls

UNIT = 1_000_000_000
# demo-chat's output price (platform catalog of --demo), nano-units per million tokens.
DEMO_OUT = UNIT * 3 // 2

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mock_addr: str) -> Iterator[Server]:
    data_dir: Path = tmp_path_factory.mktemp("billing")
    bootstrap(data_dir)
    srv = Server(data_dir=data_dir, upstream=mock_addr)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def db(server: Server) -> Iterator[Any]:
    with control_db(server.data_dir) as state:
        yield state


def sdk(server: Server, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.gateway_url}/v1", api_key=key, max_retries=0)


def chat(server: Server, key: str, model: str, **mock: Any) -> httpx.Response:
    return httpx.post(
        f"{server.gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": "one two three"}],
            "mock": mock,
        },
        timeout=30,
    )


# -- 402 through the official SDK ------------------------------------------------------


def test_openai_sdk_sees_an_openai_shaped_402(
    server: Server, db: Any, mock_upstream: tuple[_core.MockUpstream, str]
) -> None:
    org = make_org(db, "Broke", balance=0)
    wait_for_key(server, org.key, "demo-chat")
    mock = mock_upstream[0]
    before = mock.request_count()
    client = sdk(server, org.key)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hello"}]
        )
    e = err.value
    assert e.status_code == 402
    body = e.response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "insufficient_balance"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "balance" in body["error"]["message"].lower()
    with pytest.raises(openai.APIStatusError) as err:
        stream = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        list(stream)
    assert err.value.status_code == 402
    assert mock.request_count() == before, "a refused request must not reach the upstream"
    assert balance(db, org.org_id) == 0


# -- price changes -----------------------------------------------------------------------


def test_price_change_bills_each_request_at_the_price_in_force(
    server: Server, db: Any, mock_addr: str
) -> None:
    p1 = (2 * UNIT, 6 * UNIT)
    org = make_org(
        db,
        "Pricey",
        balance=1000 * UNIT,
        mock_addr=mock_addr,
        input_price=p1[0],
        output_price=p1[1],
        max_output_tokens=64,
    )
    model = "pricey-chat"
    wait_for_key(server, org.key, model)
    with db.session_factory() as s:
        model_id = s.scalars(select(Model.id).where(Model.name == model)).one()
    admin = Admin(server, org.owner_email, PASSWORD)
    prompt, out = 1234, 7

    def expected(prices: tuple[int, int], factor: int = 1_000_000) -> int:
        return cost(prompt, prices[0], factor) + cost(out, prices[1], factor)

    def send(n: int) -> list[tuple[str, int]]:
        sent = []
        for _ in range(n):
            r = chat(server, org.key, model, prompt_tokens=prompt, chunks=out)
            assert r.status_code == 200, r.text
            sent.append((r.headers["x-request-id"], int(time.time() * 1_000_000)))
        return sent

    def price(new: tuple[int, int], effective_from: datetime | None = None) -> None:
        # A platform model: the operator prices it (what `onetoken billing price` does).
        with db.session_factory() as s:
            price_book.add_version(
                s,
                None,
                model_id,
                price_book.Prices(
                    input_price=new[0], output_price=new[1], cached_input_price=new[0]
                ),
                effective_from=effective_from,
            )
            s.commit()

    before = send(3)
    p2 = (3_500_000_000, 7_250_000_000)
    price(p2)
    # The change reaches the gateway with the next snapshot push; from then on every
    # request is charged the new price.
    wait_until(lambda: wait_for_calls(admin, {send(1)[0][0]})[0]["cost"] == expected(p2), 10,
               message="the new price charged")
    after = send(3)
    # A version scheduled a few seconds ahead: old price until then, new price after.
    p3 = (UNIT, UNIT)
    effective = datetime.now(UTC) + timedelta(seconds=3)
    price(p3, effective)
    around: list[tuple[str, int]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        around += send(1)
        # Paced traffic across the scheduled instant is what is under test, not a wait.
        time.sleep(0.2)
        if datetime.now(UTC) > effective + timedelta(seconds=4):
            break
    ids = {rid for rid, _ in before + after + around}
    rows = {r["request_id"]: r for r in wait_for_calls(admin, ids)}
    for rid, _ in before:
        assert rows[rid]["cost"] == expected(p1)
    for rid, _ in after:
        assert rows[rid]["cost"] == expected(p2)
    eff_us = int(effective.timestamp() * 1_000_000)
    seen = set()
    for rid, _ in around:
        row = rows[rid]
        assert row["cost"] in (expected(p2), expected(p3)), row["cost"]
        new_price = row["cost"] == expected(p3)
        seen.add(new_price)
        if new_price:
            # Never charged at a price before it took effect...
            assert row["ts"] >= eff_us
        elif row["ts"] >= eff_us + 2_500_000:
            # ...and in force within the upkeep interval plus one snapshot push.
            raise AssertionError("the scheduled price did not take effect in time")
    assert seen == {False, True}
    # The books say the same (every call of the org, the price probes included), and
    # nothing earlier was rewritten.
    wait_until(lambda: ledger_usage(db, org.org_id) == charged_calls(org_calls(admin)), 15, 0.1,
               message="the ledger adding up to call_log")
    with db.session_factory() as s:
        history = price_book.list_versions(s, None, model_id)
        assert [v.input_price for v in history] == [UNIT, p2[0]]

    # The operator's org discount (20% off), applied by the engine per part.
    cli(server.data_dir, "billing", "price-factor", "--org", org.org_id, "--ppm", "800000")

    def factor_applied() -> bool:
        rid, _ = send(1)[0]
        charged = wait_for_calls(admin, {rid})[0]["cost"]
        assert charged in (expected(p3), expected(p3, 800_000)), charged
        return bool(charged == expected(p3, 800_000))

    wait_until(factor_applied, 10, 0.2, message="the price factor applied")


# -- budgets -----------------------------------------------------------------------------


def test_key_and_org_budgets_answer_429_before_they_are_crossed(server: Server, db: Any) -> None:
    from onetoken.keys import service as keys

    org = make_org(db, "Budgeted", balance=1000 * UNIT)
    budget = 200_000
    with db.session_factory() as s:
        keys.update_key(s, org.org_id, org.key_id, {"limits": {"budget_day": budget}})
        s.commit()
    wait_for_key(server, org.key, "demo-chat")
    codes: list[int] = []
    for _ in range(40):
        r = chat(server, org.key, "demo-chat", chunks=8)
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "budget_exceeded"
            assert "retry-after" in r.headers
            break
    assert codes[-1] == 429 and 200 in codes
    wait_until(lambda: ledger_usage(db, org.org_id)[1] >= 1, 10, 0.1,
               message="the budgeted key's usage in the ledger")
    assert 0 < ledger_usage(db, org.org_id)[1] <= budget

    admin = Admin(server, org.owner_email, PASSWORD)
    r = admin.http.patch("/api/v1/billing/settings", json={"budget_day": "0.0000001"})
    assert r.status_code == 200, r.text
    with db.session_factory() as s:
        keys.update_key(s, org.org_id, org.key_id, {"limits": {"budget_day": None}})
        s.commit()
    refused = wait_until(
        lambda: (r := chat(server, org.key, "demo-chat", chunks=1)).status_code == 429 and r,
        10,
        0.2,
        message="the org budget enforced",
    )
    assert refused.json()["error"]["code"] == "budget_exceeded"


# -- concurrency -----------------------------------------------------------------------------

ORGS = 4
PER_ORG = 100
THREADS = 64
SEED_BALANCE = 1_500_000
OVER_PROMPT = 400  # upstream-reported prompt tokens far above the gateway's estimate
MAX_TOKENS = 16


_local = threading.local()


def _http() -> httpx.Client:
    # One client per thread: building one per request costs more than the request.
    if not hasattr(_local, "http"):
        _local.http = httpx.Client(timeout=60)
    return _local.http  # type: ignore[no-any-return]


def _one_request(server: Server, key: str, i: int) -> tuple[str, str, int]:
    """One request of kind i % 5; returns (request id, kind, client-seen status)."""
    kind = ("json", "stream_usage", "stream_cut", "disconnect", "stream_plain")[i % 5]
    mock: dict[str, Any] = {"chunks": 8, "delay_ms": 3}
    if i % 10 in (0, 1):  # json or streamed with usage: the upstream reports the overrun
        if random.random() < 0.5:  # noqa: S311 (a traffic mix, not a secret)
            mock["prompt_tokens"] = OVER_PROMPT
    body: dict[str, Any] = {
        "model": "demo-chat",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": f"request number {i} for billing"}],
        "mock": mock,
    }
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{server.gateway_url}/v1/chat/completions"
    http = _http()
    if kind == "json":
        r = http.post(url, json=body, headers=headers)
        return r.headers["x-request-id"], kind, r.status_code
    body["stream"] = True
    if kind == "stream_usage":
        body["stream_options"] = {"include_usage": True}
    if kind == "stream_cut":
        mock["cut_after"] = 3
    with http.stream("POST", url, json=body, headers=headers) as r:
        rid = r.headers["x-request-id"]
        if r.status_code != 200:
            r.read()
            return rid, kind, r.status_code
        lines = 0
        try:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines += 1
                if kind == "disconnect" and lines >= 2:
                    break  # closing an unread response drops its connection mid-stream
        except httpx.HTTPError:
            pass  # a cut stream may end with a transport error
        return rid, kind, 200


def test_concurrent_traffic_stays_within_the_overspend_bound(server: Server, db: Any) -> None:
    random.seed(4)
    orgs = [make_org(db, f"Load{n}", balance=SEED_BALANCE) for n in range(ORGS)]
    for org in orgs:
        wait_for_key(server, org.key, "demo-chat")
    jobs = [(org, i) for i in range(PER_ORG) for org in orgs]
    results: dict[str, list[tuple[str, str, int]]] = {o.org_id: [] for o in orgs}
    lock = threading.Lock()

    def run(job: tuple[BillingOrg, int]) -> None:
        org, i = job
        out = _one_request(server, org.key, i)
        with lock:
            results[org.org_id].append(out)

    started = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, jobs))
    elapsed = time.monotonic() - started

    for org in orgs:
        sent = results[org.org_id]
        statuses = [s for _, _, s in sent]
        assert statuses.count(402) > 0, "the balance should have run out partway"
        assert statuses.count(200) > 0
        assert set(statuses) <= {200, 402}, statuses
        admin = Admin(server, org.owner_email, PASSWORD)
        rows = {r["request_id"]: r for r in wait_for_calls(admin, {rid for rid, _, _ in sent})}
        for rid, kind, status in sent:
            row = rows[rid]
            if status == 402:
                assert row["status"] == 402 and row["cost"] == 0
            if kind == "disconnect" and status == 200:
                assert row["status"] in (200, 499)
            if kind == "stream_cut" and status == 200:
                assert row["error_code"] == "upstream_stream_cut"
                assert row["usage_source"] == "estimated" and row["cost"] > 0
        # The ledger holds each charged request exactly once, at call_log's cost.
        charged = {rid: r["cost"] for rid, r in rows.items() if r["cost"] > 0}
        totals = charged_calls(rows.values())
        wait_until(partial(_ledger_holds, db, org.org_id, totals), 15, 0.1,
                   message="the ledger holding each charged request once")
        # The documented bound: only upstream usage above the reservation can overspend,
        # and a reservation covers at least MAX_TOKENS of output at the output price.
        reserved_at_least = cost(MAX_TOKENS, DEMO_OUT)
        bound = sum(max(0, c - reserved_at_least) for c in charged.values())
        final = balance(db, org.org_id)
        assert final == SEED_BALANCE - sum(charged.values())
        assert final >= -bound, (final, bound)
        print(
            f"org {org.org_id}: {statuses.count(200)} ok, {statuses.count(402)} refused, "
            f"final balance {final}, bound {-bound}"
        )
    print(f"{ORGS * PER_ORG} requests with {THREADS} clients in {elapsed:.1f}s")


def _ledger_holds(db: Any, org_id: str, totals: tuple[int, int]) -> bool:
    return ledger_usage(db, org_id) == totals


CHOICES = 8
CHOICE_CAP = 16  # the deployment's max_output_tokens


def test_n_choices_without_max_tokens_stay_within_the_overspend_bound(
    server: Server, db: Any, mock_addr: str
) -> None:
    """Pass-through chat with n = 8 and no max_tokens, against a balance that runs out:
    each request reserves n outputs at the deployment's cap and the upstream is asked for
    no more, so with output-only prices the balance never goes below zero."""
    per_request = cost(CHOICES * CHOICE_CAP, DEMO_OUT)
    seed = 5 * per_request + per_request // 2
    org = make_org(db, "Choices", balance=seed, mock_addr=mock_addr, input_price=0,
                   output_price=DEMO_OUT, cached_input_price=0, max_output_tokens=CHOICE_CAP)
    wait_for_key(server, org.key, "choices-chat")
    body = {
        "model": "choices-chat",
        "n": CHOICES,
        "messages": [{"role": "user", "content": "many answers please"}],
        # Unbounded, the fake provider would write 100 tokens per choice.
        "mock": {"chunks": 100, "delay_ms": 2},
    }

    def one(_: int) -> tuple[str, int]:
        r = _http().post(f"{server.gateway_url}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {org.key}"})
        if r.status_code == 200:
            assert len(r.json()["choices"]) == CHOICES
        return r.headers["x-request-id"], r.status_code

    with ThreadPoolExecutor(8) as pool:
        sent = list(pool.map(one, range(24)))
    statuses = [s for _, s in sent]
    assert statuses.count(402) > 0 and statuses.count(200) > 0, statuses
    assert set(statuses) <= {200, 402}, statuses
    admin = Admin(server, org.owner_email, PASSWORD)
    rows = wait_for_calls(admin, {rid for rid, _ in sent})
    for row in rows:
        if row["status"] == 200:
            assert row["completion_tokens"] == CHOICES * CHOICE_CAP, row
            assert row["cost"] == per_request
    charged = sum(r["cost"] for r in rows)
    wait_until(lambda: balance(db, org.org_id) == seed - charged, 15, 0.1,
               message="the balance charged for every request")
    final = balance(db, org.org_id)
    assert final == seed - charged
    assert final >= 0, final


# -- last: stop the server and reconcile -------------------------------------------------


def test_reconcile_reports_zero_difference_after_all_of_it(server: Server, db: Any) -> None:
    assert server.stop() == 0
    code, lines = reconcile(server.data_dir)
    assert code == 0, lines
    assert lines and all(x["difference"] == 0 for x in lines)
    rows = exported_calls(server.data_dir)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a request recorded twice"
    total_cost = sum(int(r["cost"]) for r in rows)
    assert sum(x["ledger_usage"] for x in lines) == total_cost > 0
    assert not list((server.data_dir / "spool").glob("journal-*.jsonl")), "journal left behind"
