"""Provider registry, deployments, routes, policies, limits and guard through the control
API, and what they put into the snapshot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from onetoken import _core
from onetoken.db.session import current_revision
from onetoken.gateway.snapshot import build_snapshot, snapshot_json
from onetoken.keys import service as keys
from onetoken.orgs.models import Account
from onetoken.providers.gateway_schemas import DEFAULT_STRATEGY, Routing
from onetoken.providers.models import Provider
from onetoken.providers.presets import PRESETS
from onetoken.state import AppState
from tests.unit.conftest import Admin, add_account, drained_events, make_org_admin

API = "/api/v1"
SECRET = "sk-UPSTREAM-CANARY-7f3a9"


@pytest.fixture
def operator(state: AppState, client: TestClient) -> Admin:
    """An owner of the first org flagged as platform staff."""
    op = make_org_admin(state, client, "Platform", "ops@platform.test")
    with state.session_factory() as s:
        s.get(Account, op.account_id).is_operator = True  # type: ignore[union-attr]
        s.commit()
    return op


@pytest.fixture
def tenant(state: AppState, client: TestClient, operator: Admin) -> Admin:
    return make_org_admin(state, client, "Tenant", "owner@tenant.test")


@pytest.fixture
def rival(state: AppState, client: TestClient, operator: Admin) -> Admin:
    return make_org_admin(state, client, "Rival", "owner@rival.test", role="admin")


def _ok(r: Any, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


def _provider(client: TestClient, who: Admin, **body: Any) -> dict[str, Any]:
    body.setdefault("base_url", "http://upstream.test:9/v1")
    return dict(_ok(client.post(f"{API}/providers", json=body, headers=who.headers), 201))


def _model(client: TestClient, who: Admin, provider_id: str, **body: Any) -> dict[str, Any]:
    body = {"upstream_model": "up", "input_price": "1", "provider_id": provider_id, **body}
    return dict(_ok(client.post(f"{API}/models", json=body, headers=who.headers), 201))


def _account_id(state: AppState, email: str) -> str:
    with state.session_factory() as s:
        return str(s.scalar(select(Account.id).where(Account.email == email)))


def _snapshot(state: AppState) -> dict[str, Any]:
    with state.session_factory() as s:
        return build_snapshot(s, state.secrets, version=1, spent_marks={})


# -- presets and providers ---------------------------------------------------------------


def test_presets_cover_the_common_vendors(client: TestClient, operator: Admin) -> None:
    data = _ok(client.get(f"{API}/provider-presets", headers=operator.headers))["data"]
    by_name = {p["name"]: p for p in data}
    assert set(by_name) == {
        "openai", "azure-openai", "anthropic", "gemini", "deepseek", "qwen", "moonshot",
        "zhipu", "doubao", "minimax",
    }
    assert by_name["anthropic"]["protocol"] == "anthropic"
    assert by_name["gemini"]["protocol"] == "gemini"
    assert by_name["azure-openai"]["protocol"] == "azure"
    assert by_name["azure-openai"]["base_url"] is None  # the customer's own resource
    for name in ("deepseek", "qwen", "moonshot", "zhipu", "doubao", "minimax"):
        assert by_name[name]["region"] == "cn-mainland", name
        assert by_name[name]["base_url"].startswith("https://"), name
    assert by_name == {name: {**p.as_dict()} for name, p in PRESETS.items()}


def test_preset_fills_what_is_not_given(client: TestClient, tenant: Admin) -> None:
    p = _provider(
        client, tenant, name="ds", preset="deepseek", base_url=None, trains_on_data=False,
        api_key=SECRET,
    )
    assert (p["vendor"], p["region"], p["protocol"]) == ("deepseek", "cn-mainland", "openai")
    assert p["base_url"] == "https://api.deepseek.com/v1"
    assert p["trains_on_data"] is False  # given wins over the preset
    assert p["retains_content"] is True
    assert p["has_api_key"] is True and SECRET not in str(p)
    assert p["scope"] == "org" and p["org_id"] == tenant.org_id
    r = client.post(
        f"{API}/providers", json={"name": "az", "preset": "azure-openai"}, headers=tenant.headers
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "base_url"
    az = _provider(client, tenant, name="az2", preset="azure-openai",
                   base_url="https://acme.openai.azure.com/openai")
    assert (az["protocol"], az["api_version"], az["vendor"]) == ("azure", "2024-10-21", "microsoft")


def test_provider_attributes_validate_without_echo(client: TestClient, tenant: Admin) -> None:
    for bad in (
        {"region": "CN Mainland!"},
        {"tags": ["ok", "NOT OK"]},
        {"max_concurrency": 0},
        {"protocol": "grpc"},
        {"preset": "nosuchvendor"},
    ):
        r = client.post(
            f"{API}/providers",
            json={"name": "x", "base_url": "http://x.test/v1", **bad},
            headers=tenant.headers,
        )
        assert r.status_code == 422, bad
        for value in ("CN Mainland!", "NOT OK", "nosuchvendor"):
            assert value not in r.text
    r = client.post(
        f"{API}/providers",
        json={"name": "x", "base_url": "http://x.test/v1", "api_key": "two words"},
        headers=tenant.headers,
    )
    assert r.status_code == 422 and "two words" not in r.text


def test_platform_catalog_is_shared_and_operator_managed(
    client: TestClient, state: AppState, operator: Admin, tenant: Admin, rival: Admin
) -> None:
    pp = _provider(client, operator, name="openai", scope="platform", preset="openai",
                   api_key=SECRET)
    assert pp["scope"] == "platform" and pp["org_id"] is None
    pm = _model(client, operator, pp["id"], name="gpt-x")
    assert pm["scope"] == "platform"
    # Every org sees the catalog (never its credential)...
    for who in (tenant, rival):
        listed = _ok(client.get(f"{API}/providers", headers=who.headers))["data"]
        assert [p["id"] for p in listed] == [pp["id"]] and SECRET not in str(listed)
        assert [m["id"] for m in _ok(client.get(f"{API}/models", headers=who.headers))["data"]] == [
            pm["id"]
        ]
    # ...and cannot change it.
    for method, path, body in [
        ("PATCH", f"/providers/{pp['id']}", {"region": "eu"}),
        ("DELETE", f"/providers/{pp['id']}", None),
        ("PATCH", f"/models/{pm['id']}", {"input_price": "0"}),
        ("DELETE", f"/models/{pm['id']}", None),
        ("POST", "/models", {"name": "mine", "provider_id": pp["id"], "upstream_model": "x",
                             "input_price": "0"}),
        ("POST", "/providers", {"name": "q", "scope": "platform", "base_url": "http://x.test"}),
        ("PUT", "/routing", {"max_attempts": 1}),
    ]:
        r = client.request(method, f"{API}{path}", json=body, headers=tenant.headers)
        assert r.status_code == 403, (method, path, r.status_code)
    with state.session_factory() as s:
        assert s.get(Provider, pp["id"]).region == "us"  # type: ignore[union-attr]
    # Operators change it.
    r = client.patch(f"{API}/providers/{pp['id']}", json={"region": "eu"}, headers=operator.headers)
    assert _ok(r)["region"] == "eu"


def test_private_entries_stay_private(
    client: TestClient, tenant: Admin, rival: Admin
) -> None:
    p = _provider(client, tenant, name="mine")
    m = _model(client, tenant, p["id"], name="tenant-chat")
    assert _ok(client.get(f"{API}/providers", headers=rival.headers))["data"] == []
    assert _ok(client.get(f"{API}/models", headers=rival.headers))["data"] == []
    for method, path in [
        ("GET", f"/providers/{p['id']}"), ("PATCH", f"/providers/{p['id']}"),
        ("DELETE", f"/providers/{p['id']}"), ("GET", f"/models/{m['id']}"),
        ("PATCH", f"/models/{m['id']}"), ("DELETE", f"/models/{m['id']}"),
        ("GET", f"/orgs/{tenant.org_id}/policy"), ("PUT", f"/orgs/{tenant.org_id}/policy"),
        ("GET", f"/orgs/{tenant.org_id}/guard"), ("PUT", f"/orgs/{tenant.org_id}/guard"),
        ("GET", f"/orgs/{tenant.org_id}/limits"),
    ]:
        r = client.request(method, f"{API}{path}", json={}, headers=rival.headers)
        assert r.status_code == 404, (method, path, r.status_code)


def test_roles(client: TestClient, state: AppState, tenant: Admin) -> None:
    viewer = add_account(state, client, tenant.org_id, "v@tenant.test", "viewer")
    developer = add_account(state, client, tenant.org_id, "d@tenant.test", "developer")
    body = {"name": "x", "base_url": "http://x.test/v1"}
    for h in (viewer, developer):
        assert client.post(f"{API}/providers", json=body, headers=h).status_code == 403
        r = client.put(f"{API}/orgs/{tenant.org_id}/policy", json={}, headers=h)
        assert r.status_code == 403
    assert client.get(f"{API}/models", headers=viewer).status_code == 200
    assert client.get(f"{API}/orgs/{tenant.org_id}/policy", headers=viewer).status_code == 200


# -- names and deployments ---------------------------------------------------------------


def test_several_deployments_per_name_and_name_ownership(
    client: TestClient, operator: Admin, tenant: Admin, rival: Admin
) -> None:
    a = _provider(client, operator, name="a", scope="platform")
    b = _provider(client, operator, name="b", scope="platform")
    _model(client, operator, a["id"], name="shared", priority=0)
    _model(client, operator, b["id"], name="shared", priority=1, weight=3)
    # One provider serves a name once.
    r = client.post(f"{API}/models", json={"name": "shared", "provider_id": a["id"],
                    "upstream_model": "x", "input_price": "1"}, headers=operator.headers)
    assert r.status_code == 409
    # All deployments of a name have one kind.
    r = client.post(f"{API}/models", json={"name": "shared", "kind": "embedding",
                    "provider_id": _provider(client, operator, name="c", scope="platform")["id"],
                    "upstream_model": "x", "input_price": "1"}, headers=operator.headers)
    assert r.status_code == 409 and r.json()["error"]["param"] == "kind"
    # An org may add its own deployment under a platform name (its own credentials)...
    mine = _provider(client, tenant, name="byok")
    _model(client, tenant, mine["id"], name="shared")
    # ...and own a private name, which no other org and not the platform may take.
    _model(client, tenant, mine["id"], name="tenant-only")
    other = _provider(client, rival, name="r")
    for who, pid in ((rival, other["id"]), (operator, a["id"])):
        r = client.post(f"{API}/models", json={"name": "tenant-only", "provider_id": pid,
                        "upstream_model": "x", "input_price": "1"}, headers=who.headers)
        assert r.status_code == 409


# -- routes ------------------------------------------------------------------------------


def test_routes_and_aliases(
    client: TestClient, state: AppState, operator: Admin, tenant: Admin
) -> None:
    a = _provider(client, operator, name="a", scope="platform")
    _model(client, operator, a["id"], name="gpt-x")
    route = _ok(client.post(f"{API}/routes", json={"name": "gpt-x", "scope": "platform",
                "strategy": "lowest_price", "aliases": ["best"]}, headers=operator.headers), 201)
    assert route["scope"] == "platform"
    # Only the operator routes platform names; aliases never shadow names.
    r = client.post(f"{API}/routes", json={"name": "gpt-x"}, headers=tenant.headers)
    assert r.status_code == 409
    t = _provider(client, tenant, name="t")
    _model(client, tenant, t["id"], name="t-chat")
    for aliases in (["gpt-x"], ["best"], ["t-chat"]):
        r = client.post(f"{API}/routes", json={"name": "t-chat", "aliases": aliases},
                        headers=tenant.headers)
        assert r.status_code in (409, 422), aliases
    r = client.post(f"{API}/models", json={"name": "best", "provider_id": t["id"],
                    "upstream_model": "x", "input_price": "1"}, headers=tenant.headers)
    assert r.status_code == 409
    tr = _ok(client.post(f"{API}/routes", json={"name": "t-chat", "strategy": "weighted",
             "aliases": ["t-fast"]}, headers=tenant.headers), 201)
    # Other orgs see platform routes and their own.
    listed = _ok(client.get(f"{API}/routes", headers=tenant.headers))["data"]
    assert {x["name"] for x in listed} == {"gpt-x", "t-chat"}
    assert client.patch(f"{API}/routes/{route['id']}", json={"strategy": "priority"},
                        headers=tenant.headers).status_code == 403
    _ok(client.patch(f"{API}/routes/{tr['id']}", json={"aliases": ["t-fast", "t-2"]},
                     headers=tenant.headers))

    snap = _snapshot(state)
    assert sorted(snap["routes"], key=lambda r: r["name"]) == [
        {"name": "gpt-x", "strategy": "lowest_price", "aliases": ["best"]},
        {"name": "t-chat", "strategy": "weighted", "aliases": ["t-fast", "t-2"]},
    ]
    assert "routing" not in snap  # defaults are not written
    body = {"max_attempts": 2, "retry_deadline_ms": 5000, "backoff_ms": 10,
            "breaker_failures": 3, "breaker_open_ms": 1000}
    assert _ok(client.put(f"{API}/routing", json=body, headers=operator.headers)) == body
    assert _snapshot(state)["routing"] == body
    assert client.delete(f"{API}/routes/{tr['id']}", headers=tenant.headers).status_code == 204
    assert [r["name"] for r in _snapshot(state)["routes"]] == ["gpt-x"]


def test_the_documented_routing_defaults_are_the_schemas() -> None:
    """docs/snapshot.md states what the engine applies while `routing` is left out: the
    values gateway_schemas.Routing leaves it out for."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "snapshot.md").read_text()
    section = doc.split("## routing", 1)[1]
    stated = json.loads(section.split("`", 2)[1])
    assert stated == Routing().model_dump()
    assert f"`strategy` defaults to `{DEFAULT_STRATEGY}`" in doc


