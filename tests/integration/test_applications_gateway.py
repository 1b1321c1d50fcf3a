"""Applications through a real server, driven with the openai SDK: two keys of one
application share its budget and its rate limit while a key outside it is not affected;
parallel requests never overspend the application's budget; a moved key's spend counts
for its new application from the move on; and call statistics by application in chDB
match the ledger exactly (policy XIII.3).

The tests share one server and run in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from sqlalchemy import func, select

from onetoken.billing.models import LedgerEntry
from tests.support import wait_until

from .billing_world import PASSWORD, BillingOrg, control_db, make_org, wait_for_key
from .catalog import new_key
from .harness import Admin, Server, bootstrap
from .records import org_calls

UNIT = 1_000_000_000
MSG = [{"role": "user", "content": "one two three"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mock_addr: str) -> Iterator[Server]:
    data_dir: Path = tmp_path_factory.mktemp("applications")
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


def ask(client: OpenAI) -> Any:
    return client.chat.completions.create(
        model="demo-chat", messages=MSG, max_tokens=16,  # type: ignore[arg-type]
        extra_body={"mock": {"chunks": 8}},
    )


class World:
    """An org with an application `app` holding keys k1 (moved in) and k2 (created in
    it), and k3 outside it."""

    def __init__(self, server: Server, db: Any, name: str, limits: dict[str, Any]) -> None:
        self.org: BillingOrg = make_org(db, name, balance=1000 * UNIT)
        self.admin = Admin(server, self.org.owner_email, PASSWORD)
        self.app = self.admin.post("/api/v1/applications", {"name": "crm", "limits": limits})
        r = self.admin.http.patch(f"/api/v1/keys/{self.org.key_id}",
                                  json={"application_id": self.app["id"]})
        assert r.status_code == 200, r.text
        self.k1 = self.org.key
        self.k2_id, self.k2 = new_key(self.admin, "k2", application_id=self.app["id"])
        self.k3_id, self.k3 = new_key(self.admin, "k3")
        for key in (self.k1, self.k2, self.k3):
            wait_for_key(server, key, "demo-chat")


def ledger_by_application(db: Any, org_id: str) -> dict[str, int]:
    """Charged amount (positive) per application_id ('' for none) of the org's ledger."""
    with db.session_factory() as s:
        rows = s.execute(
            select(LedgerEntry.application_id, func.sum(LedgerEntry.amount))
            .where(LedgerEntry.org_id == org_id, LedgerEntry.kind == "usage")
            .group_by(LedgerEntry.application_id)
        ).all()
    return {str(app or ""): -int(total) for app, total in rows}


def stats_by_application(admin: Admin) -> dict[str, tuple[int, int]]:
    """call_log (chDB, FINAL) per application: (calls, cost)."""
    rows = admin.get("/api/v1/billing/call-stats", params={"group_by": "application"})["data"]
    # Money comes as a decimal string of the currency: back to exact nano-units.
    return {r["group"]: (int(r["calls"]), int(Decimal(r["cost"]) * UNIT)) for r in rows}


def chat_calls(admin: Admin) -> dict[str, int]:
    """Chat calls per application_id of the org's call_log rows."""
    out: dict[str, int] = {}
    for r in org_calls(admin):
        if r["path"] == "/v1/chat/completions":
            out[r["application_id"]] = out.get(r["application_id"], 0) + 1
    return out


def settled(admin: Admin, db: Any, org_id: str, calls: int) -> dict[str, int]:
    """The ledger per application once call_log holds all `calls` chat calls of the org
    and the ledger caught up with it (the same total)."""

    def same() -> dict[str, int] | None:
        # wait_for_key's /v1/models calls are in call_log too: count the chat calls.
        chats = [r for r in org_calls(admin) if r["path"] == "/v1/chat/completions"]
        if len(chats) != calls:
            return None
        stats = stats_by_application(admin)
        ledger = ledger_by_application(db, org_id)
        return ledger if sum(ledger.values()) == sum(c for _, c in stats.values()) else None

    result: dict[str, int] = wait_until(
        same, 30, 0.2,
        message=lambda: f"ledger {ledger_by_application(db, org_id)} and call_log "
        f"{stats_by_application(admin)} in step ({calls} calls)",
    )
    return result


