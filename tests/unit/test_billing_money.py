"""The platform's money moves only by its operators: tenants place orders, redeem codes and
read, but never credit, grant, adjust, confirm, refund or invoice themselves (unless a
private deployment hands that to its owners with ONETOKEN_TENANT_MONEY_ADMIN=true). Every
amount is bounded, and a balance stays far from the 64-bit limit its sums are kept in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient
from pydantic import SecretStr

from onetoken import _core
from onetoken.billing import orders
from onetoken.billing import service as billing
from onetoken.billing.models import LedgerEntry
from onetoken.billing.service import MAX_BALANCE_NANO, MAX_ENTRY_NANO
from onetoken.control import build_state, create_app
from onetoken.gateway.snapshot import build_snapshot, snapshot_json
from onetoken.gateway.supervisor import engine_config
from onetoken.kit.money import format_amount
from onetoken.security.permissions import ROLE_DENIED_MESSAGE
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.unit.conftest import TEST_SECRET, Admin, add_account, make_org_admin

API = "/api/v1"
UNIT = 1_000_000_000
KINDS = ("recharge", "grant", "refund", "adjustment")


def _credit(
    client: TestClient,
    headers: dict[str, str],
    amount: str,
    key: str,
    *,
    org_id: str | None = None,
    kind: str = "recharge",
) -> Any:
    body: dict[str, str] = {"amount": amount, "idempotency_key": key, "kind": kind}
    if org_id is not None:
        body["org_id"] = org_id
    return client.post(f"{API}/billing/credits", json=body, headers=headers)


def _balance(client: TestClient, headers: dict[str, str]) -> str:
    r = client.get(f"{API}/billing/balance", headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["balance"])


def _order(client: TestClient, headers: dict[str, str], amount: str = "25") -> str:
    r = client.post(
        f"{API}/billing/orders", json={"kind": "recharge", "amount": amount}, headers=headers
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_tenants_cannot_move_money_but_still_order_redeem_and_read(
    client: TestClient, state: AppState, admin: Admin, operator: Admin
) -> None:
    org_admin = add_account(state, client, admin.org_id, "admin@acme.test", "admin")
    # The owner's second account: the four-eyes check once compared account ids only.
    second = add_account(state, client, admin.org_id, "owner-again@acme.test", "billing")
    for headers in (admin.headers, org_admin, second):
        for kind in KINDS:
            r = _credit(client, headers, "1000000", f"self-{kind}", kind=kind)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["message"] == ROLE_DENIED_MESSAGE
    oid = _order(client, admin.headers)
    for headers in (admin.headers, org_admin, second):
        for action in ("confirm", "fail", "refund"):
            r = client.post(f"{API}/billing/orders/{oid}/{action}", json={}, headers=headers)
            assert r.status_code == 403, (action, r.text)
        for action in ("issue", "void"):
            r = client.post(f"{API}/billing/invoices/inv_missing/{action}", headers=headers)
            assert r.status_code == 403, (action, r.text)
    assert _balance(client, admin.headers) == "0.000000000"

    # Still the org's: placing orders, redeeming codes, cancelling an unpaid order, reading.
    with state.session_factory() as s:
        ((_, code),) = orders.create_codes(s, state.secrets, count=1, credit=2 * UNIT)
        s.commit()
    r = client.post(f"{API}/billing/redeem", json={"code": code}, headers=second)
    assert r.status_code == 201, r.text
    r = client.post(f"{API}/billing/orders/{_order(client, second)}/cancel", headers=second)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    for path in ("/billing/balance", "/billing/ledger", "/billing/orders"):
        assert client.get(f"{API}{path}", headers=second).status_code == 200

    # The operator credits the org it names (audited like every money action) and
    # confirms the transfer.
    r = _credit(client, operator.headers, "10", "op-1", org_id=admin.org_id)
    assert r.status_code == 201, r.text
    assert r.json()["entry"]["org_id"] == admin.org_id
    r = client.post(f"{API}/billing/orders/{oid}/confirm", headers=operator.headers)
    assert r.status_code == 200 and r.json()["status"] == "paid"
    assert _balance(client, admin.headers) == "37.000000000"
    assert _balance(client, operator.headers) == "0.000000000"
    # An unknown org is refused, not credited.
    r = _credit(client, operator.headers, "1", "op-2", org_id="org_missing")
    assert r.status_code == 404


def test_tenant_money_admin_setting_hands_money_to_owners_of_their_own_org(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", secret_key=SecretStr(TEST_SECRET), tenant_money_admin=True
    )
    state = build_state(settings)
    try:
        with TestClient(create_app(settings, state=state)) as client:
            owner = make_org_admin(state, client, "Solo", "owner@solo.test")
            other = make_org_admin(state, client, "Other", "owner@other.test")
            org_admin = add_account(state, client, owner.org_id, "admin@solo.test", "admin")
            billing_role = add_account(state, client, owner.org_id, "bill@solo.test", "billing")
            second_owner = add_account(state, client, owner.org_id, "owner2@solo.test", "owner")

            assert _credit(client, owner.headers, "10", "k1").status_code == 201
            assert _balance(client, owner.headers) == "10.000000000"
            # Only the own org, only owners.
            r = _credit(client, owner.headers, "10", "k2", org_id=other.org_id)
            assert r.status_code == 404
            assert _balance(client, other.headers) == "0.000000000"
            for headers in (org_admin, billing_role):
                assert _credit(client, headers, "10", "k3").status_code == 403
            # Four eyes still: another owner confirms the order an owner placed.
            oid = _order(client, owner.headers)
            r = client.post(f"{API}/billing/orders/{oid}/confirm", headers=owner.headers)
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "separation_of_duties"
            r = client.post(f"{API}/billing/orders/{oid}/confirm", headers=other.headers)
            assert r.status_code == 404
            r = client.post(f"{API}/billing/orders/{oid}/confirm", headers=second_owner)
            assert r.status_code == 200 and r.json()["status"] == "paid"
            assert _balance(client, owner.headers) == "35.000000000"
    finally:
        state.db_engine.dispose()


def test_every_amount_is_bounded_and_a_balance_stays_far_from_int64(
    client: TestClient, state: AppState, admin: Admin, operator: Admin
) -> None:
    assert MAX_BALANCE_NANO * 9 < 2**63 - 1  # the documented margin
    # Ten credits of 10^18 nano-units overflowed SUM(amount) before; each is refused now.
    for i in range(10):
        r = _credit(client, operator.headers, "1000000000", f"big-{i}", org_id=admin.org_id)
        assert r.status_code == 422, r.text
    over = format_amount(MAX_ENTRY_NANO + 1)
    for kind in KINDS:
        amount = "-" + over if kind == "adjustment" else over
        r = _credit(client, operator.headers, amount, f"over-{kind}", org_id=admin.org_id,
                    kind=kind)
        assert r.status_code == 422, (kind, r.text)
    r = client.post(f"{API}/billing/orders", json={"kind": "recharge", "amount": over},
                    headers=admin.headers)
    assert r.status_code == 422
    # The per-entry maximum is accepted, until the balance would pass its ceiling.
    top = format_amount(MAX_ENTRY_NANO)
    for i in range(MAX_BALANCE_NANO // MAX_ENTRY_NANO):
        r = _credit(client, operator.headers, top, f"max-{i}", org_id=admin.org_id)
        assert r.status_code == 201, r.text
    r = _credit(client, operator.headers, "0.000000001", "one-more", org_id=admin.org_id)
    assert r.status_code == 422 and r.json()["error"]["code"] == "balance_limit"
    r = client.post(f"{API}/billing/orders", json={"kind": "recharge", "amount": "1"},
                    headers=admin.headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "balance_limit"
    assert _balance(client, admin.headers) == format_amount(MAX_BALANCE_NANO)
    with state.session_factory() as s:
        snap = build_snapshot(s, state.secrets, version=1, spent_marks={})
    assert {o["id"]: o["balance"] for o in snap["orgs"]}[admin.org_id] == MAX_BALANCE_NANO
    # The same ceiling below zero, for negative adjustments.
    for i in range(2 * MAX_BALANCE_NANO // MAX_ENTRY_NANO):
        r = _credit(client, operator.headers, "-" + top, f"down-{i}", org_id=admin.org_id,
                    kind="adjustment")
        assert r.status_code == 201, r.text
    r = _credit(client, operator.headers, "-0.000000001", "one-less", org_id=admin.org_id,
                kind="adjustment")
    assert r.status_code == 422 and r.json()["error"]["code"] == "balance_limit"
    assert _balance(client, admin.headers) == format_amount(-MAX_BALANCE_NANO)


def test_a_ledger_that_overflowed_before_the_bounds_still_builds_a_snapshot(
    client: TestClient, settings: Settings, state: AppState, admin: Admin, other_admin: Admin
) -> None:
    # Written straight into the table, as the unbounded API once let a tenant do.
    with state.session_factory() as s:
        for i in range(10):
            s.add(LedgerEntry(org_id=admin.org_id, kind="grant", amount=10**18,
                              idempotency_key=f"legacy-{i}"))
        s.add(LedgerEntry(org_id=other_admin.org_id, kind="recharge", amount=5 * UNIT,
                          idempotency_key="legacy-other"))
        s.commit()
    with state.session_factory() as s:
        assert billing.balances(s) == {
            admin.org_id: MAX_BALANCE_NANO,
            other_admin.org_id: 5 * UNIT,
        }
        assert billing.balance(s, admin.org_id) == MAX_BALANCE_NANO
        snap = build_snapshot(s, state.secrets, version=1, spent_marks={})
    got = {o["id"]: o["balance"] for o in snap["orgs"]}
    assert got[admin.org_id] == MAX_BALANCE_NANO and got[other_admin.org_id] == 5 * UNIT
    assert _balance(client, admin.headers) == format_amount(MAX_BALANCE_NANO)
    # And the engine takes it.
    engine = _core.Engine(
        orjson.dumps({**engine_config(settings, state.secrets), "listen": "127.0.0.1:0"})
    )
    engine.start()
    try:
        assert engine.load_snapshot(snapshot_json(snap)) == 1
    finally:
        engine.stop(1.0)
