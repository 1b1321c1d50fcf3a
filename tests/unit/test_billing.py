"""Billing on a real control DB: ledger kinds, packages, price versions, budgets in the
snapshot, orders and their state machine, redemption codes, refunds, events, and the API's
role and org checks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from onetoken.billing import budgets, orders, packages, prices
from onetoken.billing import service as billing
from onetoken.billing import usage as ledger_usage
from onetoken.billing.models import (
    LedgerEntry,
    Order,
    OrderEvent,
    PackageConsumption,
    RedemptionCode,
)
from onetoken.billing.upkeep import BillingUpkeep
from onetoken.gateway.snapshot import build_snapshot
from onetoken.keys import service as keys
from onetoken.kit.errors import Conflict, NotFound, Unprocessable
from onetoken.security.permissions import ROLE_DENIED_MESSAGE
from onetoken.state import AppState
from tests import builders as build
from tests.unit.batches import summarize
from tests.unit.conftest import Admin, add_account

API = "/api/v1"
UNIT = 1_000_000_000
US = 1_000_000  # microseconds per second


@dataclass
class World:
    org: str
    other: str
    owner: str
    model: str
    key: str
    other_key: str


@pytest.fixture
def world(state: AppState) -> World:
    with state.session_factory() as s:
        a, owner = build.org_with_owner(s, "A", "own@a.test")
        b, owner_b = build.org_with_owner(s, "B", "own@b.test")
        prov = build.provider(s, state.secrets, a.id)
        model = build.model(s, a.id, prov, "a-chat", input_price=UNIT, output_price=2 * UNIT)
        key, _ = build.api_key(s, state.secrets, a, owner)
        key_b, _ = build.api_key(s, state.secrets, b, owner_b)
        s.commit()
        return World(a.id, b.id, owner.id, model.id, key.id, key_b.id)


def usage(
    org: str, eid: str, cost: int, at: datetime, key: str = "", model: str = "m", calls: int = 1
) -> Any:
    ts = int((at - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * US)
    return billing.Usage(
        org_id=org, entry_id=eid, cost=cost, ts_us=ts, key_id=key, model=model, calls=calls
    )


def ledger(state: AppState, org: str) -> list[tuple[str, int]]:
    with state.session_factory() as s:
        return [
            (e.kind, e.amount)
            for e in s.scalars(
                select(LedgerEntry).where(LedgerEntry.org_id == org).order_by(LedgerEntry.id)
            )
        ]


def bal(state: AppState, org: str) -> int:
    with state.session_factory() as s:
        return billing.balance(s, org)


# -- ledger ----------------------------------------------------------------------------------


def test_usage_is_idempotent_and_keeps_key_model_and_exact_time(
    state: AppState, world: World
) -> None:
    at = datetime(2024, 5, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    u = usage(world.org, "batch-1", 123, at, key=world.key, model="a-chat", calls=3)
    with state.session_factory() as s:
        assert ledger_usage.record_usage(s, [u, u]) == [u]
        s.commit()
        assert ledger_usage.record_usage(s, [u]) == []
        s.commit()
        entry = s.scalars(
            select(LedgerEntry).where(LedgerEntry.idempotency_key == "usage:batch-1")
        ).one()
    assert (entry.kind, entry.amount, entry.key_id, entry.model, entry.calls) == (
        "usage",
        -123,
        world.key,
        "a-chat",
        3,
    )
    # Per-request cost lives in call_log; an aggregated entry names no request.
    assert entry.request_id is None
    # The last microsecond of May stays in May (a float timestamp would round it into June).
    assert entry.created_at == at
    assert bal(state, world.org) == -123


def test_every_ledger_kind_sums_into_the_balance(state: AppState, world: World) -> None:
    now = datetime.now(UTC)
    with state.session_factory() as s:
        billing.credit(s, world.org, amount=10 * UNIT, kind="recharge", idempotency_key="r1")
        billing.credit(s, world.org, amount=-UNIT, kind="adjustment", idempotency_key="a1")
        packages.grant_package(
            s, world.org, credit=5 * UNIT, validity_days=30, idempotency_key="p1", now=now
        )
        ledger_usage.record_usage(s, [usage(world.org, "u1", 2 * UNIT, now)])
        s.commit()
    kinds = ledger(state, world.org)
    assert [k for k, _ in kinds] == ["recharge", "adjustment", "package_grant", "usage"]
    assert bal(state, world.org) == 10 * UNIT - UNIT + 5 * UNIT - 2 * UNIT


# -- packages ------------------------------------------------------------------------------


def test_package_is_spent_first_and_its_rest_expires(state: AppState, world: World) -> None:
    t0 = datetime.now(UTC) - timedelta(days=2)
    with state.session_factory() as s:
        billing.credit(s, world.org, amount=100, kind="recharge", idempotency_key="r")
        pkg = packages.grant_package(
            s, world.org, credit=50, validity_days=1, idempotency_key="p", now=t0
        )
        # 30 while the package is valid: all from the package; 40 more: 20 from the
        # package, 20 from the prepaid balance; one after it lapsed: prepaid only.
        ledger_usage.record_usage(s, [usage(world.org, "a", 30, t0 + timedelta(hours=1))])
        ledger_usage.record_usage(s, [usage(world.org, "b", 40, t0 + timedelta(hours=2))])
        ledger_usage.record_usage(s, [usage(world.org, "c", 7, t0 + timedelta(days=1, hours=1))])
        s.commit()
        consumed = dict(
            s.execute(select(PackageConsumption.request_id, PackageConsumption.amount)).all()
        )
        assert consumed == {"a": 30, "b": 20}
        assert packages.package_credit(s, world.org) == 0
        s.refresh(pkg)
        assert pkg.remaining == 0
    assert bal(state, world.org) == 100 + 50 - 77


def test_expiry_takes_off_only_what_is_left_once(state: AppState, world: World) -> None:
    t0 = datetime.now(UTC) - timedelta(days=2)
    with state.session_factory() as s:
        packages.grant_package(
            s, world.org, credit=50, validity_days=1, idempotency_key="p", now=t0
        )
        ledger_usage.record_usage(s, [usage(world.org, "a", 12, t0 + timedelta(minutes=5))])
        s.commit()
        assert packages.package_credit(s, world.org) == 38
        assert packages.expire_due(s) == [(world.org, 38)]
        s.commit()
        assert packages.expire_due(s) == []
        s.commit()
        assert packages.package_credit(s, world.org) == 0
    assert ledger(state, world.org)[-1] == ("expiry", -38)
    assert bal(state, world.org) == 0


# -- prices --------------------------------------------------------------------------------


def test_price_versions_apply_when_due_and_keep_history(state: AppState, world: World) -> None:
    now = datetime.now(UTC)
    p = prices.Prices(input_price=3 * UNIT, output_price=4 * UNIT, cached_input_price=UNIT)
    later = prices.Prices(input_price=5 * UNIT, output_price=6 * UNIT, cached_input_price=UNIT)
    with state.session_factory() as s:
        prices.add_version(s, world.org, world.model, p, now=now)
        prices.add_version(
            s, world.org, world.model, later, effective_from=now + timedelta(hours=1), now=now
        )
        s.commit()
        snap = _snapshot(state, s)
        model = next(m for m in snap["models"] if m["name"] == "a-chat")
        assert (model["input_price"], model["output_price"]) == (3 * UNIT, 4 * UNIT)
        assert prices.next_change_at(s, now) == now + timedelta(hours=1)
        assert prices.apply_due(s, now + timedelta(minutes=59)) == 0
        assert prices.apply_due(s, now + timedelta(hours=1)) == 1
        s.commit()
        snap = _snapshot(state, s)
        model = next(m for m in snap["models"] if m["name"] == "a-chat")
        assert (model["input_price"], model["output_price"]) == (5 * UNIT, 6 * UNIT)
        history = prices.list_versions(s, world.org, world.model)
        assert [v.input_price for v in history] == [5 * UNIT, 3 * UNIT]
        with pytest.raises(Unprocessable):
            prices.add_version(
                s, world.org, world.model, p, effective_from=now - timedelta(hours=1)
            )
        with pytest.raises(NotFound):
            prices.add_version(s, world.other, world.model, p)


def test_unit_prices_are_versioned_like_token_prices(state: AppState, world: World) -> None:
    now = datetime.now(UTC)
    first = prices.Prices(input_price=0, output_price=0, cached_input_price=0).with_units(
        {"1024x1024/hd": 8 * UNIT, "default": 2 * UNIT}, search_unit_price=UNIT // 500
    )
    later = prices.Prices(input_price=0, output_price=0, cached_input_price=0).with_units(
        {"default": 3 * UNIT}, character_price=15 * UNIT, audio_second_price=UNIT // 10_000
    )
    with state.session_factory() as s:
        prices.add_version(s, world.org, world.model, first, now=now)
        prices.add_version(
            s, world.org, world.model, later, effective_from=now + timedelta(hours=1), now=now
        )
        s.commit()
        model = next(m for m in _snapshot(state, s)["models"] if m["name"] == "a-chat")
        assert model["image_prices"] == {"1024x1024/hd": 8 * UNIT, "default": 2 * UNIT}
        assert model["search_unit_price"] == UNIT // 500
        assert "character_price" not in model and "audio_second_price" not in model
        assert prices.apply_due(s, now + timedelta(hours=1)) == 1
        s.commit()
        model = next(m for m in _snapshot(state, s)["models"] if m["name"] == "a-chat")
        assert model["image_prices"] == {"default": 3 * UNIT}
        assert "search_unit_price" not in model
        assert (model["character_price"], model["audio_second_price"]) == (
            15 * UNIT, UNIT // 10_000
        )
        history = prices.list_versions(s, world.org, world.model)
        assert [v.image_prices for v in history] == [
            {"default": 3 * UNIT}, {"1024x1024/hd": 8 * UNIT, "default": 2 * UNIT}
        ]
        negative = first.with_units({"default": -1})
        with pytest.raises(Unprocessable) as bad:
            prices.add_version(
                s, world.org, world.model, negative, effective_from=now + timedelta(hours=2)
            )
        assert bad.value.param == "image_prices"


def _snapshot(
    state: AppState,
    s: Any,
    marks: dict[str, int] | None = None,
    keys_: dict[str, int] | None = None,
) -> dict[str, Any]:
    return build_snapshot(
        s, state.secrets, version=1, spent_marks=marks or {}, key_spent_marks=keys_ or {}
    )


# -- budgets and factors in the snapshot -------------------------------------------------


def test_snapshot_carries_budgets_usage_and_factor_only_when_set(
    state: AppState, world: World
) -> None:
    now = datetime.now(UTC)
    with state.session_factory() as s:
        snap = _snapshot(state, s)
        for org in snap["orgs"]:
            assert not {"limits", "usage", "price_factor_ppm"} & set(org) or "limits" in org
            assert "usage" not in org and "price_factor_ppm" not in org
        budgets.update_org_settings(s, world.org, budget_day=10 * UNIT, price_factor_ppm=900_000)
        keys.update_key(s, world.org, world.key, {"limits": {"budget_month": 3 * UNIT}})
        yesterday = now - timedelta(days=1)
        ledger_usage.record_usage(
            s,
            [
                usage(world.org, "t1", 100, now, key=world.key),
                usage(world.org, "t2", 50, now, key=""),
                usage(world.org, "y1", 7, yesterday, key=world.key),
            ],
        )
        s.commit()
        snap = _snapshot(state, s, {world.org: 42}, {world.key: 40})
    org = next(o for o in snap["orgs"] if o["id"] == world.org)
    window = budgets.Window.at(now)
    same_month = yesterday.month == now.month
    assert org["price_factor_ppm"] == 900_000
    assert org["limits"]["budget_day"] == 10 * UNIT and org["limits"]["budget_month"] is None
    assert org["usage"] == {
        "day": window.day,
        "month": window.month,
        "spent_day": 150,
        "spent_month": 150 + (7 if same_month else 0),
        "spent_mark": 42,
    }
    assert org["usage"]["spent_mark"] == org["spent_mark"]
    key = next(k for k in snap["keys"] if k["key_id"] == world.key)
    assert key["limits"]["budget_month"] == 3 * UNIT  # the key's own limit (onetoken.keys)
    assert key["usage"]["spent_day"] == 100 and key["usage"]["spent_mark"] == 40
    other = next(o for o in snap["orgs"] if o["id"] == world.other)
    assert "usage" not in other and "price_factor_ppm" not in other


# -- orders ----------------------------------------------------------------------------------

ALL = ("created", "paid", "failed", "refunded", "cancelled")


@pytest.mark.parametrize("start", ALL)
@pytest.mark.parametrize("target", ("paid", "failed", "cancelled"))
def test_order_state_machine_rejects_illegal_moves(
    state: AppState, world: World, start: str, target: str
) -> None:
    with state.session_factory() as s:
        o = orders.create_order(
            s, world.org, kind="recharge", currency="USD", amount=UNIT, created_by=None
        )
        o.status = start
        s.commit()
        move = {"paid": orders.mark_paid, "failed": orders.mark_failed, "cancelled": orders.cancel}
        legal = target in orders.TRANSITIONS[start]
        if legal:
            move[target](s, o, actor="x")
            s.commit()
            assert o.status == target
        else:
            with pytest.raises(Conflict) as err:
                move[target](s, o, actor="x")
            assert err.value.code == "illegal_transition"
            s.rollback()
            assert s.get(Order, o.id).status == start  # type: ignore[union-attr]
    paid_entries = [e for e in ledger(state, world.org) if e[0] == "recharge"]
    assert paid_entries == ([("recharge", UNIT)] if legal and target == "paid" else [])


def test_paid_twice_credits_once_and_every_change_is_recorded(
    state: AppState, world: World
) -> None:
    with state.session_factory() as s:
        o = orders.create_order(
            s, world.org, kind="recharge", currency="USD", amount=5 * UNIT, created_by="acc_a"
        )
        orders.mark_paid(s, o, actor="acc_b")
        s.commit()
        with pytest.raises(Conflict):
            orders.mark_paid(s, o, actor="acc_b")
        s.rollback()
        orders.refund(s, o, actor="acc_b", amount=2 * UNIT)
        s.commit()
        events = [(e.from_status, e.to_status, e.actor) for e in orders.order_events(s, o.id)]
    assert events == [
        (None, "created", "acc_a"),
        ("created", "paid", "acc_b"),
        ("paid", "refunded", "acc_b"),
    ]
    assert ledger(state, world.org) == [("recharge", 5 * UNIT), ("refund", -2 * UNIT)]


def test_refund_never_exceeds_the_prepaid_balance(state: AppState, world: World) -> None:
    with state.session_factory() as s:
        o = orders.create_order(
            s, world.org, kind="recharge", currency="USD", amount=10, created_by=None
        )
        orders.mark_paid(s, o, actor=None)
        ledger_usage.record_usage(s, [usage(world.org, "u", 8, datetime.now(UTC))])
        s.commit()
        with pytest.raises(Conflict) as err:
            orders.refund(s, o, actor=None)
        assert err.value.code == "refund_exceeds_balance"
        s.rollback()
        orders.refund(s, o, actor=None, amount=2)
        s.commit()
    assert bal(state, world.org) == 0


def test_package_order_grants_then_refund_revokes_the_rest(state: AppState, world: World) -> None:
    with state.session_factory() as s:
        plan = packages.create_plan(s, name="starter", price=90, credit=100, validity_days=30)
        o = orders.create_order(
            s, world.org, kind="package", currency="USD", plan_id=plan.id, created_by=None
        )
        assert (o.amount, o.credit) == (90, 100)
        orders.mark_paid(s, o, actor=None)
        ledger_usage.record_usage(s, [usage(world.org, "u", 40, datetime.now(UTC))])
        s.commit()
        orders.refund(s, o, actor=None)
        s.commit()
        assert o.refunded_amount == 90 * 60 // 100
        assert packages.package_credit(s, world.org) == 0
    assert ledger(state, world.org) == [("package_grant", 100), ("usage", -40), ("refund", -60)]


# -- redemption codes ------------------------------------------------------------------------


def test_codes_are_hashed_single_use_and_expire(state: AppState, world: World) -> None:
    with state.session_factory() as s:
        (_, good), (_, spare) = orders.create_codes(s, state.secrets, count=2, credit=3 * UNIT)
        (_, old) = orders.create_codes(
            s,
            state.secrets,
            count=1,
            credit=UNIT,
            expires_at=datetime.now(UTC) - timedelta(seconds=1),
        )[0]
        s.commit()
        stored = [r.code_hash for r in s.scalars(select(RedemptionCode))]
        assert all(good not in h and orders.normalize_code(good) not in h for h in stored)
        order = orders.redeem(
            s, state.secrets, world.org, good.lower(), actor="acc", currency="USD"
        )
        s.commit()
        assert (order.status, order.payment_method, order.amount, order.credit) == (
            "paid",
            "redemption_code",
            0,
            3 * UNIT,
        )
        for code, err in (
            (good, "redemption_code_used"),
            (old, "redemption_code_expired"),
            ("OTR-AAAA-BBBB-CCCC-DDDD-EEEE", "redemption_code_invalid"),
        ):
            with pytest.raises(Unprocessable) as exc:
                orders.redeem(s, state.secrets, world.other, code, actor="acc", currency="USD")
            assert exc.value.code == err
            assert code not in exc.value.message
    assert ledger(state, world.org) == [("recharge", 3 * UNIT)]
    assert ledger(state, world.other) == []
    db = state.settings.data_dir / "control.db"
    if db.exists():
        raw = db.read_bytes()
        for code in (good, spare, old):
            assert code.encode() not in raw and orders.normalize_code(code).encode() not in raw


# -- events ----------------------------------------------------------------------------------


def test_low_balance_and_quota_events_fire_once(
    state: AppState, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, str, dict[str, Any]]] = []
    from onetoken import webhooks

    monkeypatch.setattr(webhooks, "emit", lambda org, kind, data: sent.append((org, kind, data)))
    now = datetime.now(UTC)
    with state.session_factory() as s:
        billing.credit(s, world.org, amount=100, kind="recharge", idempotency_key="r")
        budgets.update_org_settings(s, world.org, low_balance_threshold=50, budget_day=60)
        keys.update_key(s, world.org, world.key, {"limits": {"budget_day": 1000}})
        s.commit()
    upkeep = BillingUpkeep(state.session_factory)

    def spend(rid: str, cost: int) -> None:
        with state.session_factory() as s:
            ledger_usage.record_usage(s, [usage(world.org, rid, cost, now, key=world.key)])
            s.commit()
        upkeep.observe(
            summarize(
                {"request_id": [rid], "org_id": [world.org], "key_id": [world.key],
                 "cost": [cost], "error_code": [""]}
            )
        )
        upkeep.check_events(force=True)

    spend("a", 40)  # balance 60: fine
    assert sent == []
    spend("b", 20)  # balance 40 < 50, day spend 60 >= 60
    assert sorted(k for _, k, _ in sent) == ["balance_low", "quota_exhausted"]
    quota = next(d for _, k, d in sent if k == "quota_exhausted")
    assert quota == {
        "scope": "org",
        "period": "day",
        "budget": "0.000000060",
        "spent": "0.000000060",
    }
    spend("c", 1)
    assert len(sent) == 2  # no repeats
    with state.session_factory() as s:
        billing.credit(s, world.org, amount=100, kind="recharge", idempotency_key="r2")
        s.commit()
    spend("d", 1)  # back above the threshold: re-armed, no event
    spend("e", 100)  # below again: a second balance.low
    assert [k for _, k, _ in sent].count("balance_low") == 2
    # The engine refused a request for the key's budget although spend is below it.
    upkeep.observe(
        summarize(
            {
                "request_id": ["refused"],
                "org_id": [world.org],
                "key_id": [world.key],
                "cost": [0],
                "error_code": ["budget_exceeded"],
            }
        )
    )
    upkeep.check_events(force=True)
    assert sent[-1][1] == "quota_exhausted" and sent[-1][2]["scope"] in ("org", "key")


# -- API -------------------------------------------------------------------------------------


@pytest.fixture
def billing_admin(state: AppState, client: TestClient, admin: Admin) -> dict[str, str]:
    return add_account(state, client, admin.org_id, "bill@acme.test", "billing")


def test_bank_transfer_order_flow_over_the_api(
    client: TestClient,
    admin: Admin,
    billing_admin: dict[str, str],
    other_admin: Admin,
    operator: Admin,
) -> None:
    r = client.post(
        f"{API}/billing/orders", json={"kind": "recharge", "amount": "25.50"}, headers=admin.headers
    )
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["status"] == "created" and order["amount"] == "25.500000000"
    assert order["instructions"]["reference"] == order["payment_reference"]
    oid = order["id"]
    # The org's own roles place orders; confirming and refunding them is the operator's.
    for headers in (admin.headers, billing_admin):
        for path in ("/confirm", "/refund", "/fail"):
            r = client.post(f"{API}/billing/orders/{oid}{path}", headers=headers, json={})
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"]["message"] == ROLE_DENIED_MESSAGE
    # Another org cannot see it.
    r = client.get(f"{API}/billing/orders/{oid}", headers=other_admin.headers)
    assert r.status_code == 404, r.text
    # The operator finds it among the org's orders and confirms it.
    pending = client.get(
        f"{API}/billing/orders", params={"org_id": admin.org_id, "status": "created"},
        headers=operator.headers,
    ).json()["data"]
    assert [o["id"] for o in pending] == [oid]
    r = client.post(f"{API}/billing/orders/{oid}/confirm", headers=operator.headers)
    assert r.status_code == 200 and r.json()["status"] == "paid"
    assert [e["to_status"] for e in r.json()["events"]] == ["created", "paid"]
    r = client.post(f"{API}/billing/orders/{oid}/cancel", headers=billing_admin)
    assert r.status_code == 409 and r.json()["error"]["code"] == "illegal_transition"
    assert (
        client.get(f"{API}/billing/balance", headers=admin.headers).json()["balance"]
        == "25.500000000"
    )
    r = client.post(
        f"{API}/billing/orders/{oid}/refund", json={"amount": "0.5"}, headers=operator.headers
    )
    assert r.status_code == 200 and r.json()["refunded_amount"] == "0.500000000"
    assert (
        client.get(f"{API}/billing/balance", headers=admin.headers).json()["balance"]
        == "25.000000000"
    )
    listed = client.get(f"{API}/billing/orders", headers=admin.headers).json()["data"]
    assert [o["id"] for o in listed] == [oid]
    assert client.get(f"{API}/billing/orders", headers=other_admin.headers).json()["data"] == []
    # Naming another org is the operator's alone, and answers like an unknown org.
    r = client.get(
        f"{API}/billing/orders", params={"org_id": admin.org_id}, headers=other_admin.headers
    )
    assert r.status_code == 404


def test_billing_roles(client: TestClient, admin: Admin, state: AppState) -> None:
    viewer = add_account(state, client, admin.org_id, "view@acme.test", "viewer")
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    for headers in (viewer, dev):
        r = client.post(
            f"{API}/billing/orders", json={"kind": "recharge", "amount": "1"}, headers=headers
        )
        assert r.status_code == 403
        r = client.patch(f"{API}/billing/settings", json={"budget_day": "1"}, headers=headers)
        assert r.status_code == 403
    assert client.get(f"{API}/billing/orders", headers=dev).status_code == 403
    assert client.get(f"{API}/billing/orders", headers=viewer).status_code == 200


def test_settings_api(client: TestClient, admin: Admin, other_admin: Admin) -> None:
    r = client.patch(
        f"{API}/billing/settings",
        json={"budget_day": "5", "budget_month": "100.25", "low_balance_threshold": "1"},
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["budget_month"] == "100.250000000" and r.json()["price_factor_ppm"] == 1_000_000
    r = client.patch(f"{API}/billing/settings", json={"budget_day": None}, headers=admin.headers)
    assert r.json()["budget_day"] is None and r.json()["budget_month"] == "100.250000000"
    r = client.patch(f"{API}/billing/settings", json={"price_factor_ppm": 1}, headers=admin.headers)
    assert r.status_code == 422  # the operator's term, not the org's
    r = client.patch(f"{API}/billing/settings", json={"budget_day": "-1"}, headers=admin.headers)
    assert r.status_code == 422
    other = client.get(f"{API}/billing/settings", headers=other_admin.headers).json()
    assert other["budget_month"] is None


def test_redeem_over_the_api_never_echoes_the_code(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    with state.session_factory() as s:
        ((_, code),) = orders.create_codes(s, state.secrets, count=1, credit=2 * UNIT)
        s.commit()
    r = client.post(f"{API}/billing/redeem", json={"code": code}, headers=admin.headers)
    assert r.status_code == 201 and r.json()["credit"] == "2.000000000"
    r = client.post(f"{API}/billing/redeem", json={"code": code}, headers=admin.headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "redemption_code_used"
    assert code not in r.text
    with state.session_factory() as s:
        n = s.scalar(select(func.count()).select_from(OrderEvent))
    assert n == 2  # created, paid


def test_statements_need_the_call_log(client: TestClient, admin: Admin) -> None:
    r = client.get(f"{API}/billing/statements/2024-05", headers=admin.headers)
    assert r.status_code == 503 and r.json()["error"]["code"] == "call_log_unavailable"
    r = client.get(f"{API}/billing/statements/2024-13", headers=admin.headers)
    assert r.status_code in (422, 503)