# -- policies, limits, guard -------------------------------------------------------------


def test_policy_and_key_overrides_only_narrow(
    client: TestClient, state: AppState, tenant: Admin
) -> None:
    policy = {"allow_regions": ["cn-mainland"], "deny_vendors": ["deepseek"], "no_training": True}
    got = _ok(client.put(f"{API}/orgs/{tenant.org_id}/policy", json=policy, headers=tenant.headers))
    assert got["allow_regions"] == ["cn-mainland"] and got["zero_retention_only"] is False
    key_id = _ok(client.post(f"{API}/keys", json={"name": "k"}, headers=tenant.headers), 201)["id"]
    for widening, param in (
        ({"allow_regions": ["cn-mainland", "secret-region-x"]}, "allow_regions"),
        ({"allow_vendors": ["deepseek"]}, "allow_vendors"),
    ):
        r = client.put(f"{API}/keys/{key_id}/policy", json=widening, headers=tenant.headers)
        assert r.status_code == 422, widening
        err = r.json()["error"]
        assert (err["code"], err["param"]) == ("policy_widens", param)
        assert "secret-region-x" not in r.text and "deepseek" not in r.text
    narrow = {"allow_vendors": ["alibaba"], "deny_models": ["big"], "zero_retention_only": True}
    _ok(client.put(f"{API}/keys/{key_id}/policy", json=narrow, headers=tenant.headers))
    assert _ok(client.get(f"{API}/keys/{key_id}/policy", headers=tenant.headers))[
        "allow_vendors"
    ] == ["alibaba"]

    snap = _snapshot(state)
    org = next(o for o in snap["orgs"] if o["id"] == tenant.org_id)
    assert org["policy"] == {
        "allow_vendors": None, "deny_vendors": ["deepseek"], "allow_regions": ["cn-mainland"],
        "deny_regions": [], "allow_models": None, "deny_models": [], "no_training": True,
        "zero_retention_only": False, "trace_context": False,
    }
    key = next(k for k in snap["keys"] if k["key_id"] == key_id)
    assert key["policy"]["allow_vendors"] == ["alibaba"]
    assert key["policy"]["zero_retention_only"] is True
    # Back to the default: nothing written.
    _ok(client.put(f"{API}/orgs/{tenant.org_id}/policy", json={}, headers=tenant.headers))
    _ok(client.put(f"{API}/keys/{key_id}/policy", json={}, headers=tenant.headers))
    snap = _snapshot(state)
    assert "policy" not in next(o for o in snap["orgs"] if o["id"] == tenant.org_id)
    assert "policy" not in next(k for k in snap["keys"] if k["key_id"] == key_id)


