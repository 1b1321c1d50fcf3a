"""Gateway pools and the commercial terms that pin an org to one: the control API (who may
set what) and the snapshots each kind of gateway gets (docs/pools.md)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.testclient import TestClient

from onetoken.gateway.snapshot import SnapshotSource, build_snapshot
from onetoken.kit import channel
from onetoken.state import AppState
from tests import builders as build
from tests.support import TEST_SECRET
from tests.unit.conftest import Admin, add_account


def _pin(client: TestClient, operator: Admin, org_id: str, pool: str | None) -> Any:
    return client.patch(
        f"/api/v1/orgs/{org_id}/terms", json={"pool": pool}, headers=operator.headers
    )


def test_operators_run_pools_and_pin_orgs_members_read_it(
    client: TestClient, state: AppState, operator: Admin, admin: Admin, other_admin: Admin
) -> None:
    r = client.post(
        "/api/v1/pools", json={"name": "acme-eu", "description": "Acme, EU"},
        headers=operator.headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["orgs"] == 0
    again = client.post("/api/v1/pools", json={"name": "acme-eu"}, headers=operator.headers)
    assert again.status_code == 409
    bad = client.post("/api/v1/pools", json={"name": "Acme EU"}, headers=operator.headers)
    assert bad.status_code == 422
    # A pool's own log database is one of the control plane's (`onetoken_...`).
    for database in ("system", "onetoken", "onetoken_EU"):
        r = client.post("/api/v1/pools", json={"name": "x", "clickhouse_database": database},
                        headers=operator.headers)
        assert r.status_code == 422, database

    # Pinning to a pool that does not exist is refused on the field.
    unknown = _pin(client, operator, admin.org_id, "nowhere")
    assert unknown.status_code == 422
    assert unknown.json()["error"]["param"] == "pool"

    pinned = _pin(client, operator, admin.org_id, "acme-eu")
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["pool"] == "acme-eu"

    # The org's members read it, in its terms and on the org itself.
    viewer = add_account(state, client, admin.org_id, "viewer@acme.test", "viewer")
    assert client.get("/api/v1/org", headers=viewer).json()["pool"] == "acme-eu"
    terms = client.get(f"/api/v1/orgs/{admin.org_id}/terms", headers=viewer)
    assert terms.status_code == 200
    assert terms.json()["pool"] == "acme-eu"
    # Another org's terms answer like an unknown org; unpinned orgs use the shared gateways.
    assert client.get(f"/api/v1/orgs/{admin.org_id}/terms",
                      headers=other_admin.headers).status_code == 404
    assert client.get("/api/v1/org", headers=other_admin.headers).json()["pool"] is None

    listed = client.get("/api/v1/pools", headers=operator.headers).json()["data"]
    assert [(p["name"], p["orgs"]) for p in listed] == [("acme-eu", 1)]
    changed = client.patch("/api/v1/pools/acme-eu", json={"clickhouse_database": "onetoken_acme"},
                           headers=operator.headers)
    assert changed.json()["description"] == "Acme, EU"
    assert changed.json()["clickhouse_database"] == "onetoken_acme"

    # Back to the shared gateways.
    assert _pin(client, operator, admin.org_id, None).json()["pool"] is None
    assert client.get("/api/v1/org", headers=admin.headers).json()["pool"] is None


def test_tenants_cannot_set_their_pool_or_manage_pools(
    client: TestClient, operator: Admin, admin: Admin
) -> None:
    assert client.post("/api/v1/pools", json={"name": "x"},
                       headers=operator.headers).status_code == 201
    # The owner holds every tenant permission, and still may not.
    r = client.patch(f"/api/v1/orgs/{admin.org_id}/terms", json={"pool": "x"},
                     headers=admin.headers)
    assert r.status_code == 403
    assert client.get("/api/v1/pools", headers=admin.headers).status_code == 403
    assert client.post("/api/v1/pools", json={"name": "y"},
                       headers=admin.headers).status_code == 403
    # Nor through the org's own settings.
    assert client.patch("/api/v1/org", json={"pool": "x"},
                        headers=admin.headers).status_code == 422
    assert client.get("/api/v1/org", headers=admin.headers).json()["pool"] is None


def _world(state: AppState, client: TestClient, operator: Admin) -> dict[str, Any]:
    """Org A pinned to pool `p1` with its own provider; org B on the shared gateways."""
    with state.session_factory() as s:
        a, owner_a = build.org_with_owner(s, "A", "a@a.test")
        b, owner_b = build.org_with_owner(s, "B", "b@b.test")
        prov_a = build.provider(s, state.secrets, a.id, api_key="sk-ORG-A")
        build.model(s, a.id, prov_a, "a-chat", input_price=1)
        prov_b = build.provider(s, state.secrets, b.id, name="up-b", api_key="sk-ORG-B")
        build.model(s, b.id, prov_b, "b-chat", input_price=1)
        key_a, _ = build.api_key(s, state.secrets, a, owner_a)
        key_b, _ = build.api_key(s, state.secrets, b, owner_b)
        s.commit()
        ids = {"a": a.id, "b": b.id, "key_a": key_a.id, "key_b": key_b.id,
               "hash_a": key_a.hash, "hash_b": key_b.hash}
    assert client.post("/api/v1/pools", json={"name": "p1"},
                       headers=operator.headers).status_code == 201
    assert _pin(client, operator, ids["a"], "p1").status_code == 200
    return ids


def _snap(state: AppState, pool: str | None) -> dict[str, Any]:
    with state.session_factory() as s:
        return build_snapshot(s, state.secrets, version=1, spent_marks={}, pool=pool)


def test_each_gateway_kind_carries_only_its_orgs_and_knows_the_rest_by_hash(
    client: TestClient, state: AppState, operator: Admin
) -> None:
    ids = _world(state, client, operator)
    pool = _snap(state, "p1")
    assert [o["id"] for o in pool["orgs"]] == [ids["a"]]
    assert [k["key_id"] for k in pool["keys"]] == [ids["key_a"]]
    assert {p.get("org_id") for p in pool["providers"]} == {ids["a"]}
    assert {m["name"] for m in pool["models"]} == {"a-chat"}
    text = orjson.dumps(pool).decode()
    # Nothing of the other org: not its id, credentials, models or key ids.
    for foreign in (ids["b"], ids["key_b"], "sk-ORG-B", "b-chat"):
        assert foreign not in text
    # Its key (and the operator's) by hash only, marked as served by the shared gateways.
    assert {"hash": ids["hash_b"], "shared": True} in pool["elsewhere_keys"]
    assert all(set(e) <= {"hash", "shared", "secret_version"} for e in pool["elsewhere_keys"])

    shared = _snap(state, None)
    assert ids["a"] not in {o["id"] for o in shared["orgs"]}
    assert ids["b"] in {o["id"] for o in shared["orgs"]}
    assert "sk-ORG-A" not in orjson.dumps(shared).decode()
    assert {"hash": ids["hash_a"]} in shared["elsewhere_keys"]

    # The engine takes both as they are: nothing dropped.
    from onetoken import _core

    for snap in (pool, shared):
        assert _core.validate_snapshot(orjson.dumps(snap)) == []


def test_the_channel_serves_the_asking_pool_and_a_pinning_reaches_it(
    client: TestClient, state: AppState, operator: Admin
) -> None:
    ids = _world(state, client, operator)
    state.snapshots = SnapshotSource(state.secrets, state.session_factory)
    token = channel.channel_token(TEST_SECRET.encode(), channel.GATEWAY)
    bearer = {"Authorization": f"Bearer {token}"}

    def poll(instance: str, pool: str | None, etag: str | None = None) -> Any:
        query = f"instance={instance}" + (f"&pool={pool}" if pool else "")
        headers = {**bearer, **({"If-None-Match": etag} if etag else {})}
        return client.get(f"/internal/gateway/snapshot?{query}", headers=headers)

    first = poll("g-pool", "p1")
    assert [o["id"] for o in first.json()["orgs"]] == [ids["a"]]
    assert poll("g-pool", "p1", first.headers["etag"]).status_code == 304
    assert poll("g-pool", "Not A Pool").status_code == 422
    # Moving org A back to the shared gateways is a config change for every gateway.
    assert _pin(client, operator, ids["a"], None).status_code == 200
    moved = poll("g-pool", "p1", first.headers["etag"])
    assert moved.status_code == 200
    assert moved.json()["orgs"] == []
    assert ids["a"] in {o["id"] for o in poll("g-shared", None).json()["orgs"]}
