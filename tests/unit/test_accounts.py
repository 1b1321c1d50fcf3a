"""Accounts, roles, sessions (bearer and console cookie with CSRF), invites, second factor."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from onetoken.bootstrap import bootstrap
from onetoken.control import create_app
from onetoken.orgs import service as orgs
from onetoken.orgs.models import Account
from onetoken.security import totp
from onetoken.settings import Settings
from onetoken.state import AppState
from tests import builders as build
from tests.unit.conftest import Admin, add_account, drained_events, make_org_admin

API = "/api/v1"


def login(client: TestClient, identifier: str, password: str, **extra: Any) -> Any:
    return client.post(f"{API}/auth/login",
                       json={"login": identifier, "password": password, **extra})


def bearer(r: Any) -> dict[str, str]:
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


# -- members ---------------------------------------------------------------------------------


def test_invite_accept_and_sign_in_with_any_identifier(client: TestClient, admin: Admin) -> None:
    r = client.post(f"{API}/accounts", headers=admin.headers, json={
        "login_name": "Dana.Dev", "email": "Dana@Acme.test", "mobile": "+86 138 0000 0001",
        "display_name": "Dana", "role": "developer",
    })
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["auth_status"] == "invited" and body["login_name"] == "dana.dev"
    assert body["email"] == "dana@acme.test" and body["mobile"] == "+8613800000001"
    token = body["invite_token"]
    assert token.startswith("oti_")
    # Not signed in before accepting, whatever is tried.
    assert login(client, "dana.dev", "").status_code in (401, 422)
    r = client.post(f"{API}/auth/accept-invite", json={"token": token, "password": "short"})
    assert r.status_code == 422
    r = client.post(f"{API}/auth/accept-invite",
                    json={"token": token, "password": "a long enough password"})
    assert r.status_code == 200 and r.json()["auth_status"] == "password"
    # The token is single-use.
    r = client.post(f"{API}/auth/accept-invite",
                    json={"token": token, "password": "a long enough password"})
    assert r.status_code == 401
    for ident in ("dana.dev", "DANA@acme.test", "+8613800000001"):
        me = client.get(f"{API}/me", headers=bearer(login(client, ident, "a long enough password")))
        assert me.json()["id"] == body["id"] and me.json()["role"] == "developer"
    # Listed for admins with no secret material.
    listed = client.get(f"{API}/accounts", headers=admin.headers).json()["data"]
    assert {a["login_name"] for a in listed} == {admin.email, "dana.dev"}
    assert "invite_token" not in orjson.dumps(listed).decode()


def test_identifiers_are_unique_and_errors_do_not_echo_them(
    client: TestClient, admin: Admin
) -> None:
    r = client.post(f"{API}/accounts", headers=admin.headers,
                    json={"email": admin.email, "role": "viewer"})
    assert r.status_code == 409 and admin.email not in r.text
    r = client.post(f"{API}/accounts", headers=admin.headers,
                    json={"mobile": "call-me-maybe-9911", "role": "viewer"})
    assert r.status_code == 422 and "call-me-maybe" not in r.text
    r = client.post(f"{API}/accounts", headers=admin.headers,
                    json={"role": "viewer", "password": "secret-canary-xyz-123"})
    assert r.status_code == 422 and "secret-canary" not in r.text


def test_owner_rules_and_last_owner(client: TestClient, admin: Admin, state: AppState) -> None:
    admin2 = add_account(state, client, admin.org_id, "admin2@acme.test", "admin")
    # An admin may not create owners, nor touch the owner.
    r = client.post(f"{API}/accounts", headers=admin2,
                    json={"login_name": "boss2", "role": "owner", "password": "x" * 14 + "yz"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "owner_required"
    r = client.patch(f"{API}/accounts/{admin.account_id}", headers=admin2, json={"role": "viewer"})
    assert r.status_code == 403
    r = client.post(f"{API}/accounts/{admin.account_id}/disable", headers=admin2)
    assert r.status_code == 403
    # The only owner can neither be demoted nor disable themself.
    r = client.patch(f"{API}/accounts/{admin.account_id}", headers=admin.headers,
                     json={"role": "admin"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "last_owner"
    r = client.post(f"{API}/accounts/{admin.account_id}/disable", headers=admin.headers)
    assert r.status_code == 409
    drained_events()
    # An owner grants and revokes; the audit trail has before and after.
    me2 = client.get(f"{API}/me", headers=admin2).json()
    r = client.patch(f"{API}/accounts/{me2['id']}", headers=admin.headers, json={"role": "owner"})
    assert r.status_code == 200 and r.json()["role"] == "owner"
    r = client.patch(f"{API}/accounts/{me2['id']}", headers=admin.headers, json={"role": "viewer"})
    assert r.status_code == 200
    changes = [e for e in drained_events() if e["kind"] == "admin.role_changed"]
    assert [(e["detail"]["role.before"], e["detail"]["role.after"]) for e in changes] == [
        ("admin", "owner"), ("owner", "viewer")
    ]
    assert all(e["actor_id"] == admin.account_id and e["subject_id"] == me2["id"]
               and e["org_id"] == admin.org_id and e["severity"] == "high" for e in changes)


def test_disable_ends_sessions_and_sign_in(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    viewer = add_account(state, client, admin.org_id, "v@acme.test", "viewer")
    vid = client.get(f"{API}/me", headers=viewer).json()["id"]
    r = client.post(f"{API}/accounts/{vid}/disable", headers=admin.headers)
    assert r.status_code == 200 and r.json()["status"] == "disabled"
    assert client.get(f"{API}/me", headers=viewer).status_code == 401
    assert login(client, "v@acme.test", "another long password").status_code == 401
    assert client.post(f"{API}/accounts/{vid}/enable", headers=admin.headers).status_code == 200
    assert login(client, "v@acme.test", "another long password").status_code == 200


def test_operator_creates_and_sees_orgs_admins_only_their_own(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    with state.session_factory() as s:
        platform = orgs.create_org(s, "Platform")
        build.accept_terms(s, orgs.create_account(
            s, platform.id, "op@platform.test", "operator password 1", "viewer", is_operator=True
        ))
        s.commit()
    op = bearer(login(client, "op@platform.test", "operator password 1"))
    r = client.post(f"{API}/orgs", headers=op, json={
        "name": "Initech", "owner": {"login_name": "peter", "email": "peter@initech.test",
                                     "role": "viewer"}})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["owner"]["role"] == "owner" and new["owner"]["invite_token"]
    names = {o["name"] for o in client.get(f"{API}/orgs", headers=op).json()["data"]}
    assert {"Acme", "Platform", "Initech"} <= names
    assert client.get(f"{API}/orgs/{admin.org_id}", headers=op).status_code == 200
    assert client.get(f"{API}/accounts", headers=op, params={"org_id": new["id"]}).json()[
        "data"][0]["login_name"] == "peter"
    # An org owner sees only their own org.
    assert client.get(f"{API}/orgs", headers=admin.headers).status_code == 403
    assert client.get(f"{API}/orgs/{new['id']}", headers=admin.headers).status_code == 404
    assert client.get(f"{API}/accounts", headers=admin.headers,
                      params={"org_id": new["id"]}).status_code == 404
    # Disabling an org stops its members from signing in.
    r = client.patch(f"{API}/orgs/{admin.org_id}", headers=op, json={"status": "disabled"})
    assert r.status_code == 200
    assert login(client, admin.email, admin.password).status_code == 401


def test_bootstrap_account_is_the_operator(state: AppState) -> None:
    with state.session_factory() as s:
        result = bootstrap(s, state.secrets)
        account = s.scalars(select(Account).where(Account.login_name == "admin")).one()
        assert account.is_operator and account.role == "owner"
        assert result.admin_email == account.email


# -- console sessions ------------------------------------------------------------------------


@pytest.fixture
def https_client(settings: Settings, state: AppState) -> Iterator[TestClient]:
    # Secure cookies travel over https only.
    with TestClient(create_app(settings, state=state), base_url="https://testserver") as c:
        yield c


def test_console_cookie_session_with_csrf(https_client: TestClient, admin: Admin) -> None:
    c = https_client
    r = c.post(f"{API}/auth/session", json={"login": admin.email, "password": admin.password})
    assert r.status_code == 200
    csrf = r.json()["csrf_token"]
    cookies = r.headers.get_list("set-cookie")
    session_cookie = next(h for h in cookies if h.startswith("ot_session="))
    for flag in ("HttpOnly", "Secure", "SameSite=strict"):
        assert flag.lower() in session_cookie.lower()
    csrf_cookie = next(h for h in cookies if h.startswith("ot_csrf="))
    assert "httponly" not in csrf_cookie.lower() and "secure" in csrf_cookie.lower()
    assert "access_token" not in r.text
    # Safe methods ride on the cookie alone.
    assert c.get(f"{API}/me").json()["id"] == admin.account_id
    # Unsafe ones need the CSRF token too.
    r = c.post(f"{API}/keys", json={"name": "k"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = c.post(f"{API}/keys", json={"name": "k"}, headers={"X-CSRF-Token": "0" * 64})
    assert r.status_code == 403
    r = c.post(f"{API}/keys", json={"name": "k"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201
    # Logout clears the session.
    assert c.post(f"{API}/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert c.get(f"{API}/me").status_code == 401


def test_csrf_token_is_bound_to_its_session(https_client: TestClient, admin: Admin) -> None:
    c = https_client
    first = c.post(f"{API}/auth/session",
                   json={"login": admin.email, "password": admin.password}).json()["csrf_token"]
    second = c.post(f"{API}/auth/session",
                    json={"login": admin.email, "password": admin.password}).json()["csrf_token"]
    assert first != second
    # The jar now holds the second session; the first session's token does not fit it.
    c.cookies.set("ot_csrf", first, domain="testserver.local")
    r = c.post(f"{API}/keys", json={"name": "k"}, headers={"X-CSRF-Token": first})
    assert r.status_code == 403


# -- passwords and second factor -------------------------------------------------------------


def test_password_change_ends_other_sessions(client: TestClient, admin: Admin) -> None:
    other = bearer(login(client, admin.email, admin.password))
    r = client.post(f"{API}/me/password", headers=admin.headers,
                    json={"current_password": "wrong", "new_password": "a brand new password"})
    assert r.status_code == 400 and "wrong" not in r.json()["error"]["message"].replace(
        "is wrong", "")
    r = client.post(f"{API}/me/password", headers=admin.headers,
                    json={"current_password": admin.password,
                          "new_password": "a brand new password"})
    assert r.status_code == 204
    assert client.get(f"{API}/me", headers=admin.headers).status_code == 200
    assert client.get(f"{API}/me", headers=other).status_code == 401
    assert login(client, admin.email, admin.password).status_code == 401
    assert login(client, admin.email, "a brand new password").status_code == 200


def test_totp_enrol_confirm_sign_in_replay_and_disable(client: TestClient, admin: Admin,
                                                       state: AppState) -> None:
    r = client.post(f"{API}/me/totp", headers=admin.headers, json={})
    assert r.status_code == 422  # the session alone is not enough
    r = client.post(f"{API}/me/totp", headers=admin.headers,
                    json={"current_password": "not the password"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_credentials"
    r = client.post(f"{API}/me/totp", headers=admin.headers,
                    json={"current_password": admin.password})
    assert r.status_code == 200
    secret = r.json()["secret"]
    assert r.json()["otpauth_uri"].startswith("otpauth://totp/onetoken")
    # Stored encrypted, never in the clear.
    with state.session_factory() as s:
        stored = s.get(Account, admin.account_id)
        assert stored is not None and stored.totp_secret_encrypted
        assert secret not in stored.totp_secret_encrypted
        assert stored.auth_status == "password"  # not on until confirmed
    now = time.time()
    bad = str((int(totp.code_at(secret, now)) + 1) % 10**6).zfill(6)
    r = client.post(f"{API}/me/totp/confirm", headers=admin.headers, json={"code": bad})
    assert r.status_code == 400
    code = totp.code_at(secret, now)
    r = client.post(f"{API}/me/totp/confirm", headers=admin.headers, json={"code": code})
    assert r.status_code == 200 and r.json()["auth_status"] == "totp"

    r = login(client, admin.email, admin.password)
    assert r.status_code == 401 and r.json()["error"]["code"] == "totp_required"
    r = login(client, admin.email, admin.password, totp_code=bad)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_totp"
    # The code used to confirm cannot be replayed; the next time step's code works.
    r = login(client, admin.email, admin.password, totp_code=code)
    assert r.status_code == 401
    later = now + totp.PERIOD_S
    r = login(client, admin.email, admin.password, totp_code=totp.code_at(secret, later))
    assert r.status_code == 200
    # A wrong password with a right code is still refused.
    assert login(client, admin.email, "nope",
                 totp_code=totp.code_at(secret, later)).status_code == 401

    r = client.post(f"{API}/me/totp/disable", headers=admin.headers,
                    json={"code": totp.code_at(secret, later)})
    assert r.status_code == 422  # the current password is required too
    r = client.post(f"{API}/me/totp/disable", headers=admin.headers,
                    json={"code": totp.code_at(secret, later), "current_password": admin.password})
    assert r.status_code == 400  # that step was used by the sign-in above
    with state.session_factory() as s:
        account = s.get(Account, admin.account_id)
        assert account is not None
        account.totp_last_step = None
        s.commit()
    code_now = totp.code_at(secret, time.time())
    r = client.post(f"{API}/me/totp/disable", headers=admin.headers,
                    json={"code": code_now, "current_password": "not the password"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_credentials"
    r = client.post(f"{API}/me/totp/disable", headers=admin.headers,
                    json={"code": code_now, "current_password": admin.password})
    assert r.status_code == 200 and r.json()["auth_status"] == "password"
    assert login(client, admin.email, admin.password).status_code == 200


def test_admin_resets_a_lost_second_factor(client: TestClient, admin: Admin,
                                           state: AppState) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    secret = client.post(f"{API}/me/totp", headers=dev,
                         json={"current_password": "another long password"}).json()["secret"]
    client.post(f"{API}/me/totp/confirm", headers=dev,
                json={"code": totp.code_at(secret, time.time())})
    dev_id = client.get(f"{API}/me", headers=dev).json()["id"]
    assert login(client, "dev@acme.test", "another long password").status_code == 401
    r = client.post(f"{API}/accounts/{dev_id}/totp/reset", headers=admin.headers)
    assert r.status_code == 200 and r.json()["auth_status"] == "password"
    assert login(client, "dev@acme.test", "another long password").status_code == 200


@pytest.mark.parametrize(
    ("unix_time", "expected"),
    [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
     (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")],
)
def test_totp_matches_rfc6238_vectors(unix_time: int, expected: str) -> None:
    key = b"12345678901234567890"
    assert totp.hotp(key, totp.step_at(unix_time), digits=8) == expected


def test_totp_window_and_format() -> None:
    secret = totp.generate_secret()
    now = 1_700_000_000.0
    assert totp.verify(secret, totp.code_at(secret, now - 30), now=now) is not None
    assert totp.verify(secret, totp.code_at(secret, now + 30), now=now) is not None
    assert totp.verify(secret, totp.code_at(secret, now - 90), now=now) is None
    assert totp.verify(secret, "12345", now=now) is None
    assert totp.verify(secret, "abcdef", now=now) is None
    step = totp.verify(secret, totp.code_at(secret, now), now=now)
    assert step is not None
    assert totp.verify(secret, totp.code_at(secret, now), now=now, after_step=step) is None


def test_another_orgs_admin_cannot_touch_members(client: TestClient, admin: Admin,
                                                 other_admin: Admin) -> None:
    r = client.get(f"{API}/accounts/{admin.account_id}", headers=other_admin.headers)
    assert r.status_code == 404
    for method, suffix, body in (("PATCH", "", {"role": "viewer"}), ("POST", "/disable", None),
                                 ("POST", "/totp/reset", None)):
        r = client.request(method, f"{API}/accounts/{admin.account_id}{suffix}",
                           headers=other_admin.headers, json=body)
        assert r.status_code == 404
    listed = client.get(f"{API}/accounts", headers=other_admin.headers).json()["data"]
    assert admin.account_id not in orjson.dumps(listed).decode()


def test_make_org_admin_helper_still_works(state: AppState, client: TestClient) -> None:
    extra = make_org_admin(state, client, "Umbrella", "o@umbrella.test")
    assert client.get(f"{API}/org", headers=extra.headers).json()["name"] == "Umbrella"


def test_every_admin_write_is_audited(
    client: TestClient, admin: Admin, operator: Admin, state: AppState
) -> None:
    drained_events()
    r = client.post(f"{API}/billing/credits", headers=operator.headers,
                    json={"amount": "1", "idempotency_key": "audit-1", "org_id": admin.org_id})
    assert r.status_code == 201
    r = client.post(f"{API}/billing/credits", headers=admin.headers,
                    json={"amount": "1", "idempotency_key": "audit-2"})
    assert r.status_code == 403
    got = [(e["kind"], e["actor_id"] == operator.account_id, e["detail"].get("route"),
            e["detail"].get("outcome")) for e in drained_events()]
    assert got == [
        ("billing.credit_added", True, None, None),
        ("admin.action", True, "/api/v1/billing/credits", "ok"),
        ("access.denied", False, "/api/v1/billing/credits", None),
    ]
    # Reads are not audited.
    client.get(f"{API}/keys", headers=admin.headers)
    assert drained_events() == []