def test_no_training_is_the_default_and_only_the_owner_lifts_it(
    client: TestClient, state: AppState, tenant: Admin, operator: Admin
) -> None:
    """Policy clause I.3: no provider that trains on submitted data serves an org unless
    its owner chose so; the choice (and its reversal) is in the security log."""
    path = f"{API}/orgs/{tenant.org_id}/policy"
    assert _ok(client.get(path, headers=tenant.headers))["no_training"] is True
    # The default is what the engine applies to an org without a policy entry.
    assert "policy" not in next(o for o in _snapshot(state)["orgs"] if o["id"] == tenant.org_id)

    admin = add_account(state, client, tenant.org_id, "a@tenant.test", "admin")
    for who in (admin, operator.headers):
        r = client.put(path, json={"no_training": False}, headers=who)
        assert r.status_code == 403, r.text
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
            "owner_only", "no_training"
        )
    assert _ok(client.get(path, headers=tenant.headers))["no_training"] is True

    _ok(client.put(path, json={"no_training": False}, headers=tenant.headers))
    org = next(o for o in _snapshot(state)["orgs"] if o["id"] == tenant.org_id)
    assert org["policy"]["no_training"] is False
    # Once lifted, an admin may change the rest without touching it, or put it back.
    _ok(client.put(path, json={"no_training": False, "deny_regions": ["eu"]}, headers=admin))
    _ok(client.put(path, json={}, headers=admin))
    assert "policy" not in next(o for o in _snapshot(state)["orgs"] if o["id"] == tenant.org_id)

    changes = [(e["kind"], e["actor_id"]) for e in drained_events()
               if e["kind"] in ("org.training_allowed", "org.training_refused")]
    assert sorted(changes) == sorted([
        ("org.training_allowed", tenant.account_id),
        ("org.training_refused", _account_id(state, "a@tenant.test")),
    ])


