from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from onetoken import _core
from onetoken.billing import service as billing
from onetoken.gateway.snapshot import build_snapshot, snapshot_json
from onetoken.gateway.supervisor import engine_config
from onetoken.keys import service as keys
from onetoken.providers import service as providers
from onetoken.settings import Settings
from onetoken.state import AppState
from tests import builders as build
from tests.unit.conftest import contract


def _populate(state: AppState) -> dict[str, Any]:
    with state.session_factory() as s:
        a, owner_a = build.org_with_owner(s, "A", "a@a.test")
        b, owner_b = build.org_with_owner(s, "B", "b@b.test")
        prov = build.provider(s, state.secrets, a.id, api_key="sk-PROVIDER")
        build.model(s, a.id, prov, "a-chat", input_price=500_000_000,
                    output_price=1_500_000_000, cached_input_price=250_000_000,
                    max_output_tokens=4096)
        build.model(s, a.id, prov, "a-embed", kind="embedding", upstream_model="mock-embed",
                    input_price=20_000_000)
        key_a, secret_a = build.api_key(s, state.secrets, a, owner_a)
        key_limited, _ = build.api_key(
            s, state.secrets, a, owner_a, "l", allowed_models=["a-embed", "elsewhere"],
            expires_at=datetime.now(UTC) + timedelta(days=1),
        )
        key_b, _ = build.api_key(s, state.secrets, b, owner_b)
        key_off, _ = build.api_key(s, state.secrets, a, owner_a, "o")
        keys.update_key(s, a.id, key_off.id, {"status": "disabled"})
        billing.credit(s, a.id, amount=100_000_000_000, kind="grant", idempotency_key="g")
        s.commit()
        return {
            "a": a.id,
            "b": b.id,
            "key_a": key_a.id,
            "secret_a": secret_a,
            "key_limited": key_limited.id,
            "key_b": key_b.id,
            "key_off": key_off.id,
            "owner_a": owner_a.id,
        }


def _build(state: AppState, marks: dict[str, int] | None = None) -> dict[str, Any]:
    with state.session_factory() as s:
        return build_snapshot(s, state.secrets, version=7, spent_marks=marks or {})


def test_snapshot_has_exactly_the_contract_shape(state: AppState) -> None:
    """Every required field (snapshot.json) is there; optional ones (snapshot_full.json)
    only with their contract types."""
    _populate(state)
    snap = _build(state)
    ref = contract("snapshot.json")
    full = contract("snapshot_full.json")
    assert set(ref) <= set(snap) <= set(full)
    for section in ("orgs", "keys", "providers", "models"):
        assert snap[section], section
        known = {f: v for item in reversed(full[section]) for f, v in item.items()}
        for item in snap[section]:
            assert set(ref[section][0]) <= set(item) <= set(known), section
            for field, value in item.items():
                ref_value = known[field]
                if value is not None and ref_value is not None:
                    assert type(value) is type(ref_value), (section, field)


def test_providers_say_whose_they_are(state: AppState) -> None:
    """The engine lets only platform providers reach the operator's private CIDRs, so
    every org-owned provider names its org."""
    ids = _populate(state)
    with state.session_factory() as s:
        providers.create_provider(
            s,
            state.secrets,
            None,
            name="platform-up",
            protocol="openai",
            base_url="http://127.0.0.1:9010/v1",
            api_key=None,
        )
        s.commit()
    by_name = {p["name"]: p for p in _build(state)["providers"]}
    assert by_name["up"]["org_id"] == ids["a"]
    assert "org_id" not in by_name["platform-up"]


def test_snapshot_values(state: AppState) -> None:
    ids = _populate(state)
    snap = _build(state, {ids["a"]: 123})
    assert snap["version"] == 7
    orgs_by_id = {o["id"]: o for o in snap["orgs"]}
    assert orgs_by_id[ids["a"]] == {
        "id": ids["a"],
        "status": "active",
        "balance": 100_000_000_000,
        "spent_mark": 123,
    }
    assert orgs_by_id[ids["b"]]["balance"] == 0
    keys_by_id = {k["key_id"]: k for k in snap["keys"]}
    ka = keys_by_id[ids["key_a"]]
    assert ka["hash"] == state.secrets.hash_api_key(ids["secret_a"])
    assert ka["account_id"] == ids["owner_a"]
    assert ka["expires_at"] is None
    # A key without restrictions may use exactly its own org's models...
    assert ka["allowed_models"] == ["a-chat", "a-embed"]
    # ...and restrictions are intersected with them.
    assert keys_by_id[ids["key_limited"]]["allowed_models"] == ["a-embed"]
    assert isinstance(keys_by_id[ids["key_limited"]]["expires_at"], int)
    # Org B has no models: its keys can use none (not "all").
    assert keys_by_id[ids["key_b"]]["allowed_models"] == []
    assert keys_by_id[ids["key_off"]]["status"] == "revoked"
    assert snap["providers"][0]["api_key"] == "sk-PROVIDER"
    chat = next(m for m in snap["models"] if m["name"] == "a-chat")
    assert (chat["input_price"], chat["output_price"], chat["cached_input_price"]) == (
        500_000_000,
        1_500_000_000,
        250_000_000,
    )
    assert ids["secret_a"].encode() not in snapshot_json(snap)


def test_engine_config_has_exactly_the_contract_shape(settings: Settings, state: AppState) -> None:
    cfg = engine_config(settings, state.secrets)
    ref = contract("engine_config.json")
    assert set(cfg) == set(ref)
    assert cfg["key_hash_secret_hex"] == state.secrets.key_hash.hex()
    assert cfg["spool_dir"] == str((settings.data_dir / "spool").resolve())
    assert cfg["tls"] is None


def test_core_accepts_the_contract_fixtures(tmp_path: Any) -> None:
    cfg = contract("engine_config.json")
    cfg["spool_dir"] = str(tmp_path)
    engine = _core.Engine(json.dumps(cfg).encode())
    engine.start()
    try:
        assert engine.load_snapshot(json.dumps(contract("snapshot.json")).encode()) == 1
    finally:
        engine.stop(1.0)


def test_core_accepts_built_snapshot_and_rejects_unknown_fields(
    settings: Settings, state: AppState
) -> None:
    _populate(state)
    engine = _core.Engine(
        orjson.dumps({**engine_config(settings, state.secrets), "listen": "127.0.0.1:0"})
    )
    engine.start()
    try:
        snap = _build(state)
        assert engine.load_snapshot(snapshot_json(snap)) == 7
        bad = {**snap, "version": 8, "orgs": [{**snap["orgs"][0], "extra": 1}]}
        with pytest.raises(_core.ConfigError):
            engine.load_snapshot(snapshot_json(bad))
        assert engine.stats()["snapshot_version"] == 7
    finally:
        engine.stop(1.0)
