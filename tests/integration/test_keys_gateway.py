"""API keys as the gateway enforces them, driven through the control API of a real server
with the official openai SDK: changes reach the gateway within a second, scopes and limits
hold, rotation overlaps, and key risks land in the security log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from openai import OpenAI

from tests.support import wait_until

from .harness import Admin, Server, cli, running

MSG = [{"role": "user", "content": "hi"}]
PROPAGATION_S = 1.0


def sdk(deployment: dict[str, Any], key: str) -> OpenAI:
    return OpenAI(base_url=f"{deployment['server'].gateway_url}/v1", api_key=key, max_retries=0)


def call(client: OpenAI) -> Any:
    return client.chat.completions.create(model="demo-chat", messages=MSG, max_tokens=5)


def error_code(fn: Callable[[], Any]) -> tuple[int, str] | None:
    try:
        fn()
    except openai.APIStatusError as exc:
        body: Any = exc.body
        code = body.get("code") if isinstance(body, dict) else None
        return exc.status_code, str(code)
    return None


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Seconds until `check()` held; fails after `seconds`."""
    start = time.monotonic()
    wait_until(check, seconds, 0.02)
    return time.monotonic() - start


def events(admin: Admin, **params: Any) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = admin.get("/api/v1/security/events",
                                           params={"limit": 500, **params})["data"]
    return data


def test_new_and_revoked_keys_reach_the_gateway_within_a_second(
    deployment: dict[str, Any], admin: Admin
) -> None:
    created = admin.post("/api/v1/keys", {"name": "fresh"})
    client = sdk(deployment, created["key"])
    within(PROPAGATION_S, lambda: error_code(lambda: call(client)) is None)
    r = admin.http.post(f"/api/v1/keys/{created['id']}/revoke")
    assert r.status_code == 200
    took = within(PROPAGATION_S, lambda: error_code(lambda: call(client)) == (401, "key_revoked"))
    assert took < PROPAGATION_S
    # The gateway's record of the refused call becomes a key-risk event in the security log.
    def risk() -> bool:
        rows = events(admin, kind="key.revoked_used", subject_id=created["id"])
        return bool(rows) and rows[0]["detail"]["requests"] >= 1
    within(10, risk)


def test_allowed_ips_and_the_risk_event(deployment: dict[str, Any], admin: Admin) -> None:
    created = admin.post("/api/v1/keys", {"name": "office", "allowed_ips": ["10.0.0.0/8"]})
    client = sdk(deployment, created["key"])
    assert error_code(lambda: call(client)) == (403, "key_ip_not_allowed")
    r = admin.http.patch(f"/api/v1/keys/{created['id']}", json={"allowed_ips": ["127.0.0.1"]})
    assert r.status_code == 200
    within(PROPAGATION_S, lambda: error_code(lambda: call(client)) is None)

    def risk() -> bool:
        rows = events(admin, kind="key.ip_not_allowed", subject_id=created["id"])
        return bool(rows) and rows[0]["source_ip"] == "127.0.0.1" and rows[0]["severity"] == "high"
    within(10, risk)
    # The scope change itself is audited with before and after.
    (change,) = events(admin, kind="admin.key_scope_changed", subject_id=created["id"])
    assert change["detail"]["allowed_ips.before"] == '["10.0.0.0/8"]'
    assert change["detail"]["allowed_ips.after"] == '["127.0.0.1/32"]'


def test_rotation_overlaps_then_ends(deployment: dict[str, Any], admin: Admin) -> None:
    old = admin.post("/api/v1/keys", {"name": "svc"})
    rotated = admin.post(f"/api/v1/keys/{old['id']}/rotate", {"overlap_seconds": 300})
    old_client, new_client = sdk(deployment, old["key"]), sdk(deployment, rotated["key"])
    # Both work during the overlap.
    assert call(old_client).usage is not None
    within(PROPAGATION_S, lambda: error_code(lambda: call(new_client)) is None)
    again = admin.post(f"/api/v1/keys/{rotated['id']}/rotate", {"overlap_seconds": 0})
    newest = sdk(deployment, again["key"])
    within(PROPAGATION_S,
           lambda: error_code(lambda: call(new_client)) == (401, "key_revoked"))
    assert call(newest).usage is not None
    assert call(old_client).usage is not None  # its own overlap is still running