def test_every_member_sees_who_processes_each_model(
    client: TestClient, state: AppState, tenant: Admin
) -> None:
    """Policy clause V.2: vendor, region and data-handling facts of each deployment."""
    p = _provider(client, tenant, name="ds", preset="deepseek", base_url=None)
    _model(client, tenant, p["id"], name="ds-chat")
    viewer = add_account(state, client, tenant.org_id, "v@tenant.test", "viewer")
    listed = _ok(client.get(f"{API}/models", headers=viewer))["data"]
    got = next(m for m in listed if m["name"] == "ds-chat")["processor"]
    preset = PRESETS["deepseek"]
    assert got == {
        "vendor": preset.vendor, "region": preset.region,
        "trains_on_data": preset.trains_on_data, "retains_content": preset.retains_content,
        "zero_retention": preset.zero_retention,
    }
    assert got["trains_on_data"] is True


def test_org_limits_are_set_by_operators(
    client: TestClient, state: AppState, operator: Admin, tenant: Admin
) -> None:
    path = f"{API}/orgs/{tenant.org_id}/limits"
    assert client.put(path, json={"rpm": 10_000}, headers=tenant.headers).status_code == 403
    assert client.put(path, json={"rpm": 0}, headers=operator.headers).status_code == 422
    # The largest limit the API takes is stored (an INTEGER column on PostgreSQL too); one
    # more is a 422, not a database error.
    top = {"rpm": 2_000_000_000, "tpm": 2_000_000_000}
    assert _ok(client.put(path, json=top, headers=operator.headers))["tpm"] == 2_000_000_000
    r = client.put(path, json={"tpm": 4_000_000_000}, headers=operator.headers)
    assert r.status_code == 422, r.text
    got = _ok(client.put(path, json={"rpm": 60, "tpm": 1000, "concurrency": 2},
                         headers=operator.headers))
    assert got == {"rpm": 60, "tpm": 1000, "concurrency": 2}
    assert _ok(client.get(path, headers=tenant.headers)) == got
    org = next(o for o in _snapshot(state)["orgs"] if o["id"] == tenant.org_id)
    assert org["limits"]["rpm"] == 60 and org["limits"]["concurrency"] == 2
    assert set(org["limits"]) == {"rpm", "tpm", "concurrency", "budget_day", "budget_month"}
    _ok(client.put(path, json={}, headers=operator.headers))
    org = next(o for o in _snapshot(state)["orgs"] if o["id"] == tenant.org_id)
    assert org.get("limits", {}).get("rpm") is None


