from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, text

from onetoken.billing.models import LedgerEntry
from onetoken.keys.models import ApiKey
from onetoken.kit.crypto import is_well_formed_api_key
from onetoken.providers.models import Provider
from onetoken.state import AppState
from tests.unit.conftest import Admin, add_account

API = "/api/v1"


def _error(r: Any) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    return err


# -- auth -------------------------------------------------------------------------------


def test_login_and_me(client: TestClient, admin: Admin) -> None:
    r = client.get(f"{API}/me", headers=admin.headers)
    assert r.status_code == 200
    assert r.json() == {
        "id": admin.account_id,
        "email": admin.email,
        "role": "owner",
        "org_id": admin.org_id,
        "login_name": admin.email,
        "mobile": None,
        "display_name": "",
        "auth_status": "password",
        "is_operator": False,
        "restriction": "clear",
    }
    assert client.get(f"{API}/org", headers=admin.headers).json()["id"] == admin.org_id


def test_login_failures_look_alike(client: TestClient, admin: Admin) -> None:
    wrong = client.post(f"{API}/auth/login", json={"email": admin.email, "password": "nope"})
    unknown = client.post(f"{API}/auth/login", json={"email": "x@y.z", "password": "nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert _error(wrong) == _error(unknown)
    assert "nope" not in wrong.text


def test_session_token_is_stored_hashed(client: TestClient, admin: Admin, state: AppState) -> None:
    token = admin.headers["Authorization"].removeprefix("Bearer ")
    with state.db_engine.connect() as conn:
        stored = [row[0] for row in conn.execute(text("SELECT token_hash FROM admin_sessions"))]
    assert stored and token not in stored
    assert state.secrets.hash_session_token(token) in stored


def test_every_endpoint_requires_a_token(client: TestClient) -> None:
    for method, path in [
        ("GET", "/me"),
        ("GET", "/org"),
        ("GET", "/keys"),
        ("POST", "/keys"),
        ("GET", "/providers"),
        ("GET", "/models"),
        ("GET", "/billing/balance"),
        ("GET", "/billing/ledger"),
        ("POST", "/billing/credits"),
    ]:
        r = client.request(method, f"{API}{path}", json={})
        assert r.status_code == 401, path
        assert _error(r)["type"] == "authentication_error"
        r = client.request(
            method, f"{API}{path}", json={}, headers={"Authorization": "Bearer ots_forged"}
        )
        assert r.status_code == 401, path


def test_logout_invalidates_token(client: TestClient, admin: Admin) -> None:
    assert client.post(f"{API}/auth/logout", headers=admin.headers).status_code == 204
    assert client.get(f"{API}/me", headers=admin.headers).status_code == 401


def test_openapi_is_served(client: TestClient) -> None:
    spec = client.get("/api/openapi.json").json()
    assert "/api/v1/keys" in spec["paths"]
    assert client.get("/api/docs").status_code == 200


# -- keys -------------------------------------------------------------------------------


def test_key_lifecycle(client: TestClient, admin: Admin, state: AppState) -> None:
    r = client.post(f"{API}/keys", json={"name": "ci"}, headers=admin.headers)
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created["key"]
    assert is_well_formed_api_key(secret)
    assert created["display"] == secret[:7] + "…" + secret[-4:]
    assert created["status"] == "active"

    listed = client.get(f"{API}/keys", headers=admin.headers).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert secret not in client.get(f"{API}/keys", headers=admin.headers).text
    got = client.get(f"{API}/keys/{created['id']}", headers=admin.headers)
    assert got.status_code == 200 and "key" not in got.json()

    with state.db_engine.connect() as conn:
        dump = "\n".join(str(row) for row in conn.execute(text("SELECT * FROM api_keys")))
    assert secret not in dump
    assert state.secrets.hash_api_key(secret) in dump

    expires = (datetime.now(UTC) + timedelta(days=7)).isoformat()
    r = client.patch(
        f"{API}/keys/{created['id']}",
        json={
            "name": "ci-2",
            "status": "disabled",
            "expires_at": expires,
            "allowed_models": ["a", "a", "b"],
        },
        headers=admin.headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["name"], body["status"], body["allowed_models"]) == (
        "ci-2",
        "disabled",
        ["a", "b"],
    )
    assert body["expires_at"] is not None

    r = client.patch(
        f"{API}/keys/{created['id']}", json={"allowed_models": None}, headers=admin.headers
    )
    assert r.json()["allowed_models"] is None and r.json()["name"] == "ci-2"

    r = client.post(f"{API}/keys/{created['id']}/revoke", headers=admin.headers)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = client.patch(
        f"{API}/keys/{created['id']}", json={"status": "active"}, headers=admin.headers
    )
    assert r.status_code == 409


def test_key_expiry_must_be_future(client: TestClient, admin: Admin) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    r = client.post(f"{API}/keys", json={"name": "x", "expires_at": past}, headers=admin.headers)
    assert r.status_code == 422
    assert _error(r)["param"] == "expires_at"


def test_config_revision_bumps_on_change(client: TestClient, admin: Admin, state: AppState) -> None:
    from onetoken.db.session import current_revision

    with state.session_factory() as s:
        before = current_revision(s)
    client.post(f"{API}/keys", json={"name": "r"}, headers=admin.headers)
    with state.session_factory() as s:
        assert current_revision(s) > before


def test_read_only_roles_cannot_write(client: TestClient, admin: Admin, state: AppState) -> None:
    viewer = add_account(state, client, admin.org_id, "viewer@acme.test", "viewer")
    developer = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    for headers in (viewer, developer):
        assert client.get(f"{API}/keys", headers=headers).status_code == 200
        # Developers manage their own keys (docs/permissions.md); viewers cannot.
        r = client.post(f"{API}/keys", json={"name": "x"}, headers=headers)
        assert r.status_code == (201 if headers is developer else 403)
        r = client.post(f"{API}/providers", json={}, headers=headers)
        assert r.status_code == 403
        assert _error(r)["code"] == "permission_denied"
        r = client.post(
            f"{API}/billing/credits",
            json={"amount": "1", "idempotency_key": "k"},
            headers=headers,
        )
        assert r.status_code == 403
    billing = add_account(state, client, admin.org_id, "billing@acme.test", "billing")
    # Billing places orders; it does not credit the org (an operator does).
    r = client.post(
        f"{API}/billing/orders", json={"kind": "recharge", "amount": "1"}, headers=billing
    )
    assert r.status_code == 201
    assert client.post(f"{API}/keys", json={"name": "x"}, headers=billing).status_code == 403


# -- org isolation ----------------------------------------------------------------------


def _setup_provider_and_model(client: TestClient, admin: Admin, name: str = "p") -> tuple[str, str]:
    r = client.post(
        f"{API}/providers",
        json={"name": name, "base_url": "http://upstream.test:9/v1",
              "api_key": "sk-UPSTREAM-SECRET-1"},
        headers=admin.headers,
    )
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = client.post(
        f"{API}/models",
        json={
            "name": f"{name}-chat",
            "provider_id": pid,
            "upstream_model": "gpt-x",
            "input_price": "0.50",
            "output_price": "1.50",
            "cached_input_price": "0.25",
        },
        headers=admin.headers,
    )
    assert r.status_code == 201, r.text
    return pid, r.json()["id"]


def test_org_isolation(
    client: TestClient, admin: Admin, other_admin: Admin, operator: Admin
) -> None:
    key_id = client.post(f"{API}/keys", json={"name": "a"}, headers=admin.headers).json()["id"]
    pid, mid = _setup_provider_and_model(client, admin)
    r = client.post(
        f"{API}/billing/credits",
        json={"amount": "5", "idempotency_key": "x", "org_id": admin.org_id},
        headers=operator.headers,
    )
    assert r.status_code == 201, r.text
    h = other_admin.headers

    assert client.get(f"{API}/keys", headers=h).json()["data"] == []
    assert client.get(f"{API}/providers", headers=h).json()["data"] == []
    assert client.get(f"{API}/models", headers=h).json()["data"] == []
    assert client.get(f"{API}/billing/ledger", headers=h).json()["data"] == []
    assert client.get(f"{API}/billing/balance", headers=h).json()["balance"] == "0.000000000"
    for method, path, body in [
        ("GET", f"/keys/{key_id}", None),
        ("PATCH", f"/keys/{key_id}", {"name": "pwned"}),
        ("POST", f"/keys/{key_id}/revoke", None),
        ("GET", f"/providers/{pid}", None),
        ("PATCH", f"/providers/{pid}", {"base_url": "http://evil.test/v1"}),
        ("DELETE", f"/providers/{pid}", None),
        ("GET", f"/models/{mid}", None),
        ("PATCH", f"/models/{mid}", {"input_price": "0"}),
        ("DELETE", f"/models/{mid}", None),
        ("GET", f"/orgs/{admin.org_id}", None),
    ]:
        r = client.request(method, f"{API}{path}", json=body, headers=h)
        assert r.status_code == 404, (method, path, r.status_code)
    # A model of another org's provider cannot be created either.
    r = client.post(
        f"{API}/models",
        json={"name": "steal", "provider_id": pid, "upstream_model": "x", "input_price": "0"},
        headers=h,
    )
    assert r.status_code == 404

    # Nothing changed for the first org.
    key = client.get(f"{API}/keys/{key_id}", headers=admin.headers).json()
    assert key["name"] == "a" and key["status"] == "active"
    prov = client.get(f"{API}/providers/{pid}", headers=admin.headers).json()
    assert prov["base_url"] == "http://upstream.test:9/v1"
    assert (
        client.get(f"{API}/models/{mid}", headers=admin.headers).json()["input_price"]
        == "0.500000000"
    )
    assert (
        client.get(f"{API}/billing/balance", headers=admin.headers).json()["balance"]
        == "5.000000000"
    )


# -- providers and models ---------------------------------------------------------------


def test_provider_api_key_is_write_only_and_encrypted(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    pid, _ = _setup_provider_and_model(client, admin)
    responses = [
        client.get(f"{API}/providers", headers=admin.headers),
        client.get(f"{API}/providers/{pid}", headers=admin.headers),
        client.patch(
            f"{API}/providers/{pid}", json={"idle_timeout_ms": 5000}, headers=admin.headers
        ),
        client.get("/api/openapi.json"),
    ]
    for r in responses:
        assert "sk-UPSTREAM-SECRET-1" not in r.text
    body = responses[1].json()
    assert body["has_api_key"] is True
    assert "api_key" not in body and "api_key_encrypted" not in body
    with state.session_factory() as s:
        stored = s.scalars(select(Provider)).one()
        assert stored.api_key_encrypted and "sk-UPSTREAM-SECRET-1" not in stored.api_key_encrypted
        assert state.secrets.decrypt(stored.api_key_encrypted) == "sk-UPSTREAM-SECRET-1"
    r = client.patch(f"{API}/providers/{pid}", json={"api_key": None}, headers=admin.headers)
    assert r.json()["has_api_key"] is False


def test_provider_rules(client: TestClient, admin: Admin) -> None:
    pid, mid = _setup_provider_and_model(client, admin)
    r = client.post(
        f"{API}/providers",
        json={"name": "p", "base_url": "http://x.test/v1"},
        headers=admin.headers,
    )
    assert r.status_code == 409
    r = client.post(
        f"{API}/providers",
        json={"name": "q", "base_url": "http://user:hunter2@x.test/v1"},
        headers=admin.headers,
    )
    assert r.status_code == 422 and "hunter2" not in r.text
    r = client.post(
        f"{API}/providers",
        json={"name": "q", "base_url": "http://x.test/v1", "protocol": "grpc"},
        headers=admin.headers,
    )
    assert r.status_code == 422
    assert client.delete(f"{API}/providers/{pid}", headers=admin.headers).status_code == 409
    assert client.delete(f"{API}/models/{mid}", headers=admin.headers).status_code == 204
    assert client.delete(f"{API}/providers/{pid}", headers=admin.headers).status_code == 204
    assert client.get(f"{API}/providers/{pid}", headers=admin.headers).status_code == 404


def test_model_prices_are_exact_decimal_strings(client: TestClient, admin: Admin) -> None:
    _pid, mid = _setup_provider_and_model(client, admin)
    m = client.get(f"{API}/models/{mid}", headers=admin.headers).json()
    assert (m["input_price"], m["output_price"], m["cached_input_price"]) == (
        "0.500000000",
        "1.500000000",
        "0.250000000",
    )
    for bad in ("0.0000000001", 0.5, "-1", "1e-3", "abc"):
        r = client.patch(f"{API}/models/{mid}", json={"input_price": bad}, headers=admin.headers)
        assert r.status_code == 422, bad
        err = _error(r)
        assert err["param"] == "input_price"
        assert str(bad) not in err["message"]
    r = client.patch(
        f"{API}/models/{mid}", json={"input_price": "0.000000001"}, headers=admin.headers
    )
    assert r.json()["input_price"] == "0.000000001"


def test_model_names_are_unique_across_the_deployment(
    client: TestClient, admin: Admin, other_admin: Admin
) -> None:
    _setup_provider_and_model(client, admin, "p")
    pid = client.post(
        f"{API}/providers",
        json={"name": "mine", "base_url": "http://x.test/v1"},
        headers=other_admin.headers,
    ).json()["id"]
    r = client.post(
        f"{API}/models",
        json={"name": "p-chat", "provider_id": pid, "upstream_model": "x", "input_price": "1"},
        headers=other_admin.headers,
    )
    assert r.status_code == 409


# -- billing ----------------------------------------------------------------------------


def test_credit_is_idempotent(
    client: TestClient, admin: Admin, operator: Admin, state: AppState
) -> None:
    body = {
        "amount": "100.00", "idempotency_key": "order-1", "memo": "PO 7", "org_id": admin.org_id
    }
    first = client.post(f"{API}/billing/credits", json=body, headers=operator.headers)
    again = client.post(f"{API}/billing/credits", json=body, headers=operator.headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["entry"]["id"] == again.json()["entry"]["id"]
    assert again.json()["created"] is False
    assert again.json()["balance"] == "100.000000000"
    r = client.post(
        f"{API}/billing/credits",
        json={**body, "amount": "50"},
        headers=operator.headers,
    )
    assert r.status_code == 409
    r = client.post(
        f"{API}/billing/credits",
        json={"amount": "2.5", "org_id": admin.org_id},
        headers={**operator.headers, "Idempotency-Key": "order-2"},
    )
    assert r.status_code == 201
    assert (
        client.get(f"{API}/billing/balance", headers=admin.headers).json()["balance"]
        == "102.500000000"
    )
    with state.session_factory() as s:
        assert len(s.scalars(select(LedgerEntry)).all()) == 2


def test_credit_validation(client: TestClient, admin: Admin, operator: Admin) -> None:
    for body in (
        {"amount": "0.0000000001", "idempotency_key": "a"},
        {"amount": 10.5, "idempotency_key": "a"},
        {"amount": "0", "idempotency_key": "a"},
        {"amount": "-5", "idempotency_key": "a"},
        {"amount": "5"},
    ):
        r = client.post(f"{API}/billing/credits", json=body, headers=operator.headers)
        assert r.status_code == 422, body
    r = client.post(
        f"{API}/billing/credits",
        json={"amount": "-5", "kind": "adjustment", "idempotency_key": "adj",
              "org_id": admin.org_id},
        headers=operator.headers,
    )
    assert r.status_code == 201
    assert r.json()["balance"] == "-5.000000000"


def test_ledger_pages_newest_first(client: TestClient, admin: Admin, operator: Admin) -> None:
    for i in range(5):
        client.post(
            f"{API}/billing/credits",
            json={"amount": f"{i + 1}", "idempotency_key": f"k{i}", "org_id": admin.org_id},
            headers=operator.headers,
        )
    page = client.get(f"{API}/billing/ledger?limit=2", headers=admin.headers).json()
    assert [e["amount"] for e in page["data"]] == ["5.000000000", "4.000000000"]
    assert page["has_more"] is True
    last = page["data"][-1]["id"]
    page = client.get(
        f"{API}/billing/ledger?limit=10&before_id={last}", headers=admin.headers
    ).json()
    assert [e["amount"] for e in page["data"]] == ["3.000000000", "2.000000000", "1.000000000"]
    assert page["has_more"] is False


# -- errors -----------------------------------------------------------------------------


def test_validation_errors_never_echo_submitted_values(
    client: TestClient, admin: Admin, operator: Admin
) -> None:
    canary = "CANARY-7f3a9"
    cases = [
        ("POST", "/keys", {"name": "x", canary: canary}),
        ("POST", "/keys", {"name": ["CANARY-7f3a9"]}),
        ("POST", "/keys", {"name": "x", "expires_at": canary}),
        ("POST", "/keys", {"name": "x", "allowed_models": [canary + " with spaces"]}),
        ("POST", "/providers", {"name": canary, "base_url": canary}),
        ("POST", "/billing/credits", {"amount": canary, "idempotency_key": canary + "!"}),
        ("POST", "/auth/login", {"email": canary, "password": 5}),
    ]
    for method, path, body in cases:
        # Crediting is the operator's: anyone else is refused before the body is read.
        who = operator if path == "/billing/credits" else admin
        r = client.request(method, f"{API}{path}", json=body, headers=who.headers)
        assert r.status_code == 422, (path, r.text)
        assert canary not in r.text, (path, r.text)
        assert _error(r)["type"] == "invalid_request_error"
    r = client.post(
        f"{API}/keys",
        content=b'{"name": "CANARY-7f3a9',
        headers={**admin.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and canary not in r.text


def test_unknown_route_is_openai_shaped(client: TestClient) -> None:
    r = client.get(f"{API}/nope")
    assert r.status_code == 404
    assert _error(r)["code"] == "not_found"


def test_keys_table_holds_no_plaintext(client: TestClient, admin: Admin, state: AppState) -> None:
    secrets_seen = [
        client.post(f"{API}/keys", json={"name": f"k{i}"}, headers=admin.headers).json()["key"]
        for i in range(3)
    ]
    with state.session_factory() as s:
        rows = s.scalars(select(ApiKey)).all()
        blob = " ".join(f"{r.hash} {r.display} {r.name}" for r in rows)
    for secret in secrets_seen:
        assert secret not in blob
