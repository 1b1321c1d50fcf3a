"""Blocked source addresses through the control API (operators): what is blocked reaches
the gateway's snapshot, and lifting it takes it out again."""

from __future__ import annotations

from fastapi.testclient import TestClient

from onetoken.security import blocking
from onetoken.state import AppState

from .conftest import make_org_admin

API = "/api/v1/security/blocked"


def snapshot_cidrs(state: AppState) -> list[str]:
    with state.session_factory() as session:
        return [e["cidr"] for e in blocking.snapshot_entries(session)]


def test_operators_block_list_and_unblock(client: TestClient, state: AppState) -> None:
    operator = make_org_admin(state, client, "Platform", "ops@platform.test", is_operator=True)
    owner = make_org_admin(state, client, "Acme", "owner@acme.test")
    h = operator.headers

    r = client.post(API, headers=h, json={"source": "203.0.113.7", "minutes": 30})
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "203.0.113.7/32" and r.json()["reason"] == "operator"
    assert snapshot_cidrs(state) == ["203.0.113.7/32"]
    listed = client.get(API, headers=h).json()["data"]
    assert [b["source"] for b in listed] == ["203.0.113.7/32"]

    r = client.post(API, headers=h, json={"source": "not an address", "minutes": 30})
    assert r.status_code == 422 and r.json()["error"]["param"] == "source"
    # Tenants, owners included, neither see nor change the platform's blocks.
    assert client.get(API, headers=owner.headers).status_code == 403
    r = client.post(f"{API}/remove", headers=owner.headers, json={"source": "203.0.113.7"})
    assert r.status_code == 403

    r = client.post(f"{API}/remove", headers=h, json={"source": "203.0.113.7"})
    assert r.status_code == 204
    assert snapshot_cidrs(state) == []
    r = client.post(f"{API}/remove", headers=h, json={"source": "203.0.113.7"})
    assert r.status_code == 404