def test_guard_setting(client: TestClient, state: AppState, tenant: Admin) -> None:
    path = f"{API}/orgs/{tenant.org_id}/guard"
    assert _ok(client.get(path, headers=tenant.headers)) == {"mode": "off", "categories": None}
    r = client.put(path, json={"mode": "block", "categories": ["bank_card", "tarot"]},
                   headers=tenant.headers)
    assert r.status_code == 422 and "tarot" not in r.text
    got = _ok(client.put(path, json={"mode": "block", "categories": ["bank_card", "phone"]},
                         headers=tenant.headers))
    assert got == {"mode": "block", "categories": ["bank_card", "phone"]}
    org = next(o for o in _snapshot(state)["orgs"] if o["id"] == tenant.org_id)
    assert org["guard"] == got
    _ok(client.put(path, json={"mode": "off"}, headers=tenant.headers))
    assert "guard" not in next(o for o in _snapshot(state)["orgs"] if o["id"] == tenant.org_id)


# -- the snapshot ------------------------------------------------------------------------


def test_snapshot_catalog_sections(
    client: TestClient, state: AppState, operator: Admin, tenant: Admin, rival: Admin
) -> None:
    plain = _provider(client, operator, name="plain", scope="platform")
    rich = _provider(client, operator, name="rich", scope="platform", preset="anthropic",
                     api_key=SECRET, max_concurrency=8, zero_retention=True)
    _model(client, operator, plain["id"], name="cat-chat")
    _model(client, operator, rich["id"], name="cat-chat", priority=1, weight=2,
           request_price="0.001")
    mine = _provider(client, tenant, name="mine", region="cn-mainland", vendor="alibaba")
    _model(client, tenant, mine["id"], name="tenant-chat")
    tk = _ok(client.post(f"{API}/keys", json={"name": "k"}, headers=tenant.headers), 201)["id"]
    rk = _ok(client.post(f"{API}/keys", json={"name": "k"}, headers=rival.headers), 201)["id"]

    snap = _snapshot(state)
    provs = {p["id"]: p for p in snap["providers"]}
    assert set(provs[plain["id"]]) == {
        "id", "name", "protocol", "base_url", "api_key", "connect_timeout_ms",
        "first_byte_timeout_ms", "idle_timeout_ms",
    }
    r = provs[rich["id"]]
    assert (r["protocol"], r["api_version"], r["vendor"], r["region"]) == (
        "anthropic", "2023-06-01", "anthropic", "us"
    )
    assert (r["retains_content"], r["zero_retention"], r["max_concurrency"], r["tags"]) == (
        True, True, 8, ["soc2"]
    )
    assert "trains_on_data" not in r and r["api_key"] == SECRET
    assert provs[mine["id"]]["region"] == "cn-mainland"
    deployments = [m for m in snap["models"] if m["name"] == "cat-chat"]
    assert len(deployments) == 2 and all("org_id" not in m for m in deployments)
    second = next(m for m in deployments if m["provider_id"] == rich["id"])
    assert (second["priority"], second["weight"], second["request_price"]) == (1, 2, 1_000_000)
    private = next(m for m in snap["models"] if m["name"] == "tenant-chat")
    assert private["org_id"] == tenant.org_id
    keys_by_id = {k["key_id"]: k for k in snap["keys"]}
    assert keys_by_id[tk]["allowed_models"] == ["cat-chat", "tenant-chat"]
    assert keys_by_id[rk]["allowed_models"] == ["cat-chat"]


