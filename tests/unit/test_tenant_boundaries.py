"""Where one role's reach ends: a disabled org's sessions, platform-wide callback
addresses, limits, scopes and status an administrator set on a developer's key, and the
billing reads the matrix gives (docs/permissions.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from onetoken.orgs import auth
from onetoken.orgs.models import Account, AdminSession, Org
from onetoken.security.permissions import ROLE_DENIED_MESSAGE
from onetoken.state import AppState
from onetoken.webhooks.models import WebhookEndpoint
from tests.unit.conftest import Admin, add_account

API = "/api/v1"
MEMBER_PASSWORD = "another long password"  # conftest.add_account's


def _cookie_session(client: TestClient, login: str, password: str) -> dict[str, str]:
    r = client.post(f"{API}/auth/session", json={"login": login, "password": password})
    assert r.status_code == 200, r.text
    return {"Cookie": f"{auth.SESSION_COOKIE}={r.cookies[auth.SESSION_COOKIE]}"}


def _sessions_of_org(state: AppState, org_id: str) -> int:
    with state.session_factory() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(AdminSession)
                .join(Account, Account.id == AdminSession.account_id)
                .where(Account.org_id == org_id)
            )
            or 0
        )


def test_disabling_an_org_refuses_its_members_cookie_and_bearer_at_once(
    client: TestClient, state: AppState, admin: Admin, operator: Admin
) -> None:
    bearer = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    cookie = _cookie_session(client, admin.email, admin.password)
    for headers in (bearer, cookie, admin.headers):
        assert client.get(f"{API}/me", headers=headers).status_code == 200
    r = client.patch(f"{API}/orgs/{admin.org_id}", json={"status": "disabled"},
                     headers=operator.headers)
    assert r.status_code == 200, r.text
    for headers in (bearer, cookie, admin.headers):
        assert client.get(f"{API}/me", headers=headers).status_code == 401
    assert _sessions_of_org(state, admin.org_id) == 0
    # Re-enabling the org does not bring the old sessions back.
    r = client.patch(f"{API}/orgs/{admin.org_id}", json={"status": "active"},
                     headers=operator.headers)
    assert r.status_code == 200
    assert client.get(f"{API}/me", headers=admin.headers).status_code == 401
    assert client.get(f"{API}/me", headers=operator.headers).status_code == 200


def test_a_session_of_a_disabled_org_is_refused_even_if_its_row_survived(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    # As if the org had been disabled while this session was being issued.
    with state.session_factory() as s:
        s.execute(update(Org).where(Org.id == admin.org_id).values(status="disabled"))
        s.commit()
    assert _sessions_of_org(state, admin.org_id) == 1
    assert client.get(f"{API}/me", headers=admin.headers).status_code == 401


def test_only_operators_change_platform_wide_callback_addresses(
    client: TestClient, state: AppState, operator: Admin
) -> None:
    # A non-operator administrator of the operators' own org.
    colleague = add_account(state, client, operator.org_id, "ops-admin@platform.test", "admin")
    # Stored as the operator's create would (nothing is ever sent to it here).
    with state.session_factory() as s:
        s.add(WebhookEndpoint(
            id="whk_platform_test", org_id=operator.org_id,
            url_encrypted=state.secrets.encrypt("https://hooks.example.test/platform"),
            url_display="https://hooks.example.test", kinds=["system_alarm"],
            secret_encrypted=state.secrets.encrypt("whsec-test"), status="active",
            platform=True, created_by=operator.account_id,
        ))
        s.commit()
    ep = f"{API}/webhooks/whk_platform_test"
    for method, path, body in (
        ("PATCH", ep, {"status": "disabled"}),
        ("POST", f"{ep}/rotate-secret", None),
        ("POST", f"{ep}/test", None),
        ("DELETE", ep, None),
    ):
        r = client.request(method, path, json=body, headers=colleague)
        assert r.status_code == 403, (method, path, r.text)
    assert client.get(ep, headers=colleague).status_code == 200
    r = client.patch(ep, json={"status": "disabled"}, headers=operator.headers)
    assert r.status_code == 200 and r.json()["status"] == "disabled"
    assert client.delete(ep, headers=operator.headers).status_code == 204


def _key(client: TestClient, headers: dict[str, str], **body: object) -> str:
    r = client.post(f"{API}/keys", json={"name": "k", **body}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_a_developer_only_narrows_what_an_administrator_set_on_their_key(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    dev_id = client.get(f"{API}/me", headers=dev).json()["id"]
    key = _key(client, admin.headers, owner_id=dev_id,
               limits={"rpm": 10, "tpm": 1000, "budget_day": "5"})
    path = f"{API}/keys/{key}"
    for limits, param in (
        ({"rpm": 20, "tpm": 1000, "budget_day": "5"}, "limits.rpm"),  # raised
        ({"rpm": 10, "budget_day": "5"}, "limits.tpm"),  # lifted
        ({}, "limits.rpm"),  # all lifted
        ({"rpm": 10, "tpm": 1000, "budget_day": "5.000000001"}, "limits.budget_day"),
    ):
        r = client.patch(path, json={"limits": limits}, headers=dev)
        assert r.status_code == 403, (limits, r.text)
        assert r.json()["error"]["code"] == "limits_set_by_admin"
        assert r.json()["error"]["param"] == param
    r = client.patch(path, json={"limits": {"rpm": 5, "tpm": 1000, "budget_day": "1"}},
                     headers=dev)
    assert r.status_code == 200 and r.json()["limits"]["rpm"] == 5
    # Narrowed, the limits stay the administrator's: back up is refused too.
    r = client.patch(path, json={"limits": {"rpm": 10, "tpm": 1000, "budget_day": "1"}},
                     headers=dev)
    assert r.status_code == 403
    # The administrator lifts them freely; a developer's own limits are theirs to change.
    r = client.patch(path, json={"limits": {"rpm": 50}}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["limits"]["rpm"] == 50
    own = _key(client, dev, limits={"rpm": 10})
    r = client.patch(f"{API}/keys/{own}", json={"limits": {"rpm": 100}}, headers=dev)
    assert r.status_code == 200 and r.json()["limits"]["rpm"] == 100
    # A rotated key keeps who set its limits.
    r = client.post(f"{path}/rotate", json={"overlap_seconds": 0}, headers=dev)
    assert r.status_code == 201, r.text
    rotated = f"{API}/keys/{r.json()['id']}"
    r = client.patch(rotated, json={"limits": {"rpm": 60}}, headers=dev)
    assert r.status_code == 403


def test_a_developer_cannot_re_enable_a_key_an_administrator_disabled(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    key = _key(client, dev)
    path = f"{API}/keys/{key}"
    r = client.patch(path, json={"status": "disabled"}, headers=admin.headers)
    assert r.status_code == 200
    r = client.patch(path, json={"status": "active"}, headers=dev)
    assert r.status_code == 403 and r.json()["error"]["code"] == "disabled_by_admin"
    r = client.patch(path, json={"status": "active"}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["status"] == "active"
    # What the developer disabled, the developer re-enables.
    assert client.patch(path, json={"status": "disabled"}, headers=dev).status_code == 200
    r = client.patch(path, json={"status": "active"}, headers=dev)
    assert r.status_code == 200 and r.json()["status"] == "active"


def test_balance_and_ledger_follow_billing_read(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    viewer = add_account(state, client, admin.org_id, "viewer@acme.test", "viewer")
    for path in ("/billing/balance", "/billing/ledger"):
        r = client.get(f"{API}{path}", headers=dev)
        assert r.status_code == 403 and r.json()["error"]["message"] == ROLE_DENIED_MESSAGE
        assert client.get(f"{API}{path}", headers=viewer).status_code == 200


def _in(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def test_a_developer_only_narrows_the_scopes_an_administrator_set_on_their_key(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    dev_id = client.get(f"{API}/me", headers=dev).json()["id"]
    scopes = {
        "allowed_models": ["m-a", "m-b"],
        "allowed_ips": ["10.0.0.0/8", "2001:db8::/32"],
        "expires_at": _in(days=10),
        "not_before": _in(hours=1),
    }
    key = _key(client, admin.headers, owner_id=dev_id, **scopes)
    path = f"{API}/keys/{key}"
    for field, value in (
        ("allowed_models", ["m-a", "m-b", "m-c"]),
        ("allowed_models", None),
        ("allowed_ips", ["10.0.0.0/7"]),
        ("allowed_ips", ["10.0.0.0/8", "192.168.0.0/16"]),
        ("allowed_ips", ["::ffff:10.0.0.0/104"]),  # 10/8 spelled as IPv6
        ("allowed_ips", None),
        ("expires_at", _in(days=20)),
        ("expires_at", None),
        ("not_before", _in(minutes=30)),
        ("not_before", None),
    ):
        r = client.patch(path, json={field: value}, headers=dev)
        assert r.status_code == 403, (field, value, r.text)
        assert r.json()["error"]["code"] == "scope_set_by_admin"
        assert r.json()["error"]["param"] == field
    assert client.get(path, headers=dev).json()["allowed_models"] == ["m-a", "m-b"]
    # Narrowing every scope at once is the developer's to do...
    narrowed = {
        "allowed_models": ["m-a"],
        "allowed_ips": ["10.1.0.0/16", "2001:db8:1::/48"],
        "expires_at": _in(days=5),
        "not_before": _in(hours=2),
    }
    r = client.patch(path, json=narrowed, headers=dev)
    assert r.status_code == 200, r.text
    assert r.json()["allowed_models"] == ["m-a"]
    assert r.json()["allowed_ips"] == ["10.1.0.0/16", "2001:db8:1::/48"]
    # ...and the narrowed scopes stay the administrator's: back to the original is refused.
    r = client.patch(path, json={"allowed_models": ["m-a", "m-b"]}, headers=dev)
    assert r.status_code == 403 and r.json()["error"]["param"] == "allowed_models"
    # The administrator widens and removes freely.
    r = client.patch(path, json={"allowed_models": None, "expires_at": None},
                     headers=admin.headers)
    assert r.status_code == 200, r.text
    assert r.json()["allowed_models"] is None and r.json()["expires_at"] is None


def test_a_developer_sets_scopes_freely_on_a_key_nobody_above_them_touched(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    own = f"{API}/keys/{_key(client, dev, allowed_models=['m-a'], expires_at=_in(days=1))}"
    r = client.patch(own, json={"allowed_models": ["m-a", "m-b"], "expires_at": None,
                                "allowed_ips": ["10.0.0.0/8"]}, headers=dev)
    assert r.status_code == 200, r.text
    r = client.patch(own, json={"allowed_ips": None, "allowed_models": None}, headers=dev)
    assert r.status_code == 200 and r.json()["allowed_ips"] is None
    # Once every scope is gone, a key the administrator had scoped is the developer's too.
    r = client.patch(own, json={"allowed_models": ["m-a"]}, headers=admin.headers)
    assert r.status_code == 200
    assert client.patch(own, json={"allowed_models": None}, headers=dev).status_code == 403
    assert client.patch(own, json={"allowed_models": None},
                        headers=admin.headers).status_code == 200
    r = client.patch(own, json={"allowed_models": ["m-b"]}, headers=dev)
    assert r.status_code == 200
    assert client.patch(own, json={"allowed_models": None}, headers=dev).status_code == 200


def test_rotating_keeps_every_restriction_an_administrator_set(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    dev_id = client.get(f"{API}/me", headers=dev).json()["id"]
    start = _in(hours=1)
    key = _key(client, admin.headers, owner_id=dev_id, allowed_models=["m-a"],
               not_before=start)
    policy = {"deny_vendors": ["acme-ai"], "no_training": True}
    r = client.put(f"{API}/keys/{key}/policy", json=policy, headers=admin.headers)
    assert r.status_code == 200, r.text
    r = client.post(f"{API}/keys/{key}/rotate", json={"overlap_seconds": 0}, headers=dev)
    assert r.status_code == 201, r.text
    assert r.json()["not_before"] == client.get(f"{API}/keys/{key}", headers=dev).json()[
        "not_before"]
    rotated = f"{API}/keys/{r.json()['id']}"
    r = client.get(f"{rotated}/policy", headers=dev)
    assert r.status_code == 200
    assert r.json()["deny_vendors"] == ["acme-ai"] and r.json()["no_training"] is True
    r = client.patch(rotated, json={"allowed_models": None}, headers=dev)
    assert r.status_code == 403 and r.json()["error"]["code"] == "scope_set_by_admin"
