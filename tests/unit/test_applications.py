"""Applications through the control API: what each role may do, keys moved in and out
(audited), deletion refused while keys remain, and the engine's view of them (policy
XIII.3: applications are managed through the platform's functions)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi.testclient import TestClient

from onetoken import _core
from onetoken.gateway.snapshot import build_snapshot
from onetoken.keys.models import ApiKey
from onetoken.state import AppState
from tests.unit.conftest import Admin, add_account
from tests.unit.test_accounts import drained_events

API = "/api/v1"


def _app(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = client.post(f"{API}/applications", headers=headers, json={"name": "crm", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _key(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = client.post(f"{API}/keys", headers=headers, json={"name": "k", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _snapshot(state: AppState) -> dict[str, Any]:
    with state.session_factory() as s:
        return build_snapshot(s, state.secrets, version=1, spent_marks={})


def test_admins_create_and_list_applications_with_their_keys(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    app = _app(client, admin.headers, description="the CRM's calls",
               limits={"rpm": 100, "budget_day": "2.5"})
    assert app["owner_id"] == admin.account_id and app["keys"] == []
    assert app["limits"] == {"rpm": 100, "tpm": None, "concurrency": None,
                             "budget_day": "2.500000000", "budget_month": None}
    inside = _key(client, admin.headers, application_id=app["id"])
    assert inside["application_id"] == app["id"]
    outside = _key(client, admin.headers)
    assert outside["application_id"] is None
    (listed,) = client.get(f"{API}/applications", headers=admin.headers).json()["data"]
    assert [k["id"] for k in listed["keys"]] == [inside["id"]]
    # The same name twice in one org is a conflict.
    r = client.post(f"{API}/applications", headers=admin.headers, json={"name": "crm"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "application_name_taken"

    snap = _snapshot(state)
    assert snap["applications"] == [{
        "id": app["id"], "org_id": admin.org_id,
        "limits": {"rpm": 100, "tpm": None, "concurrency": None,
                   "budget_day": 2_500_000_000, "budget_month": None},
        "usage": snap["applications"][0]["usage"],
    }]
    assert snap["applications"][0]["usage"]["spent_day"] == 0
    by_id = {k["key_id"]: k for k in snap["keys"]}
    assert by_id[inside["id"]]["application_id"] == app["id"]
    assert "application_id" not in by_id[outside["id"]]
    # The engine takes it whole: nothing dropped.
    assert _core.validate_snapshot(orjson.dumps(snap)) == []


def test_moving_a_key_is_audited_and_reaches_the_snapshot(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    a = _app(client, admin.headers, name="a")
    b = _app(client, admin.headers, name="b")
    key = _key(client, admin.headers, application_id=a["id"])
    drained_events()
    r = client.patch(f"{API}/keys/{key['id']}", headers=admin.headers,
                     json={"application_id": b["id"]})
    assert r.status_code == 200 and r.json()["application_id"] == b["id"], r.text
    (event,) = [e for e in drained_events() if e["kind"] == "admin.key_application_changed"]
    assert event["subject_id"] == key["id"] and event["actor_id"] == admin.account_id
    assert event["detail"]["application_id.before"] == a["id"]
    assert event["detail"]["application_id.after"] == b["id"]
    entry = next(k for k in _snapshot(state)["keys"] if k["key_id"] == key["id"])
    assert entry["application_id"] == b["id"]
    # Out of any application.
    r = client.patch(f"{API}/keys/{key['id']}", headers=admin.headers,
                     json={"application_id": None})
    assert r.status_code == 200 and r.json()["application_id"] is None
    # A rotated key stays in its application.
    client.patch(f"{API}/keys/{key['id']}", headers=admin.headers, json={"application_id": a["id"]})
    r = client.post(f"{API}/keys/{key['id']}/rotate", headers=admin.headers, json={})
    assert r.status_code == 201 and r.json()["application_id"] == a["id"]


def test_deleting_an_application_with_keys_is_a_conflict(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    app = _app(client, admin.headers)
    key = _key(client, admin.headers, application_id=app["id"])
    r = client.delete(f"{API}/applications/{app['id']}", headers=admin.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "application_has_keys"
    assert client.post(f"{API}/keys/{key['id']}/revoke", headers=admin.headers).status_code == 200
    r = client.delete(f"{API}/applications/{app['id']}", headers=admin.headers)
    assert r.status_code == 204, r.text
    assert client.get(f"{API}/applications/{app['id']}", headers=admin.headers).status_code == 404
    with state.session_factory() as s:
        row = s.get(ApiKey, key["id"])
        assert row is not None and row.application_id is None
    # The revoked key is still in the snapshot (as revoked), not dropped for a lost app.
    snap = _snapshot(state)
    assert _core.validate_snapshot(orjson.dumps(snap)) == []


def test_roles_members_read_owners_tune_admins_manage(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    other = add_account(state, client, admin.org_id, "other@acme.test", "developer")
    viewer = add_account(state, client, admin.org_id, "viewer@acme.test", "viewer")
    dev_id = client.get(f"{API}/me", headers=dev).json()["id"]

    # Only admins create; members read.
    r = client.post(f"{API}/applications", headers=dev, json={"name": "mine"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_org_admin"
    r = client.post(f"{API}/applications", headers=viewer, json={"name": "mine"})
    assert r.status_code == 403
    app = _app(client, admin.headers, owner_id=dev_id, limits={"rpm": 50})
    assert client.get(f"{API}/applications", headers=viewer).status_code == 200

    # The owner narrows the admin's limit, may not lift or raise it, nor rename.
    r = client.patch(f"{API}/applications/{app['id']}", headers=dev,
                     json={"limits": {"rpm": 20}, "description": "tuned"})
    assert r.status_code == 200 and r.json()["limits"]["rpm"] == 20, r.text
    r = client.patch(f"{API}/applications/{app['id']}", headers=dev,
                     json={"limits": {"rpm": 20, "tpm": None}})
    assert r.status_code == 200
    r = client.patch(f"{API}/applications/{app['id']}", headers=dev, json={"limits": {}})
    assert r.status_code == 403 and r.json()["error"]["code"] == "limits_set_by_admin"
    r = client.patch(f"{API}/applications/{app['id']}", headers=dev, json={"name": "renamed"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_org_admin"
    # Another developer may not touch it; a viewer may not write at all.
    r = client.patch(f"{API}/applications/{app['id']}", headers=other, json={"description": "x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_application_owner"
    r = client.patch(f"{API}/applications/{app['id']}", headers=viewer, json={"description": "x"})
    assert r.status_code == 403

    # Within what the org allows: not above the org's own limits.
    own = _app(client, admin.headers, name="own", owner_id=dev_id)
    r = client.patch(f"{API}/billing/settings", headers=admin.headers, json={"budget_day": "1"})
    assert r.status_code == 200, r.text
    r = client.patch(f"{API}/applications/{own['id']}", headers=dev,
                     json={"limits": {"budget_day": "1.000000001"}})
    assert r.status_code == 403 and r.json()["error"]["code"] == "above_org_limit"
    assert r.json()["error"]["param"] == "limits.budget_day"
    r = client.patch(f"{API}/applications/{own['id']}", headers=dev,
                     json={"limits": {"budget_day": "1"}})
    assert r.status_code == 200

    # The owner moves the keys they manage into their application, not others' keys.
    mine = _key(client, dev, application_id=app["id"])
    assert mine["application_id"] == app["id"]
    theirs = _key(client, other)
    r = client.patch(f"{API}/keys/{theirs['id']}", headers=dev, json={"application_id": app["id"]})
    assert r.status_code == 403
    r = client.post(f"{API}/keys", headers=other, json={"name": "k", "application_id": app["id"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_application_owner"
    # Only admins delete.
    r = client.delete(f"{API}/applications/{own['id']}", headers=dev)
    assert r.status_code == 403


def test_another_orgs_application_is_not_found(
    client: TestClient, admin: Admin, other_admin: Admin
) -> None:
    theirs = _app(client, other_admin.headers, name="globex-app")
    r = client.post(f"{API}/keys", headers=admin.headers,
                    json={"name": "k", "application_id": theirs["id"]})
    assert r.status_code == 404
    r = client.get(f"{API}/applications/{theirs['id']}", headers=admin.headers)
    assert r.status_code == 404
    r = client.patch(f"{API}/applications/{theirs['id']}", headers=admin.headers,
                     json={"description": "x"})
    assert r.status_code == 404


def test_an_application_budget_used_up_raises_quota_exhausted_once(
    client: TestClient, admin: Admin, state: AppState, monkeypatch: Any
) -> None:
    from onetoken import webhooks
    from onetoken.billing import service as billing
    from onetoken.billing import usage as ledger_usage
    from onetoken.billing.upkeep import BillingUpkeep
    from tests.unit.batches import summarize

    sent: list[tuple[str, str, dict[str, Any]]] = []
    monkeypatch.setattr(webhooks, "emit", lambda org, kind, data: sent.append((org, kind, data)))
    app = _app(client, admin.headers, limits={"budget_day": "0.00000006"})
    key = _key(client, admin.headers, application_id=app["id"])
    upkeep = BillingUpkeep(state.session_factory)
    ts_us = time.time_ns() // 1000

    def spend(rid: str, cost: int) -> None:
        with state.session_factory() as s:
            ledger_usage.record_usage(s, [billing.Usage(
                org_id=admin.org_id, entry_id=rid, cost=cost, ts_us=ts_us, key_id=key["id"],
                model="m", application_id=app["id"])])
            s.commit()
        upkeep.observe(summarize({
            "request_id": [rid], "org_id": [admin.org_id], "key_id": [key["id"]],
            "cost": [cost], "error_code": [""], "application_id": [app["id"]], "ts": [ts_us],
        }))
        upkeep.check_events(force=True)

    spend("a", 40)
    assert sent == []
    spend("b", 20)  # 60 of 60 spent today
    (event,) = sent
    assert event == (admin.org_id, "quota_exhausted", {
        "scope": "application", "period": "day", "budget": "0.000000060",
        "spent": "0.000000060", "application_id": app["id"],
    })
    spend("c", 1)
    assert len(sent) == 1  # once per period