def test_snapshot_restriction_of_key_models_keeps_platform_names(
    client: TestClient, state: AppState, operator: Admin, tenant: Admin
) -> None:
    p = _provider(client, operator, name="p", scope="platform")
    _model(client, operator, p["id"], name="cat-chat")
    with state.session_factory() as s:
        owner = s.scalars(select(Account).where(Account.org_id == tenant.org_id)).first()
        assert owner is not None
        key, plaintext = keys.create_key(
            s, state.secrets, org_id=tenant.org_id, created_by=owner.id, name="r",
            allowed_models=["cat-chat", "elsewhere"],
        )
        s.commit()
    snap = _snapshot(state)
    assert next(k for k in snap["keys"] if k["key_id"] == key.id)["allowed_models"] == [
        "cat-chat"
    ]
    assert plaintext.encode() not in snapshot_json(snap)


def test_changes_bump_the_config_revision(
    client: TestClient, state: AppState, tenant: Admin
) -> None:
    def rev() -> int:
        with state.session_factory() as s:
            return current_revision(s)

    before = rev()
    _ok(client.put(f"{API}/orgs/{tenant.org_id}/guard", json={"mode": "flag"},
                   headers=tenant.headers))
    assert rev() > before


# -- migration ---------------------------------------------------------------------------