def test_two_keys_share_the_application_budget_and_a_key_outside_is_not_affected(
    server: Server, db: Any
) -> None:
    budget = 200_000
    w = World(server, db, "AppBudget", {"budget_day": "0.0002"})
    clients = [sdk(server, w.k1), sdk(server, w.k2)]
    served = [0, 0]
    refusal = None
    for i in range(40):
        try:
            ask(clients[i % 2])
            served[i % 2] += 1
        except openai.RateLimitError as e:
            refusal = e
            break
    assert refusal is not None and served[0] >= 1 and served[1] >= 1, served
    err = refusal.response.json()["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "rate_limit_error"
    assert err["message"] == "The application's day budget is exhausted."
    assert "retry-after" in refusal.response.headers
    # The other key of the application is refused too: the budget is the application's.
    with pytest.raises(openai.RateLimitError):
        ask(clients[(i + 1) % 2])
    # A key of the same org outside the application is not affected.
    for _ in range(3):
        assert ask(sdk(server, w.k3)).choices
    ledger = settled(w.admin, db, w.org.org_id, sum(served) + 2 + 3)
    assert 0 < ledger[w.app["id"]] <= budget, ledger
    assert ledger[""] > 0


def test_two_keys_share_the_application_rate_limit(server: Server, db: Any) -> None:
    w = World(server, db, "AppRate", {"rpm": 4})
    c1, c2, c3 = sdk(server, w.k1), sdk(server, w.k2), sdk(server, w.k3)
    for client in (c1, c1, c2, c2):
        ask(client)
    for client in (c1, c2):
        with pytest.raises(openai.RateLimitError) as err:
            ask(client)
        body = err.value.response.json()["error"]
        assert body["code"] == "rate_limited"
        assert "application's requests-per-minute" in body["message"]
        assert err.value.response.headers["x-ratelimit-limit-requests"] == "4"
    for _ in range(6):
        ask(c3)


def test_parallel_requests_never_overspend_an_application_budget(
    server: Server, db: Any
) -> None:
    budget = 500_000
    w = World(server, db, "AppParallel", {"budget_day": "0.0005"})
    keys = [w.k1, w.k2]

    def one(i: int) -> int:
        try:
            ask(sdk(server, keys[i % 2]))
            return 200
        except openai.RateLimitError:
            return 429

    with ThreadPoolExecutor(max_workers=32) as pool:
        codes = list(pool.map(one, range(128)))
    assert codes.count(200) > 0 and codes.count(429) > 0, codes
    ledger = settled(w.admin, db, w.org.org_id, len(codes))
    # One gateway: reservations bound the spend, so it never passes the budget.
    assert 0 < ledger[w.app["id"]] <= budget, ledger
    # Refused calls are recorded for the application too, at no cost.
    assert chat_calls(w.admin)[w.app["id"]] == len(codes)


def test_a_moved_key_takes_its_spend_to_the_new_application_from_then_on(
    server: Server, db: Any
) -> None:
    w = World(server, db, "AppMove", {})
    other = w.admin.post("/api/v1/applications", {"name": "billing-bot"})
    client = sdk(server, w.k2)
    for _ in range(2):
        ask(client)
    before = settled(w.admin, db, w.org.org_id, 2)
    assert before.get(w.app["id"], 0) > 0 and other["id"] not in before
    r = w.admin.http.patch(f"/api/v1/keys/{w.k2_id}", json={"application_id": other["id"]})
    assert r.status_code == 200, r.text
    for _ in range(3):
        ask(client)
    after = settled(w.admin, db, w.org.org_id, 5)
    # What the key spent before the move stays with the first application.
    assert after[w.app["id"]] == before[w.app["id"]]
    assert after[other["id"]] > 0
    assert chat_calls(w.admin) == {w.app["id"]: 2, other["id"]: 3}


def test_call_stats_by_application_match_the_ledger_exactly(server: Server, db: Any) -> None:
    w = World(server, db, "AppStats", {})
    for key in (w.k1, w.k2, w.k2, w.k3, w.k3, w.k3):
        ask(sdk(server, key))
    ledger = settled(w.admin, db, w.org.org_id, 6)
    stats = stats_by_application(w.admin)
    assert {app: cost for app, (_, cost) in stats.items() if cost} == ledger
    assert chat_calls(w.admin) == {w.app["id"]: 3, "": 3}
