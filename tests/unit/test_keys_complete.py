"""API keys complete: scopes, limits, rotation with overlap, revocation, owners, versioned
hash secrets, the engine's view of them, and the audit trail of every change."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from onetoken.gateway.snapshot import build_snapshot
from onetoken.gateway.supervisor import engine_config
from onetoken.keys import service as keys
from onetoken.keys.models import ApiKey
from onetoken.kit.crypto import KEY_HASH_CONTEXT, Secrets, derive_secret
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.unit.conftest import Admin, add_account
from tests.unit.test_accounts import drained_events

API = "/api/v1"


def snapshot_key(state: AppState, key_id: str) -> dict[str, Any]:
    with state.session_factory() as s:
        snap = build_snapshot(s, state.secrets, version=1, spent_marks={})
    (entry,) = [k for k in snap["keys"] if k["key_id"] == key_id]
    return dict(entry)


def test_create_with_scopes_and_limits(client: TestClient, admin: Admin, state: AppState) -> None:
    r = client.post(f"{API}/keys", headers=admin.headers, json={
        "name": "ci",
        "allowed_models": ["demo-chat"],
        "allowed_ips": ["10.1.2.3", "192.168.0.0/16", "2001:db8::/32"],
        "limits": {"rpm": 60, "tpm": 100000, "concurrency": 4,
                   "budget_day": "1.5", "budget_month": "30.000000001"},
    })
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["allowed_ips"] == ["10.1.2.3/32", "192.168.0.0/16", "2001:db8::/32"]
    assert body["limits"] == {"rpm": 60, "tpm": 100000, "concurrency": 4,
                              "budget_day": "1.500000000", "budget_month": "30.000000001"}
    assert body["owner_id"] == admin.account_id and body["secret_version"] == 1
    plaintext = body["key"]
    # Listing shows the display id only.
    listed = client.get(f"{API}/keys", headers=admin.headers).text
    assert plaintext not in listed and body["display"] in listed
    with state.session_factory() as s:
        row = s.get(ApiKey, body["id"])
        assert row is not None
        assert row.budget_day == 1_500_000_000 and row.budget_month == 30_000_000_001
        assert row.hash == hmac.new(state.secrets.key_hash, plaintext.encode(),
                                    hashlib.sha256).hexdigest()
    entry = snapshot_key(state, body["id"])
    assert entry["allowed_ips"] == body["allowed_ips"]
    assert entry["limits"] == {"rpm": 60, "tpm": 100000, "concurrency": 4,
                               "budget_day": 1_500_000_000, "budget_month": 30_000_000_001}
    assert entry["account_id"] == admin.account_id
    assert "secret_version" not in entry  # the default, left out for older engines


def test_invalid_scopes_are_refused_without_echo(client: TestClient, admin: Admin) -> None:
    for body in (
        {"name": "x", "allowed_ips": ["not-an-ip-canary"]},
        {"name": "x", "limits": {"budget_day": 1.5}},
        {"name": "x", "limits": {"budget_day": "0.0000000001"}},
        {"name": "x", "limits": {"rpm": 0}},
        {"name": "x", "limits": {"burst": 1}},
    ):
        r = client.post(f"{API}/keys", headers=admin.headers, json=body)
        assert r.status_code == 422, body
        assert "canary" not in r.text and "burst" not in r.json()["error"]["message"]


def test_update_scopes_is_audited_with_before_and_after(client: TestClient, admin: Admin) -> None:
    key = client.post(f"{API}/keys", headers=admin.headers, json={"name": "a"}).json()
    drained_events()
    r = client.patch(f"{API}/keys/{key['id']}", headers=admin.headers, json={
        "allowed_ips": ["10.0.0.0/8"], "limits": {"rpm": 10, "budget_month": "2"}})
    assert r.status_code == 200, r.text
    assert r.json()["limits"]["rpm"] == 10 and r.json()["limits"]["tpm"] is None
    (event,) = [e for e in drained_events() if e["kind"] == "admin.key_scope_changed"]
    d = event["detail"]
    assert d["allowed_ips.before"] is None and d["allowed_ips.after"] == '["10.0.0.0/8"]'
    assert d["rpm.before"] is None and d["rpm.after"] == 10
    assert d["budget_month.after"] == 2_000_000_000
    assert set(d["changed"].split(",")) == {"allowed_ips", "rpm", "budget_month"}
    assert event["actor_id"] == admin.account_id and event["subject_id"] == key["id"]
    assert key["key"] not in str(event)
    # Clearing works the same way.
    r = client.patch(f"{API}/keys/{key['id']}", headers=admin.headers,
                     json={"allowed_ips": None, "limits": None})
    assert r.json()["allowed_ips"] is None and r.json()["limits"]["rpm"] is None


def test_rotate_with_overlap_then_revoke(client: TestClient, admin: Admin, state: AppState) -> None:
    old = client.post(f"{API}/keys", headers=admin.headers, json={
        "name": "svc", "allowed_models": ["m1"], "allowed_ips": ["10.0.0.0/8"],
        "limits": {"rpm": 5}}).json()
    before = datetime.now(UTC)
    r = client.post(f"{API}/keys/{old['id']}/rotate", headers=admin.headers,
                    json={"overlap_seconds": 3600})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["key"] != old["key"] and new["id"] != old["id"]
    assert new["rotated_from"] == old["id"] and new["previous_key_id"] == old["id"]
    assert (new["name"], new["allowed_models"], new["allowed_ips"], new["limits"]["rpm"]) == (
        "svc", ["m1"], ["10.0.0.0/8"], 5)
    expiry = datetime.fromisoformat(new["previous_key_expires_at"])
    assert timedelta(seconds=3590) < expiry - before < timedelta(seconds=3610)
    old_now = client.get(f"{API}/keys/{old['id']}", headers=admin.headers).json()
    assert old_now["status"] == "active"
    assert snapshot_key(state, old["id"])["expires_at"] == int(expiry.timestamp())
    # Rotating with no overlap ends the old key at once.
    r = client.post(f"{API}/keys/{new['id']}/rotate", headers=admin.headers,
                    json={"overlap_seconds": 0})
    assert r.status_code == 201
    assert client.get(f"{API}/keys/{new['id']}", headers=admin.headers).json()["status"] == \
        "revoked"
    assert snapshot_key(state, new["id"])["status"] == "revoked"
    # A revoked key can be neither rotated nor changed.
    assert client.post(f"{API}/keys/{new['id']}/rotate", headers=admin.headers).status_code == 409
    assert client.patch(f"{API}/keys/{new['id']}", headers=admin.headers,
                        json={"name": "x"}).status_code == 409
    kinds = [e["kind"] for e in drained_events()]
    assert kinds.count("admin.key_rotated") == 2


def test_a_key_rotated_before_its_window_opened_is_not_rotated_again(
    client: TestClient, admin: Admin
) -> None:
    start = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    old = client.post(f"{API}/keys", headers=admin.headers,
                      json={"name": "later", "not_before": start}).json()
    r = client.post(f"{API}/keys/{old['id']}/rotate", headers=admin.headers,
                    json={"overlap_seconds": 60})
    assert r.status_code == 201, r.text
    assert r.json()["not_before"] is not None
    # Its window is now empty (it ends before it opens): the successor holds its place.
    again = client.post(f"{API}/keys/{old['id']}/rotate", headers=admin.headers)
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "key_never_valid"


def test_developers_manage_only_their_own_keys(client: TestClient, admin: Admin,
                                               state: AppState) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    dev_id = client.get(f"{API}/me", headers=dev).json()["id"]
    mine = client.post(f"{API}/keys", headers=dev, json={"name": "mine"}).json()
    assert mine["owner_id"] == dev_id
    theirs = client.post(f"{API}/keys", headers=admin.headers, json={"name": "theirs"}).json()
    for method, suffix, body in (("PATCH", "", {"name": "x"}), ("POST", "/rotate", None),
                                 ("POST", "/revoke", None)):
        r = client.request(method, f"{API}/keys/{theirs['id']}{suffix}", headers=dev, json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_key_owner"
        r = client.request(method, f"{API}/keys/{mine['id']}{suffix}", headers=dev, json=body)
        assert r.status_code in (200, 201), r.text
    r = client.post(f"{API}/keys", headers=dev, json={"name": "x", "owner_id": admin.account_id})
    assert r.status_code == 403
    # Admins may hand a key to a member of the org, not to a stranger.
    r = client.post(f"{API}/keys", headers=admin.headers, json={"name": "x", "owner_id": dev_id})
    assert r.status_code == 201 and r.json()["owner_id"] == dev_id
    assert snapshot_key(state, r.json()["id"])["account_id"] == dev_id
    r = client.post(f"{API}/keys", headers=admin.headers, json={"name": "x", "owner_id": "acc_x"})
    assert r.status_code == 422


def test_another_org_cannot_see_or_touch_keys(client: TestClient, admin: Admin,
                                              other_admin: Admin) -> None:
    key = client.post(f"{API}/keys", headers=admin.headers, json={"name": "a"}).json()
    for method, suffix in (("GET", ""), ("PATCH", ""), ("POST", "/revoke"), ("POST", "/rotate")):
        r = client.request(method, f"{API}/keys/{key['id']}{suffix}",
                           headers=other_admin.headers, json={} if method != "GET" else None)
        assert r.status_code == 404
    assert key["id"] not in client.get(f"{API}/keys", headers=other_admin.headers).text


def test_versioned_key_hash_secret(tmp_path: Any) -> None:
    old_master = "old-secret-abcdefghijklmnopqrstu0123"
    new_master = "new-secret-ABCDEFGHIJ0123456789xyz"
    old = Secrets.from_master(old_master.encode())
    sealed = old.encrypt("provider-credential")
    settings = Settings(
        data_dir=tmp_path,
        secret_key=SecretStr(new_master),
        secret_key_version=2,
        previous_secret_keys=SecretStr(f"1:{old_master}"),
    )
    secrets = Secrets.from_settings(settings)
    assert secrets.key_hash_version == 2
    assert secrets.key_hash_for(1) == derive_secret(old_master.encode(), KEY_HASH_CONTEXT)
    assert secrets.key_hash_for(3) is None
    # What the old secret encrypted still decrypts; new encryptions use the new one.
    assert secrets.decrypt(sealed) == "provider-credential"
    assert Secrets.from_master(new_master.encode()).decrypt(
        secrets.encrypt("x")) == "x"
    cfg = engine_config(settings, secrets)
    assert cfg["key_hash_secret_hex"] == derive_secret(new_master.encode(), KEY_HASH_CONTEXT).hex()
    assert cfg["key_hash_secret_version"] == 2
    assert cfg["previous_key_hash_secrets"] == [
        {"version": 1, "secret_hex": derive_secret(old_master.encode(), KEY_HASH_CONTEXT).hex()}
    ]
    assert old_master not in orjson.dumps(cfg).decode()


def test_keys_record_the_secret_version_they_were_hashed_with(
    tmp_path: Any, state: AppState, admin: Admin
) -> None:
    newer = Secrets.from_master(b"z" * 10 + b"another-master-secret-0123456789", version=3)
    with state.session_factory() as s:
        key, plaintext = keys.create_key(s, newer, org_id=admin.org_id,
                                         created_by=admin.account_id, name="v3")
        s.commit()
        row = s.scalars(select(ApiKey).where(ApiKey.id == key.id)).one()
        assert row.secret_version == 3
        assert row.hash == hmac.new(newer.key_hash, plaintext.encode(),
                                    hashlib.sha256).hexdigest()
    assert snapshot_key(state, key.id)["secret_version"] == 3


def test_settings_refuse_malformed_previous_secrets(tmp_path: Any) -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ("nocolon", "x:" + "s" * 40, "1:short", f"2:{'s' * 40}"):
        with pytest.raises(ValidationError) as info:
            Settings(data_dir=tmp_path, secret_key=SecretStr("k" * 40), secret_key_version=2,
                     previous_secret_keys=SecretStr(bad))
        assert "s" * 40 not in str(info.value.errors(include_input=False))