def test_migration_keeps_existing_providers_and_models(tmp_path: Any) -> None:
    """0001 data (one org's provider and model) survives 0005's table rebuild on SQLite,
    with the defaults for the new columns, and foreign keys still hold."""
    from alembic import command
    from sqlalchemy import text

    from onetoken.db.migrate import alembic_config, upgrade
    from onetoken.db.session import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    command.upgrade(alembic_config(engine), "0001")
    now = "2026-01-01 00:00:00"
    with engine.begin() as c:
        c.execute(text("INSERT INTO orgs VALUES ('org_a', 'A', 'active', :now)"), {"now": now})
        c.execute(text(
            "INSERT INTO providers VALUES ('prov_a', 'org_a', 'p', 'openai', "
            "'http://x.test/v1', NULL, 1, 2, 3, :now)"
        ), {"now": now})
        c.execute(text(
            "INSERT INTO models VALUES ('mdl_a', 'org_a', 'a-chat', 'chat', 'prov_a', 'up', "
            "5, 6, 7, 100, :now)"
        ), {"now": now})
    upgrade(engine)
    with engine.begin() as c:
        prov = c.execute(text("SELECT org_id, vendor, tags, managed_by FROM providers")).one()
        assert tuple(prov) == ("org_a", "", "[]", "api")
        model = c.execute(
            text("SELECT name, input_price, weight, priority, request_price FROM models")
        ).one()
        assert tuple(model) == ("a-chat", 5, 1, 0, 0)
        with pytest.raises(Exception, match="FOREIGN KEY"):
            c.execute(text(
                "INSERT INTO models (id, name, kind, provider_id, upstream_model, input_price, "
                "output_price, cached_input_price, max_output_tokens, created_at) VALUES "
                "('m2', 'x', 'chat', 'prov_missing', 'up', 0, 0, 0, 0, :now)"
            ), {"now": now})
    engine.dispose()


