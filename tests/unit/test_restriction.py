"""Restriction of processing (policy XIII.4; docs/retention.md): the tokens the control
plane makes are the engine's, an org admin sets the org's mode and a person their own,
every change is in the security log with who, and the snapshot carries it to the engine.
The end-to-end canary (real gateway, journal, chDB) is tests/integration/test_restriction.py.
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from onetoken.gateway.snapshot import build_snapshot
from onetoken.kit.crypto import derive_secret
from onetoken.orgs import restriction as org_restriction
from onetoken.orgs.models import Account, Org
from onetoken.security import restriction
from onetoken.security.models import LoginSource
from onetoken.state import AppState
from tests import builders as build

from .conftest import Admin, accept_terms, add_account, drained_events

UA = "OpenAI/Python 1.54.0 (canary-host-7f3a; Linux)"


def test_tokens_are_the_engines() -> None:
    key = derive_secret(b"k", restriction.CONTEXT)
    # The value rust/gateway/src/restrict.rs pins for the same secret and address.
    assert restriction.ip_token(key, "198.51.100.7") == "hmac:477d11a9ed092e42"
    assert restriction.ip_token(key, "::ffff:198.51.100.7") == "hmac:477d11a9ed092e42"
    assert restriction.ip_token(key, "198.51.100.8") != "hmac:477d11a9ed092e42"
    assert restriction.ip_token(key, "") == ""
    assert restriction.product(UA) == "OpenAI"
    assert restriction.product("curl/8.5.0") == "curl"
    assert restriction.product("(compatible) x") == ""
    assert restriction.product('évil"name/1') == "vilname"
    assert len(restriction.product("a" * 100)) == 32
    view = restriction.client(key, "198.51.100.7", UA, restricted=True)
    assert view.source_ip == "hmac:477d11a9ed092e42" and view.user_agent == "OpenAI"
    assert view.network == restriction.ip_token(key, "198.51.100.0/24")
    assert view.family == "openai-python"
    clear = restriction.client(key, "198.51.100.7", UA, restricted=False)
    assert (clear.source_ip, clear.user_agent, clear.network) == (
        "198.51.100.7", UA, "198.51.100.0/24")


def _snapshot(state: AppState) -> dict[str, Any]:
    with state.session_factory() as s:
        return build_snapshot(s, state.secrets, version=1, spent_marks={})


def _key_for(state: AppState, admin: Admin) -> str:
    with state.session_factory() as s:
        account, org = s.get(Account, admin.account_id), s.get(Org, admin.org_id)
        assert account is not None and org is not None
        row, _ = build.api_key(s, state.secrets, org, account)
        s.commit()
        return row.id


def test_a_person_restricts_their_own_account_audited_and_served(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    accept_terms(client, admin.headers)
    key_id = _key_for(state, admin)
    entry = next(k for k in _snapshot(state)["keys"] if k["key_id"] == key_id)
    assert "restrict_client" not in entry
    drained_events()

    headers = {**admin.headers, "User-Agent": UA}
    r = client.put("/api/v1/me/restriction", json={"mode": "restricted"}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"mode": "restricted", "effective": "restricted"}
    assert client.get("/api/v1/me", headers=headers).json()["restriction"] == "restricted"
    entry = next(k for k in _snapshot(state)["keys"] if k["key_id"] == key_id)
    assert entry["restrict_client"] is True
    org = next(o for o in _snapshot(state)["orgs"] if o["id"] == admin.org_id)
    assert "restrict_client" not in org

    events = drained_events()
    changed = [e for e in events if e["kind"] == "account.restriction_changed"]
    assert len(changed) == 1, [e["kind"] for e in events]
    e = changed[0]
    assert e["actor_id"] == admin.account_id and e["subject_id"] == admin.account_id
    assert e["detail"]["restriction.before"] == "clear"
    assert e["detail"]["restriction.after"] == "restricted"
    # The request that turned it on is recorded without the clear User-Agent already,
    # and so is everything after it.
    assert all(UA not in str(ev) for ev in events)
    client.patch("/api/v1/me", json={"display_name": "Ann"}, headers=headers)
    later = drained_events()
    assert later and all(ev["user_agent"] == "OpenAI" for ev in later), later

    r = client.put("/api/v1/me/restriction", json={"mode": "clear"}, headers=headers)
    assert r.json() == {"mode": "clear", "effective": "clear"}
    lifted = [e for e in drained_events() if e["kind"] == "account.restriction_changed"]
    assert [e["detail"]["restriction.after"] for e in lifted] == ["clear"]
    client.patch("/api/v1/me", json={"display_name": "Ann B"}, headers=headers)
    assert any(ev["user_agent"] == UA for ev in drained_events())


def test_org_admins_restrict_the_org_the_stricter_applies_operators_see_it(
    client: TestClient, state: AppState, admin: Admin, other_admin: Admin, operator: Admin
) -> None:
    for a in (admin, other_admin, operator):
        accept_terms(client, a.headers)
    viewer = accept_terms(client, add_account(state, client, admin.org_id, "v@acme.test",
                                              "viewer"))
    body = {"mode": "restricted"}
    url = f"/api/v1/orgs/{admin.org_id}/restriction"
    assert client.put(url, json=body, headers=viewer).status_code == 403
    assert client.put(url, json=body, headers=other_admin.headers).status_code == 404
    assert client.put(url, json=body, headers=operator.headers).status_code == 404
    drained_events()
    r = client.put(url, json=body, headers=admin.headers)
    assert r.status_code == 200 and r.json()["restriction"] == "restricted", r.text
    [e] = [e for e in drained_events() if e["kind"] == "org.restriction_changed"]
    assert e["actor_id"] == admin.account_id and e["org_id"] == admin.org_id

    # Operators see it; the org's members have it whatever their own mode.
    seen = client.get(f"/api/v1/orgs/{admin.org_id}", headers=operator.headers).json()
    assert seen["restriction"] == "restricted"
    mine = client.get("/api/v1/me/restriction", headers=viewer).json()
    assert mine == {"mode": "clear", "effective": "restricted"}
    org = next(o for o in _snapshot(state)["orgs"] if o["id"] == admin.org_id)
    assert org["restrict_client"] is True
    other = next(o for o in _snapshot(state)["orgs"] if o["id"] == other_admin.org_id)
    assert "restrict_client" not in other
    # A sign-in of a member of a restricted org keeps only the product of its agent.
    r = client.post("/api/v1/auth/login", json={"email": "v@acme.test",
                                                 "password": "another long password"},
                    headers={"User-Agent": UA})
    assert r.status_code == 200
    logins = [e for e in drained_events() if e["kind"] == "auth.login"]
    assert logins and all(e["user_agent"] == "OpenAI" for e in logins)


def test_remembered_sign_in_networks_become_tokens(state: AppState) -> None:
    with state.session_factory() as s:
        _org, account = build.org_with_owner(s, "Initech", "o@initech.test", build.PASSWORD,
                                            "owner")
        s.add(LoginSource(account_id=account.id, kind="net", value="203.0.113.0/24"))
        s.add(LoginSource(account_id=account.id, kind="ua", value="firefox"))
        s.commit()
        org_restriction.set_account(s, state.secrets, account, "restricted")
        s.commit()
        values = {(r.kind, r.value) for r in s.scalars(
            select(LoginSource).where(LoginSource.account_id == account.id))}
    key = restriction.secret(state.secrets)
    assert values == {("net", restriction.ip_token(key, "203.0.113.0/24")), ("ua", "firefox")}