def test_per_key_rate_limit(deployment: dict[str, Any], admin: Admin) -> None:
    created = admin.post("/api/v1/keys", {"name": "slow", "limits": {"rpm": 1}})
    client = sdk(deployment, created["key"])
    within(PROPAGATION_S, lambda: error_code(lambda: call(client)) is None)
    assert error_code(lambda: call(client)) == (429, "rate_limited")
    # Lifting the limit takes effect just as fast.
    r = admin.http.patch(f"/api/v1/keys/{created['id']}", json={"limits": None})
    assert r.status_code == 200
    within(PROPAGATION_S, lambda: error_code(lambda: call(client)) is None)


def test_admin_actions_and_sign_ins_are_in_the_security_log(admin: Admin) -> None:
    kinds = {e["kind"] for e in events(admin)}
    assert {"auth.login", "admin.key_created", "admin.key_revoked", "admin.key_rotated"} <= kinds


def test_keys_survive_a_secret_rotation(tmp_path: Path, mock_addr: str) -> None:
    old_secret = "first-secret-0123456789-abcdefghijklmnop"
    new_secret = "second-secret-9876543210-ponmlkjihgfedcba"
    data_dir = tmp_path / "rotation"
    env1 = {"ONETOKEN_SECRET_KEY": old_secret}
    creds = bootstrap_with(data_dir, env1)
    # An admin action from the CLI (no server running) is spooled and replayed by the server.
    cli(data_dir, "keys", "create", "--org", "Default", "--name", "from-cli", env=env1)
    server = Server(data_dir=data_dir, upstream=mock_addr, extra_env=env1)
    with running(server):
        first = OpenAI(base_url=f"{server.gateway_url}/v1", api_key=creds["api_key"],
                       max_retries=0)
        assert call(first).usage is not None
    server.extra_env = {
        "ONETOKEN_SECRET_KEY": new_secret,
        "ONETOKEN_SECRET_KEY_VERSION": "2",
        "ONETOKEN_PREVIOUS_SECRET_KEYS": f"1:{old_secret}",
    }
    with running(server):
        # The key hashed under version 1 still works; a new one is made under version 2.
        first = OpenAI(base_url=f"{server.gateway_url}/v1", api_key=creds["api_key"],
                       max_retries=0)
        assert call(first).usage is not None
        admin = Admin(server, creds["admin_email"], creds["admin_password"])
        made = admin.post("/api/v1/keys", {"name": "v2"})
        assert made["secret_version"] == 2
        second = OpenAI(base_url=f"{server.gateway_url}/v1", api_key=made["key"], max_retries=0)
        assert call(second).usage is not None
        from_cli = [e for e in events(admin, kind="admin.key_created")
                    if e["user_agent"] == "onetoken-cli"]
        assert len(from_cli) == 1


def bootstrap_with(data_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    return dict(json.loads(cli(data_dir, "bootstrap", "--json", env=env).stdout))


def test_a_revocation_lands_within_a_second_after_a_bad_entry_was_forced_in(
    deployment: dict[str, Any], admin: Admin
) -> None:
    """An entry the engine refuses, written to the database around the API (a restore, a
    hand edit): the engine leaves that entry out and keeps taking every later snapshot,
    so a key revocation still lands within a second."""
    from sqlalchemy.orm import Session

    from onetoken.db.session import bump_revision, make_engine
    from onetoken.providers.models import Route

    created = admin.post("/api/v1/keys", {"name": "after-a-bad-entry"})
    client = sdk(deployment, created["key"])
    within(PROPAGATION_S, lambda: error_code(lambda: call(client)) is None)
    db = make_engine(f"sqlite:///{deployment['data_dir'] / 'control.db'}")
    try:
        with Session(db) as session:
            session.add(Route(id="rte_forced", org_id=None, name="no-such-model", aliases=[]))
            bump_revision(session)
            session.commit()
        # The engine takes the snapshot with the bad entry, leaving that entry out.
        metrics = deployment["server"].metrics_url
        within(5, lambda: "onetoken_snapshot_dropped_entries 1\n" in httpx.get(metrics).text)
        assert error_code(lambda: call(client)) is None
        r = admin.http.post(f"/api/v1/keys/{created['id']}/revoke")
        assert r.status_code == 200
        took = within(
            PROPAGATION_S, lambda: error_code(lambda: call(client)) == (401, "key_revoked")
        )
        assert took < PROPAGATION_S
    finally:
        with Session(db) as session:
            route = session.get(Route, "rte_forced")
            if route is not None:
                session.delete(route)
                bump_revision(session)
                session.commit()
        db.dispose()