def test_engine_accepts_every_section_this_domain_writes(
    client: TestClient, state: AppState, settings: Any, operator: Admin, tenant: Admin
) -> None:
    """The real engine (onetoken._core) compiles a snapshot using every field above."""
    import orjson

    from onetoken.gateway.supervisor import engine_config
    rich = _provider(client, operator, name="rich", scope="platform", preset="anthropic",
                     api_key=SECRET, max_concurrency=8, zero_retention=True)
    _model(client, operator, rich["id"], name="cat-chat", priority=1, weight=2,
           request_price="0.001")
    mine = _provider(client, tenant, name="mine", preset="gemini", base_url="http://g.test/v1beta")
    _model(client, tenant, mine["id"], name="cat-chat")
    _ok(client.post(f"{API}/routes", json={"name": "cat-chat", "scope": "platform",
        "strategy": "weighted", "aliases": ["cat"]}, headers=operator.headers), 201)
    _ok(client.put(f"{API}/routing", json={"max_attempts": 2}, headers=operator.headers))
    _ok(client.put(f"{API}/orgs/{tenant.org_id}/policy",
                   json={"allow_regions": ["us"], "no_training": True}, headers=tenant.headers))
    _ok(client.put(f"{API}/orgs/{tenant.org_id}/guard", json={"mode": "block"},
                   headers=tenant.headers))
    _ok(client.put(f"{API}/orgs/{tenant.org_id}/limits", json={"rpm": 5, "concurrency": 1},
                   headers=operator.headers))
    kid = _ok(client.post(f"{API}/keys", json={"name": "k"}, headers=tenant.headers), 201)["id"]
    _ok(client.put(f"{API}/keys/{kid}/policy", json={"deny_vendors": ["google"]},
                   headers=tenant.headers))
    snap = _snapshot(state)
    assert {"routes", "routing"} <= set(snap)
    engine = _core.Engine(
        orjson.dumps({**engine_config(settings, state.secrets), "listen": "127.0.0.1:0"})
    )
    engine.start()
    try:
        assert engine.load_snapshot(snapshot_json({**snap, "version": 3})) == 3
    finally:
        engine.stop(1.0)


# -- the engine's rules before commit ----------------------------------------------------


def test_changes_the_engine_would_drop_are_refused_naming_the_field(
    client: TestClient, state: AppState, tenant: Admin
) -> None:
    """Each of these used to answer 2xx and leave an entry the engine refuses; they are
    refused with 422 naming the field, and nothing of them is committed."""
    h = tenant.headers
    p = _provider(client, tenant, name="p")
    claude = _provider(client, tenant, name="claude", preset="anthropic")
    routed = _model(client, tenant, p["id"], name="routed")
    _ok(client.post(f"{API}/routes", json={"name": "routed"}, headers=h), 201)
    with state.session_factory() as s:
        revision = current_revision(s)

    def refused(r: Any, param: str) -> None:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param, r.text
        assert "<" not in r.text and "`" not in r.text

    # A route to a name with no model.
    refused(client.post(f"{API}/routes", json={"name": "ghost"}, headers=h), "name")
    # A base URL the engine cannot make a request line of.
    for bad in ("http://x.test/<v1>", "http://x.test/v1>", "http://x.test/`v1`"):
        refused(client.post(f"{API}/providers", json={"name": "bad", "base_url": bad},
                            headers=h), "base_url")
        refused(client.patch(f"{API}/providers/{p['id']}", json={"base_url": bad}, headers=h),
                "base_url")
    # An embedding model on a provider whose protocol has no embeddings.
    body = {"name": "emb", "kind": "embedding", "provider_id": claude["id"],
            "upstream_model": "x", "input_price": "1"}
    refused(client.post(f"{API}/models", json=body, headers=h), "kind")
    # Deleting or renaming the model a route is for.
    refused(client.delete(f"{API}/models/{routed['id']}", headers=h), "name")
    refused(client.patch(f"{API}/models/{routed['id']}", json={"name": "renamed"}, headers=h),
            "name")

    with state.session_factory() as s:
        assert current_revision(s) == revision, "nothing was committed"
    snap = _snapshot(state)
    assert _core.validate_snapshot(snapshot_json(snap)) == []
    assert [m["name"] for m in snap["models"]] == ["routed"]


def test_a_problem_already_in_the_database_does_not_block_other_changes(
    client: TestClient, state: AppState, tenant: Admin
) -> None:
    """An entry written around the API (here a route to no model) is the engine's to drop;
    unrelated changes are not refused because of it."""
    from onetoken.providers.models import Route
    with state.session_factory() as s:
        s.add(Route(id="rte_forced", org_id=tenant.org_id, name="forced", aliases=[]))
        s.commit()
    p = _provider(client, tenant, name="p")
    _model(client, tenant, p["id"], name="fine")
