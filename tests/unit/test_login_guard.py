"""Brute force, lockouts with backoff per account and per source address, and abnormal
sign-ins, checked in the security log rows they leave in (embedded) ClickHouse."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from onetoken.analytics.clickhouse import open_client
from onetoken.control import build_state, create_app
from onetoken.db.base import utcnow
from onetoken.kit.errors import Unauthorized
from onetoken.orgs import auth
from onetoken.orgs import service as orgs
from onetoken.orgs.models import Account
from onetoken.orgs.restriction import address_key
from onetoken.security import totp
from onetoken.security.login_guard import LoginGuard, lockout_seconds
from onetoken.security.models import LoginThrottle
from onetoken.settings import Settings
from onetoken.state import AppState
from tests import builders as build

API = "/api/v1"
PASSWORD = "the right password"
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"


@dataclass
class Env:
    settings: Settings
    state: AppState
    app: FastAPI
    ch: Client


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("guard"),
        secret_key=SecretStr("guard-test-secret-0123456789abcdefghijkl"),
        login_max_failures_account=3,
        login_max_failures_ip=6,
        login_lockout_base_seconds=30,
        login_burst_max_attempts=50,  # the impossible-rate test sets its own
    )
    state = build_state(settings)
    app = create_app(settings, state=state)
    ch = open_client(settings)  # one chDB engine for the module
    app.state.security_log_runner = lambda query: query(ch)
    yield Env(settings, state, app, ch)
    ch.close()
    state.db_engine.dispose()


_n = iter(range(10_000))


def org_with_owner(env: Env) -> tuple[str, str, str]:
    """(org id, owner login, owner id) of a fresh org."""
    n = next(_n)
    with env.state.session_factory() as s:
        org = orgs.create_org(s, f"Org{n}")
        acc = orgs.create_account(s, org.id, f"owner{n}@org.test", PASSWORD, "owner")
        build.accept_terms(s, acc)
        s.commit()
        return org.id, f"owner{n}@org.test", acc.id


def from_ip(env: Env, ip: str) -> TestClient:
    return TestClient(env.app, client=(ip, 40000))


def attempt(c: TestClient, login: str, password: str, ua: str = CHROME) -> Any:
    return c.post(f"{API}/auth/login", json={"login": login, "password": password},
                  headers={"User-Agent": ua})


def events(env: Env, token: str, **params: Any) -> list[dict[str, Any]]:
    c = TestClient(env.app)
    r = c.get(f"{API}/security/events", params={"limit": 1000, **params},
              headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def token_for(env: Env, login: str, ip: str = "192.0.2.250") -> str:
    r = attempt(from_ip(env, ip), login, PASSWORD)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def test_repeated_bad_passwords_lock_the_account_even_for_the_right_password(env: Env) -> None:
    org_id, login, account_id = org_with_owner(env)
    c = from_ip(env, "198.51.100.10")
    for _ in range(3):
        r = attempt(c, login, "guess")
        assert r.status_code == 401
    # Locked now: the right password is refused, with Retry-After, from any address.
    for client in (c, from_ip(env, "203.0.113.77")):
        r = attempt(client, login, PASSWORD)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "login_locked"
        assert 1 <= int(r.headers["Retry-After"]) <= 31
        assert "guess" not in r.text and PASSWORD not in r.text

    # Once the lock is over, one more failure locks again for twice as long.
    with env.state.session_factory() as s:
        row = s.get(LoginThrottle, ("account", account_id))
        assert row is not None and row.failures == 3
        row.locked_until = utcnow() - timedelta(seconds=1)
        s.commit()
    assert attempt(c, login, "guess again").status_code == 401
    with env.state.session_factory() as s:
        row = s.get(LoginThrottle, ("account", account_id))
        assert row is not None and row.locked_until is not None
        left = (row.locked_until - utcnow()).total_seconds()
        assert 55 <= left <= 61
        row.locked_until = utcnow() - timedelta(seconds=1)
        s.commit()
    # The right password after the lock resets the account's counter.
    token = token_for(env, login, "198.51.100.10")
    with env.state.session_factory() as s:
        assert s.get(LoginThrottle, ("account", account_id)) is None

    rows = events(env, token)
    kinds = [e["kind"] for e in rows]
    assert kinds.count("auth.login_failed") == 4
    assert kinds.count("auth.login_locked") == 2
    lockouts = [e for e in rows if e["kind"] == "auth.lockout"]
    assert sorted(e["detail"]["lock_seconds"] for e in lockouts) == [30, 60]
    assert all(e["detail"]["scope"] == "account" and e["org_id"] == org_id for e in lockouts)
    failed = [e for e in rows if e["kind"] == "auth.login_failed"]
    assert {e["detail"]["reason"] for e in failed} == {"bad_password"}
    assert {e["source_ip"] for e in failed} == {"198.51.100.10"}
    assert all(e["user_agent"] == CHROME and e["subject_id"] == account_id for e in failed)
    # Metadata only: what was typed never reaches the log.
    assert "guess" not in str(rows)


def test_failures_from_one_address_lock_that_address(env: Env) -> None:
    accounts = [org_with_owner(env) for _ in range(3)]
    attacker = from_ip(env, "198.51.100.66")
    for _, login, _ in accounts[:2]:
        for _ in range(3):
            attacker_r = attempt(attacker, login, "spray")
            assert attacker_r.status_code in (401, 429)
    # Six failures from the address: even a third account's right password is refused there,
    r = attempt(attacker, accounts[2][1], PASSWORD)
    assert r.status_code == 429
    # while the same account signs in from elsewhere.
    token = token_for(env, accounts[2][1], "203.0.113.5")
    # Unknown names count against the address too, and lock like real ones.
    for _ in range(3):
        assert attempt(from_ip(env, "198.51.100.67"), "nobody@nowhere.test", "x").status_code \
            == 401
    r = attempt(from_ip(env, "198.51.100.68"), "nobody@nowhere.test", "x")
    assert r.status_code == 429
    with env.state.session_factory() as s:
        # Per address, under the address's token (restriction.address_key).
        ip_row = s.get(LoginThrottle, ("ip", address_key(env.state.secrets, "198.51.100.66")))
        assert ip_row is not None and ip_row.failures == 6 and ip_row.locked_until is not None
        # The unknown name was throttled under a keyed hash, never in the clear.
        subjects = [r.subject for r in s.query(LoginThrottle).all()]
        assert not any("nobody" in subject for subject in subjects)
    del token


def test_new_network_and_new_user_agent_are_abnormal(env: Env) -> None:
    org_id, login, account_id = org_with_owner(env)
    token = token_for(env, login, "203.0.113.10")  # first sign-in: learns, no alarm
    assert attempt(from_ip(env, "203.0.113.200"), login, PASSWORD).status_code == 200  # same /24
    assert not [e for e in events(env, token) if e["kind"] == "auth.login_abnormal"]
    assert attempt(from_ip(env, "198.18.7.1"), login, PASSWORD).status_code == 200
    assert attempt(from_ip(env, "203.0.113.11"), login, PASSWORD, ua="curl/8.5.0").status_code \
        == 200
    assert attempt(from_ip(env, "2001:db8:1:2::5"), login, PASSWORD).status_code == 200
    abnormal = [e for e in events(env, token) if e["kind"] == "auth.login_abnormal"]
    got = sorted((e["detail"]["reason"], e["detail"].get("net") or e["detail"].get("ua_family"))
                 for e in abnormal)
    assert got == [
        ("new_network", "198.18.7.0/24"),
        ("new_network", "2001:db8:1:2::/64"),
        ("new_user_agent", "curl"),
    ]
    assert all(e["severity"] == "medium" and e["subject_id"] == account_id
               and e["org_id"] == org_id for e in abnormal)


def test_impossible_rate_is_flagged(env: Env) -> None:
    _, login, _ = org_with_owner(env)
    token = token_for(env, login, "192.0.2.9")
    app: Any = env.app
    guard = app.state.login_guard
    old = guard.settings.login_burst_max_attempts
    object.__setattr__(guard.settings, "login_burst_max_attempts", 4)
    try:
        c = from_ip(env, "198.51.100.99")
        for _ in range(6):
            attempt(c, login, "fast")
    finally:
        object.__setattr__(guard.settings, "login_burst_max_attempts", old)
    rate = [e for e in events(env, token) if e["kind"] == "auth.login_rate_abnormal"]
    assert {e["detail"]["scope"] for e in rate} == {"account", "ip"}
    assert all(e["severity"] == "high" for e in rate)


def test_lockout_schedule() -> None:
    s: Any = type("S", (), {"login_lockout_base_seconds": 30, "login_lockout_max_seconds": 3600})
    assert [lockout_seconds(s, n, 5) for n in (1, 4, 5, 6, 7, 10, 40)] == [
        0, 0, 30, 60, 120, 960, 3600
    ]


def test_org_admins_see_only_their_org_and_operators_all(env: Env) -> None:
    org_a, login_a, _ = org_with_owner(env)
    org_b, login_b, _ = org_with_owner(env)
    attempt(from_ip(env, "192.0.2.1"), login_a, "bad")
    attempt(from_ip(env, "192.0.2.2"), login_b, "bad")
    token_a = token_for(env, login_a)
    rows = events(env, token_a)
    assert rows and {e["org_id"] for e in rows} == {org_a}
    c = TestClient(env.app)
    hdr = {"Authorization": f"Bearer {token_a}"}
    assert c.get(f"{API}/security/events", params={"org_id": org_b}, headers=hdr).status_code \
        == 404
    # Filters and paging.
    only = events(env, token_a, kind="auth.login_failed", min_severity="low")
    assert only and {e["kind"] for e in only} == {"auth.login_failed"}
    page = c.get(f"{API}/security/events", params={"limit": 1}, headers=hdr).json()
    assert len(page["data"]) == 1 and page["next_cursor"]
    nxt = c.get(f"{API}/security/events", params={"limit": 1, "cursor": page["next_cursor"]},
                headers=hdr).json()
    assert nxt["data"][0]["event_id"] != page["data"][0]["event_id"]
    # A viewer of the org may not read it.
    with env.state.session_factory() as s:
        build.accept_terms(
            s, orgs.create_account(s, org_a, f"viewer-{org_a}@org.test", PASSWORD, "viewer")
        )
        s.commit()
    vt = token_for(env, f"viewer-{org_a}@org.test")
    r = c.get(f"{API}/security/events", headers={"Authorization": f"Bearer {vt}"})
    assert r.status_code == 403
    # An operator sees both orgs.
    with env.state.session_factory() as s:
        platform = orgs.create_org(s, "Platform")
        build.accept_terms(s, orgs.create_account(s, platform.id, "op@platform.test", PASSWORD,
                                                  "viewer", is_operator=True))
        s.commit()
    op = token_for(env, "op@platform.test")
    seen = {e["org_id"] for e in events(env, op)}
    assert {org_a, org_b} <= seen
    assert {e["org_id"] for e in events(env, op, org_id=org_b)} == {org_b}


# -- step-up: re-authentication of a signed-in account ----------------------------------------


def _with_totp(env: Env, account_id: str) -> str:
    secret = totp.generate_secret()
    with env.state.session_factory() as s:
        account = s.get(Account, account_id)
        assert account is not None
        account.totp_secret_encrypted = env.state.secrets.encrypt(secret)
        account.auth_status = "totp"
        s.commit()
    return secret


def test_wrong_current_passwords_count_towards_the_lockout_and_are_logged(env: Env) -> None:
    org_id, login, account_id = org_with_owner(env)
    token = token_for(env, login)
    c = from_ip(env, "198.51.100.140")
    h = {"Authorization": f"Bearer {token}", "User-Agent": CHROME}
    new = {"new_password": "a brand new password"}
    r = c.post(f"{API}/me/password", json={"current_password": "guess-1", **new}, headers=h)
    assert r.status_code == 400
    assert c.post(f"{API}/me/cancel", json={"password": "guess-2"}, headers=h).status_code == 401
    r = c.post(f"{API}/me/totp", json={"current_password": "guess-3"}, headers=h)
    assert r.status_code == 400
    # Locked like a sign-in: the right password is refused too, with Retry-After.
    r = c.post(f"{API}/me/password", json={"current_password": PASSWORD, **new}, headers=h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "login_locked"
    assert 1 <= int(r.headers["Retry-After"]) <= 31
    assert attempt(from_ip(env, "203.0.113.140"), login, PASSWORD).status_code == 429
    failed = events(env, token, kind="auth.step_up_failed")
    assert len(failed) == 3
    assert {e["detail"]["reason"] for e in failed} == {"bad_password"}
    assert {(e["source_ip"], e["org_id"], e["subject_id"]) for e in failed} == {
        ("198.51.100.140", org_id, account_id)
    }
    assert "guess" not in str(events(env, token))


def test_one_time_codes_of_a_signed_in_account_are_throttled(env: Env) -> None:
    _, login, account_id = org_with_owner(env)
    token = token_for(env, login)
    c = from_ip(env, "198.51.100.141")
    h = {"Authorization": f"Bearer {token}"}
    r = c.post(f"{API}/me/totp", json={"current_password": PASSWORD}, headers=h)
    assert r.status_code == 200
    secret = r.json()["secret"]
    right = totp.code_at(secret, time.time())
    wrong = str((int(right) + 1) % 10**6).zfill(6)
    for _ in range(3):
        r = c.post(f"{API}/me/totp/confirm", json={"code": wrong}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_totp"
    r = c.post(f"{API}/me/totp/confirm", json={"code": right}, headers=h)
    assert r.status_code == 429
    with env.state.session_factory() as s:
        ip_row = s.get(LoginThrottle, ("ip", address_key(env.state.secrets, "198.51.100.141")))
        assert ip_row is not None and ip_row.failures == 3
        account = s.get(Account, account_id)
        assert account is not None and account.auth_status == "password"


def test_totp_disable_needs_the_password_and_a_code(env: Env) -> None:
    _, login, account_id = org_with_owner(env)
    secret = _with_totp(env, account_id)
    r = attempt(from_ip(env, "192.0.2.142"), login, PASSWORD)
    assert r.json()["error"]["code"] == "totp_required"
    c = from_ip(env, "192.0.2.142")
    r = c.post(f"{API}/auth/login", json={
        "login": login, "password": PASSWORD, "totp_code": totp.code_at(secret, time.time())})
    h = {"Authorization": f"Bearer {r.json()['access_token']}"}
    later = totp.code_at(secret, time.time() + totp.PERIOD_S)
    r = c.post(f"{API}/me/totp/disable", json={"code": later}, headers=h)
    assert r.status_code == 422
    r = c.post(f"{API}/me/totp/disable", json={"current_password": PASSWORD}, headers=h)
    assert r.status_code == 422
    r = c.post(f"{API}/me/totp/disable", json={"code": later, "current_password": "guess"},
               headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_credentials"
    r = c.post(f"{API}/me/totp/disable", json={"code": later, "current_password": PASSWORD},
               headers=h)
    assert r.status_code == 200 and r.json()["auth_status"] == "password"


def test_one_code_signs_in_once_when_two_requests_race(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, login, account_id = org_with_owner(env)
    secret = _with_totp(env, account_id)
    code = totp.code_at(secret, time.time())
    both_verified = threading.Barrier(2)
    verify = totp.verify

    def verify_then_wait(*args: Any, **kwargs: Any) -> int | None:
        step = verify(*args, **kwargs)
        # Both requests have read the last used step and matched the code before either
        # records it: the read-then-write window, held open.
        both_verified.wait(timeout=10)
        return step

    monkeypatch.setattr(totp, "verify", verify_then_wait)
    guard = LoginGuard(env.settings)
    outcomes: list[str] = []

    def sign_in(ip: str) -> None:
        creds = auth.Credentials(identifier=login, password=PASSWORD, totp_code=code,
                                 source_ip=ip, user_agent=CHROME)
        with env.state.session_factory() as s:
            try:
                auth.authenticate(s, env.state.secrets, guard, creds)
                s.commit()
                outcomes.append("signed_in")
            except Unauthorized as exc:
                outcomes.append(exc.code)

    threads = [threading.Thread(target=sign_in, args=(f"198.51.100.{150 + i}",))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["invalid_totp", "signed_in"]
    with env.state.session_factory() as s:
        account = s.get(Account, account_id)
        assert account is not None and account.totp_last_step is not None
