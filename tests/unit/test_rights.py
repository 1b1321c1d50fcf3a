"""Users' rights on the control DB: export, cancellation and the retention purge.
(The ClickHouse part of an erasure runs against a real server in
tests/integration/test_security_detection.py.)"""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from onetoken.db.models import AdminSession, utcnow
from onetoken.deps import AppState
from onetoken.rights import retention
from onetoken.rights.models import AccountErasure
from onetoken.security.models import LoginSource
from onetoken.webhooks.models import WebhookAttempt, WebhookDelivery

from .conftest import Admin

PASSWORD = "another long password"


def _member(client: TestClient, admin: Admin, email: str, role: str, **extra: str) -> str:
    body = {"email": email, "role": role, "password": PASSWORD, **extra}
    r = client.post("/api/v1/accounts", json=body, headers=admin.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _login(client: TestClient, email: str) -> dict[str, str]:
    r = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def test_export_json_and_csv(client: TestClient, admin: Admin) -> None:
    _member(client, admin, "dev@acme.test", "developer", display_name="Dana Dev",
            mobile="+15550001111")
    h = _login(client, "dev@acme.test")
    key = client.post("/api/v1/keys", json={"name": "laptop"}, headers=h)
    assert key.status_code == 201, key.text
    doc = client.get("/api/v1/me/export", headers=h)
    assert doc.status_code == 200
    assert "attachment" in doc.headers["content-disposition"]
    body = doc.json()
    assert body["account"]["email"] == "dev@acme.test"
    assert body["account"]["display_name"] == "Dana Dev"
    assert body["account"]["mobile"] == "+15550001111"
    assert [k["name"] for k in body["keys"]] == ["laptop"]
    assert "hash" not in body["keys"][0]
    # Without a running gateway the call statistics are not available (and say so).
    assert body["call_statistics"] is None
    acc = client.get("/api/v1/me/export", params={"format": "csv", "part": "account"}, headers=h)
    assert acc.headers["content-type"].startswith("text/csv")
    rows = dict(csv.reader(io.StringIO(acc.text)))
    assert rows["email"] == "dev@acme.test" and rows["mobile"] == "'+15550001111"
    keys = list(csv.DictReader(io.StringIO(
        client.get("/api/v1/me/export", params={"format": "csv", "part": "keys"},
                   headers=h).text)))
    assert keys[0]["name"] == "laptop" and keys[0]["status"] == "active"
    calls = client.get("/api/v1/me/export", params={"format": "csv", "part": "calls"}, headers=h)
    assert calls.status_code == 503


def test_cancel_own_account_anonymizes_the_control_db(
    client: TestClient, admin: Admin, state: AppState, settings: object
) -> None:
    account_id = _member(client, admin, "ann@acme.test", "developer",
                         display_name="Ann Example", mobile="+15559998888",
                         login_name="ann.example")
    h = _login(client, "ann@acme.test")
    key = client.post("/api/v1/keys", json={"name": "Ann's laptop"}, headers=h).json()
    wrong = client.post("/api/v1/me/cancel", json={"password": "nope"}, headers=h)
    assert wrong.status_code == 401
    r = client.post("/api/v1/me/cancel", json={"password": PASSWORD}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {"account_id": account_id, "state": "control_done", "keys_revoked": 1}
    # Signed out everywhere, cannot sign in again, key revoked.
    assert client.get("/api/v1/me", headers=h).status_code == 401
    again = client.post("/api/v1/auth/login",
                        json={"email": "ann@acme.test", "password": PASSWORD})
    assert again.status_code == 401
    got = client.get(f"/api/v1/keys/{key['id']}", headers=admin.headers).json()
    assert got["status"] == "revoked" and got["name"] == "erased"
    acc = client.get(f"/api/v1/accounts/{account_id}", headers=admin.headers).json()
    assert acc["email"] in (None, "") and acc["display_name"] == ""
    assert acc["login_name"].startswith("erased-") and acc["status"] == "disabled"
    with state.session_factory() as s:
        erasure = s.get(AccountErasure, account_id)
        assert erasure is not None and erasure.state == "control_done"
        assert erasure.pending_encrypted is not None
        assert "ann@acme.test" not in erasure.pending_encrypted
        assert s.scalars(select(AdminSession).where(AdminSession.account_id == account_id)
                         ).all() == []
        assert s.scalars(select(LoginSource).where(LoginSource.account_id == account_id)
                         ).all() == []
    data_dir = Path(state.settings.data_dir)
    raw = b"".join(p.read_bytes() for p in data_dir.glob("control.db*") if p.is_file())
    for needle in ("ann@acme.test", "+15559998888", "Ann Example", "ann.example",
                   "Ann's laptop"):
        assert needle.encode() not in raw, needle
    twice = client.post(f"/api/v1/accounts/{account_id}/cancel", headers=admin.headers)
    assert twice.status_code == 409


def test_admins_cancel_accounts_of_their_org_only(
    client: TestClient, admin: Admin, other_admin: Admin
) -> None:
    account_id = _member(client, admin, "bob@acme.test", "viewer")
    r = client.post(f"/api/v1/accounts/{account_id}/cancel", headers=other_admin.headers)
    assert r.status_code == 404
    viewer = _login(client, "bob@acme.test")
    r = client.post(f"/api/v1/accounts/{admin.account_id}/cancel", headers=viewer)
    assert r.status_code == 403
    # The last owner cannot go (the org would be left without one).
    last = client.post("/api/v1/me/cancel", json={"password": admin.password},
                       headers=admin.headers)
    assert last.status_code == 409 and last.json()["error"]["code"] == "last_owner"
    ok = client.post(f"/api/v1/accounts/{account_id}/cancel", headers=admin.headers)
    assert ok.status_code == 200


def test_retention_purge(state: AppState) -> None:
    old = utcnow() - timedelta(days=400)
    with state.session_factory() as s:
        s.add(WebhookDelivery(id="whd_old", endpoint_id="e", org_id="o", event_id="v",
                              kind="key_risk", status="delivered", attempts=1, created_at=old))
        s.add(WebhookAttempt(delivery_id="whd_old", attempt=1, status_code=200, latency_ms=1,
                             created_at=old))
        s.add(WebhookDelivery(id="whd_new", endpoint_id="e", org_id="o", event_id="w",
                              kind="key_risk", status="delivered", attempts=1))
        s.add(WebhookDelivery(id="whd_pending", endpoint_id="e", org_id="o", event_id="x",
                              kind="key_risk", status="pending", attempts=1, created_at=old))
        s.add(LoginSource(account_id="acc_x", kind="net", value="192.0.2.0/24",
                          first_seen=old, last_seen=old))
        s.add(LoginSource(account_id="acc_x", kind="ua", value="curl"))
        s.commit()
    result = retention.purge(state.session_factory, state.settings)
    assert result.deliveries == 1 and result.login_sources == 1
    with state.session_factory() as s:
        assert {d.id for d in s.scalars(select(WebhookDelivery))} == {"whd_new", "whd_pending"}
        assert s.scalars(select(WebhookAttempt)).all() == []
        assert [x.kind for x in s.scalars(select(LoginSource))] == ["ua"]


def test_security_log_ttl_clause() -> None:
    clause = retention.security_log_ttl(365, 90)
    assert clause == (
        "ts + INTERVAL 90 DAY DELETE WHERE startsWith(kind, 'auth.'), ts + INTERVAL 365 DAY"
    )


def test_cancelling_an_admin_keeps_keys_it_made_for_others(
    client: TestClient, admin: Admin
) -> None:
    dev_id = _member(client, admin, "dev2@acme.test", "developer")
    admin2_id = _member(client, admin, "admin2@acme.test", "admin")
    h = _login(client, "admin2@acme.test")
    for_dev = client.post("/api/v1/keys", json={"name": "for dev", "owner_id": dev_id},
                          headers=h).json()
    own = client.post("/api/v1/keys", json={"name": "own"}, headers=h).json()
    r = client.post(f"/api/v1/accounts/{admin2_id}/cancel", headers=admin.headers)
    assert r.status_code == 200 and r.json()["keys_revoked"] == 1
    keys = {k["id"]: k for k in client.get("/api/v1/keys", headers=admin.headers).json()["data"]}
    assert keys[for_dev["id"]]["status"] == "active" and keys[for_dev["id"]]["name"] == "for dev"
    assert keys[own["id"]]["status"] == "revoked"
