"""Orgs, accounts, keys and money for billing tests, written straight into a deployment's
control DB from the test process (the running server picks changes up within a second,
as it does for the CLI), plus the cost arithmetic the engine applies."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from onetoken.billing import service as billing
from onetoken.control import build_state
from onetoken.orgs import service as orgs
from onetoken.settings import Settings
from onetoken.state import AppState
from tests import builders as build
from tests.support import wait_until

from .harness import Server

PASSWORD = "billing test password 1"


@contextmanager
def control_db(data_dir: Path) -> Iterator[AppState]:
    state = build_state(Settings(data_dir=data_dir))
    try:
        yield state
    finally:
        state.db_engine.dispose()


@dataclass
class BillingOrg:
    org_id: str
    key: str
    key_id: str
    owner_email: str
    billing_email: str


def make_org(
    state: AppState, name: str, *, balance: int, mock_addr: str | None = None, **model: Any
) -> BillingOrg:
    """An org with an owner, a billing admin, an API key and `balance` nano-units of
    credit; with `mock_addr`, also a provider and model `<name>-chat` on the fake
    upstream. Those are the platform's: the fake upstream is on loopback, which an org's
    own provider may never reach."""
    tag = name.lower()
    with state.session_factory() as s:
        org, owner = build.org_with_owner(s, name, f"owner@{tag}.test", PASSWORD)
        orgs.create_account(s, org.id, f"billing@{tag}.test", PASSWORD, "billing")
        if mock_addr is not None:
            prov = build.provider(
                s, state.secrets, None, name=f"{tag}-up", base_url=f"http://{mock_addr}/v1"
            )
            build.model(s, None, prov, f"{tag}-chat", **model)
        key, plaintext = build.api_key(s, state.secrets, org, owner, "billing test")
        if balance:
            billing.credit(s, org.id, amount=balance, kind="grant", idempotency_key="seed")
        s.commit()
        return BillingOrg(org.id, plaintext, key.id, f"owner@{tag}.test", f"billing@{tag}.test")


def wait_for_key(server: Server, key: str, model: str, timeout: float = 15.0) -> None:
    """Until the gateway's snapshot knows the key and lets it see `model`."""

    def live() -> bool:
        r = httpx.get(
            f"{server.gateway_url}/v1/models",
            headers={"Authorization": f"Bearer {key}"},
            timeout=5,
        )
        return r.status_code == 200 and model in {m["id"] for m in r.json()["data"]}

    wait_until(live, timeout, 0.1, message=f"key live for {model}")


def cost(tokens: int, price: int, factor_ppm: int = 1_000_000) -> int:
    """The engine's rounding: ceil(tokens * price * factor / 10^12), per part."""
    return -((-tokens * price * factor_ppm) // 10**12)


def ledger_usage(state: AppState, org_id: str) -> tuple[int, int]:
    """(calls, charged amount, positive) from the org's ledger usage entries: aggregated
    per org, key, model and UTC day of an ingested batch, so per-request cost is
    call_log's and the ledger must add up to it."""
    from sqlalchemy import func, select

    from onetoken.billing.models import LedgerEntry

    with state.session_factory() as s:
        calls, amount = s.execute(
            select(
                func.coalesce(func.sum(LedgerEntry.calls), 0),
                func.coalesce(func.sum(LedgerEntry.amount), 0),
            ).where(LedgerEntry.org_id == org_id, LedgerEntry.kind == "usage")
        ).one()
    return int(calls), -int(amount)


def charged_calls(rows: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """(calls, cost) of call_log rows that were charged: what the ledger must hold."""
    costs = [int(r["cost"]) for r in rows if int(r["cost"]) > 0]
    return len(costs), sum(costs)


def balance(state: AppState, org_id: str) -> int:
    with state.session_factory() as s:
        return billing.balance(s, org_id)
