"""Sign-in through an org's identity provider (docs/sso.md), against a real OpenID provider
over HTTP on 127.0.0.1 (tests/oidc_provider.py): the code flow end to end with PKCE
checked by the provider, every refusal of a bent answer (state, nonce, audience,
authorized party, expiry, signature, domain, groups), roles following the provider's
groups, passwords turned off, the operator's break-glass login, and the security log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey
from sqlalchemy import select, update

from onetoken.db.base import utcnow
from onetoken.orgs import reset
from onetoken.orgs.models import Account, OrgSso, SsoFlow, SsoIdentity
from onetoken.rights import erasure
from onetoken.settings import Settings
from onetoken.sso import oidc
from onetoken.sso import service as sso
from onetoken.state import AppState
from tests.oidc_provider import OidcProvider, running
from tests.unit.conftest import Admin, accept_terms, add_account, drained_events, make_org_admin

API = "/api/v1"
CLIENT_ID = "onetoken-corp"
CLIENT_SECRET = "CANARY-client-secret-4b1d"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The operator's allow-list admits the test's provider on 127.0.0.1.
    settings.sso_private_cidrs = "127.0.0.1/32"
    return settings


@pytest.fixture
def provider(settings: Settings) -> Iterator[OidcProvider]:
    with running(CLIENT_ID, CLIENT_SECRET, sso.redirect_uri(settings)) as p:
        yield p


@pytest.fixture
def owner(state: AppState, client: TestClient) -> Admin:
    return make_org_admin(state, client, "Corp", "owner@corp.test")


def _config(provider: OidcProvider, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "issuer": provider.issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "allowed_domains": ["corp.test"],
        "group_claim": "groups",
        "role_map": [
            {"group": "engineering", "role": "developer"},
            {"group": "it-admins", "role": "admin"},
        ],
        "passwords_allowed": True,
    }
    return body | changes


@pytest.fixture
def configured(client: TestClient, owner: Admin, provider: OidcProvider) -> Admin:
    r = client.put(f"{API}/sso", json=_config(provider), headers=owner.headers)
    assert r.status_code == 200, r.text
    return owner


@pytest.fixture
def browser(client: TestClient) -> TestClient:
    """A browser: the app over https (its cookies are Secure), redirects not followed."""
    return TestClient(client.app, base_url="https://testserver", follow_redirects=False)


def _start(browser: TestClient, **target: str) -> str:
    r = browser.post(f"{API}/auth/sso/start", json=target or {"email": "alice@corp.test"})
    assert r.status_code == 200, r.text
    return str(r.json()["authorize_url"])


def _at_provider(authorize_url: str) -> str:
    """The browser at the provider, which signs the person in: the callback's path and
    query it is sent back to."""
    r = httpx.get(authorize_url, follow_redirects=False)
    assert r.status_code == 302, r.text
    back = urlsplit(r.headers["location"])
    return f"{back.path}?{back.query}"


def _sign_in(browser: TestClient, **target: str) -> httpx.Response:
    return browser.get(_at_provider(_start(browser, **target)))


def _refused(r: httpx.Response) -> str:
    assert r.status_code == 303, r.text
    location = urlsplit(r.headers["location"])
    assert location.path == "/signin"
    return parse_qs(location.query)["sso_error"][0]


def _events(kind: str) -> list[dict[str, Any]]:
    return [e for e in drained_events() if e["kind"] == kind]


def test_code_flow_creates_the_account_with_its_mapped_role(
    configured: Admin, browser: TestClient, provider: OidcProvider, state: AppState
) -> None:
    drained_events()
    authorize_url = _start(browser)
    query = parse_qs(urlsplit(authorize_url).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["client_id"] == [CLIENT_ID] and query["nonce"] and query["state"]
    r = browser.get(_at_provider(authorize_url))
    assert r.status_code == 200, r.text
    assert 'http-equiv="refresh"' in r.text
    # The provider redeemed the code only after the PKCE verifier matched the challenge.
    assert provider.token_outcomes == ["ok"]
    me = browser.get(f"{API}/me").json()
    assert (me["email"], me["role"], me["auth_status"]) == ("alice@corp.test", "developer", "sso")
    assert me["org_id"] == configured.org_id
    # The terms of service are asked for like from anyone else.
    r = browser.get(f"{API}/keys")
    assert r.status_code == 403 and r.json()["error"]["code"] == "terms_not_accepted"
    assert browser.get("/keys").headers["location"] == "/terms?next=/keys"
    # Signing in again finds the same account (by the provider's subject).
    assert _sign_in(browser).status_code == 200
    with state.session_factory() as session:
        accounts = session.scalars(select(Account).where(Account.org_id == configured.org_id))
        assert sorted(a.email or "" for a in accounts) == ["alice@corp.test", "owner@corp.test"]
    events = drained_events()
    logins = [e for e in events if e["kind"] == "auth.sso_login"]
    assert [e["detail"]["created"] for e in logins] == [True, False]
    assert all(e["org_id"] == configured.org_id for e in logins)
    # No token and no secret in the security log.
    flat = repr(events)
    assert CLIENT_SECRET not in flat and "eyJ" not in flat


def test_an_org_without_a_provider_reads_the_redirect_uri_to_register(
    client: TestClient, owner: Admin
) -> None:
    # The console's page loads this before anything is set: an answer, not a 404.
    r = client.get(f"{API}/sso", headers=owner.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["configured"] is False and body["issuer"] is None
    assert body["client_secret_set"] is False and body["org_id"] == owner.org_id
    assert body["redirect_uri"] == "http://127.0.0.1:8081/api/v1/auth/sso/callback"


def test_the_client_secret_is_stored_encrypted_and_never_returned(
    configured: Admin, client: TestClient, provider: OidcProvider, state: AppState
) -> None:
    r = client.get(f"{API}/sso", headers=configured.headers)
    assert r.status_code == 200
    assert CLIENT_SECRET not in r.text and r.json()["client_secret_set"] is True
    assert r.json()["configured"] is True
    assert r.json()["redirect_uri"] == "http://127.0.0.1:8081/api/v1/auth/sso/callback"
    with state.session_factory() as session:
        row = session.get(OrgSso, configured.org_id)
        assert row is not None and CLIENT_SECRET not in row.client_secret_encrypted
        assert state.secrets.decrypt(row.client_secret_encrypted) == CLIENT_SECRET
    # A change without the secret keeps it; the log says whether it changed, never what.
    drained_events()
    body = _config(provider, passwords_allowed=False)
    del body["client_secret"]
    assert client.put(f"{API}/sso", json=body, headers=configured.headers).status_code == 200
    (changed,) = _events("admin.sso_changed")
    assert changed["detail"]["passwords_allowed.after"] is False
    assert changed["detail"]["client_secret_changed"] is False
    assert CLIENT_SECRET not in repr(changed)


def test_pkce_verifier_is_checked_by_the_provider(
    configured: Admin, browser: TestClient, provider: OidcProvider, state: AppState
) -> None:
    callback = _at_provider(_start(browser))
    # The flow's verifier no longer fits the challenge the provider was given.
    with state.session_factory() as session:
        session.execute(update(SsoFlow).values(
            code_verifier_encrypted=state.secrets.encrypt("x" * 64)))
        session.commit()
    assert _refused(browser.get(callback)) == "token_request_failed"
    assert provider.token_outcomes == ["pkce_failed"]
    assert browser.get(f"{API}/me").status_code == 401


def test_state_is_bound_to_the_browser_and_single_use(
    configured: Admin, browser: TestClient, client: TestClient, provider: OidcProvider
) -> None:
    drained_events()
    callback = _at_provider(_start(browser))
    # The same answer arriving in another browser (no flow cookie, or another one).
    other = TestClient(client.app, base_url="https://testserver", follow_redirects=False)
    assert _refused(other.get(callback)) == "state_mismatch"
    # The state was used up by that attempt: the right browser cannot reuse it either.
    assert _refused(browser.get(callback)) == "invalid_state"
    # A state nobody issued, and a good sign-in replayed.
    assert _refused(browser.get(f"{API}/auth/sso/callback?code=x&state=forged")) == (
        "invalid_state")
    callback = _at_provider(_start(browser))
    assert browser.get(callback).status_code == 200
    assert _refused(browser.get(callback)) == "invalid_state"
    assert provider.token_outcomes == ["ok"]
    refusals = _events("auth.sso_refused")
    assert [e["detail"]["reason"] for e in refusals] == [
        "state_mismatch", "invalid_state", "invalid_state", "invalid_state"]
    assert refusals[0]["severity"] == "high"


def test_an_expired_flow_is_refused(
    configured: Admin, browser: TestClient, provider: OidcProvider, state: AppState
) -> None:
    callback = _at_provider(_start(browser))
    with state.session_factory() as session:
        session.execute(update(SsoFlow).values(expires_at=utcnow()))
        session.commit()
    assert _refused(browser.get(callback)) == "expired_state"
    assert provider.token_outcomes == []


def test_nonce_replay_is_refused(
    configured: Admin, browser: TestClient, provider: OidcProvider
) -> None:
    assert _sign_in(browser).status_code == 200
    # A token carrying an earlier sign-in's nonce (a replayed ID token) for a new flow.
    provider.nonce_override = provider.last_nonce
    assert _refused(_sign_in(browser)) == "nonce_mismatch"


@pytest.mark.parametrize(
    ("bend", "reason"),
    [
        ({"audience": "another-client"}, "wrong_audience"),
        ({"audience": [CLIENT_ID, "another-client"]}, "wrong_authorized_party"),
        ({"expires_in": -120}, "expired"),
        ({"sign_with_other_key": True}, "bad_signature"),
    ],
)
def test_a_bent_id_token_is_refused(
    configured: Admin, browser: TestClient, provider: OidcProvider,
    bend: dict[str, Any], reason: str,
) -> None:
    for name, value in bend.items():
        setattr(provider, name, value)
    drained_events()
    assert _refused(_sign_in(browser)) == reason
    assert provider.token_outcomes == ["ok"]
    assert browser.get(f"{API}/me").status_code == 401
    (refusal,) = _events("auth.sso_refused")
    assert refusal["detail"]["reason"] == reason and refusal["org_id"] == configured.org_id


def test_a_domain_not_allowed_is_refused(
    configured: Admin, browser: TestClient, provider: OidcProvider
) -> None:
    provider.person.email = "bob@elsewhere.test"
    assert _refused(_sign_in(browser, org_id=configured.org_id)) == "domain_not_allowed"
    # Nor does a domain no org allows find an org to start with.
    r = browser.post(f"{API}/auth/sso/start", json={"email": "bob@elsewhere.test"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "sso_not_configured"


def test_roles_follow_the_providers_groups_at_every_sign_in(
    configured: Admin, browser: TestClient, provider: OidcProvider
) -> None:
    provider.person.groups = ["engineering", "it-admins"]
    assert _sign_in(browser).status_code == 200
    assert browser.get(f"{API}/me").json()["role"] == "admin"
    drained_events()
    provider.person.groups = ["engineering"]
    assert _sign_in(browser).status_code == 200
    assert browser.get(f"{API}/me").json()["role"] == "developer"
    (changed,) = _events("admin.role_changed")
    assert (changed["detail"]["role.before"], changed["detail"]["role.after"]) == (
        "admin", "developer")
    # In no mapped group: refused, and the sign-in page says why.
    provider.person.groups = ["marketing"]
    browser.cookies.clear()
    reason = _refused(_sign_in(browser))
    assert reason == "no_mapped_group"
    page = browser.get(f"/signin?sso_error={reason}")
    assert "no group that has a role in this organization" in page.text
    assert browser.get(f"{API}/me").status_code == 401


def test_erasing_an_account_drops_its_link_to_the_provider(
    configured: Admin, browser: TestClient, provider: OidcProvider, state: AppState
) -> None:
    assert _sign_in(browser).status_code == 200
    first = browser.get(f"{API}/me").json()["id"]
    with state.session_factory() as session:
        account = session.get(Account, first)
        assert account is not None
        erasure.anonymize_account(session, account)
        session.commit()
        assert session.scalars(select(SsoIdentity)).all() == []
    # The same person at the provider gets a new account, not the erased one.
    browser.cookies.clear()
    assert _sign_in(browser).status_code == 200
    assert browser.get(f"{API}/me").json()["id"] != first


def test_only_owners_map_a_group_to_owner(
    configured: Admin, client: TestClient, provider: OidcProvider, state: AppState
) -> None:
    headers = add_account(state, client, configured.org_id, "admin@corp.test", "admin")
    body = _config(provider, role_map=[{"group": "root", "role": "owner"}])
    r = client.put(f"{API}/sso", json=body, headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "owner_required"
    assert client.put(f"{API}/sso", json=body, headers=configured.headers).status_code == 200


def test_internal_issuers_are_refused_without_the_operators_allow_list(
    configured: Admin, client: TestClient, browser: TestClient, provider: OidcProvider,
    state: AppState,
) -> None:
    state.settings.sso_private_cidrs = ""
    r = client.put(f"{API}/sso", json=_config(provider), headers=configured.headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "issuer"
    for issuer in ("https://127.0.0.1/realms/corp", "https://idp.corp.internal/"):
        r = client.put(f"{API}/sso", json=_config(provider, issuer=issuer),
                       headers=configured.headers)
        assert r.status_code == 422 and r.json()["error"]["param"] == "issuer"
    # What was saved before is refused at every fetch too.
    r = browser.post(f"{API}/auth/sso/start", json={"email": "alice@corp.test"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "sso_address_not_allowed"
    assert provider.token_outcomes == []


def test_passwords_off_refuses_password_sign_in_and_reset(
    configured: Admin, client: TestClient, provider: OidcProvider, state: AppState
) -> None:
    member = "member@corp.test"
    add_account(state, client, configured.org_id, member, "developer")
    r = client.put(f"{API}/sso", json=_config(provider, passwords_allowed=False),
                   headers=configured.headers)
    assert r.status_code == 200
    drained_events()
    for who in (member, configured.email):
        r = client.post(f"{API}/auth/login", json={"email": who, "password": "another long "
                                                   "password" if who == member else
                                                   configured.password})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "password_sign_in_disabled"
        assert "Sign in with SSO" in r.json()["error"]["message"]
    # A wrong password still says only that the credentials are wrong.
    r = client.post(f"{API}/auth/login", json={"email": member, "password": "wrong" * 4})
    assert r.json()["error"]["code"] == "invalid_credentials"
    assert [e["detail"]["reason"] for e in _events("auth.password_refused")] == [
        "passwords_off", "passwords_off"]
    with state.session_factory() as session:
        assert reset.request(session, state.secrets, member, ttl=timedelta(hours=1),
                             max_per_hour=5) is None
    # Turned back on (by an operator: the owner's password session ended with passwords
    # off), the same password works again.
    operator = make_org_admin(state, client, "Platform", "op@platform.test", is_operator=True)
    r = client.put(f"{API}/sso?org_id={configured.org_id}", json=_config(provider),
                   headers=operator.headers)
    assert r.status_code == 200, r.text
    r = client.post(f"{API}/auth/login",
                    json={"email": member, "password": "another long password"})
    assert r.status_code == 200


def test_a_reset_token_issued_before_passwords_went_off_is_refused(
    configured: Admin, client: TestClient, provider: OidcProvider, state: AppState
) -> None:
    with state.session_factory() as session:
        issued = reset.request(session, state.secrets, configured.email,
                               ttl=timedelta(hours=1), max_per_hour=5)
        session.commit()
    assert issued is not None
    client.put(f"{API}/sso", json=_config(provider, passwords_allowed=False),
               headers=configured.headers)
    r = client.post(f"{API}/auth/password-reset",
                    json={"token": issued[1], "password": "a brand new password"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "password_sign_in_disabled"


def test_operators_keep_a_break_glass_login(
    client: TestClient, provider: OidcProvider, state: AppState, owner: Admin
) -> None:
    operator = make_org_admin(state, client, "Platform", "op@platform.test", is_operator=True)
    accept_terms(client, operator.headers)
    accept_terms(client, owner.headers)
    # Both orgs sign in through the provider only (the operator's own too).
    for who in (operator, owner):
        body = _config(provider, passwords_allowed=False,
                       allowed_domains=["platform.test" if who is operator else "corp.test"])
        assert client.put(f"{API}/sso", json=body, headers=who.headers).status_code == 200
    drained_events()
    r = client.post(f"{API}/auth/login",
                    json={"email": operator.email, "password": operator.password})
    assert r.status_code == 200, r.text
    (glass,) = _events("auth.break_glass_login")
    assert glass["severity"] == "high" and glass["subject_id"] == operator.account_id
    # The provider is down for Corp: the operator lets its people use passwords again.
    headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    body = _config(provider, passwords_allowed=True)
    del body["client_secret"]
    r = client.put(f"{API}/sso?org_id={owner.org_id}", json=body, headers=headers)
    assert r.status_code == 200, r.text
    (changed,) = _events("admin.sso_changed")
    assert changed["actor_id"] == operator.account_id and changed["org_id"] == owner.org_id
    r = client.post(f"{API}/auth/login", json={"email": owner.email, "password": owner.password})
    assert r.status_code == 200
    # Someone else's org stays out of reach for anyone but operators.
    owner_headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = client.get(f"{API}/sso?org_id={operator.org_id}", headers=owner_headers)
    assert r.status_code == 404


def test_the_sign_in_needs_the_provider_to_be_reachable(
    configured: Admin, browser: TestClient, provider: OidcProvider
) -> None:
    provider.stop()
    drained_events()
    r = browser.post(f"{API}/auth/sso/start", json={"email": "alice@corp.test"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "sso_discovery_failed"
    (refusal,) = _events("auth.sso_refused")
    assert refusal["detail"] == {"reason": "discovery_failed", "stage": "start"}


def test_id_token_checks_take_only_asymmetric_signatures_of_published_keys() -> None:
    """The checks alone, on tokens joserfc signs: EC keys verify, `none` and HMAC (whose key
    would be the client secret) never do."""
    now = int(time.time())
    claims = {"iss": "https://idp.test", "sub": "s", "aud": CLIENT_ID, "iat": now,
              "exp": now + 60, "nonce": "n1"}
    check = {"issuer": "https://idp.test", "client_id": CLIENT_ID, "nonce": "n1", "now": now}
    ec_key = ECKey.generate_key("P-256", parameters={"kid": "ec"}, private=True)
    published = [ec_key.as_dict(private=False)]
    token = jwt.encode({"alg": "ES256", "kid": "ec"}, claims, ec_key)
    assert oidc.verify_id_token(token, published, **check)["sub"] == "s"
    with pytest.raises(oidc.OidcError) as refused:
        oidc.verify_id_token(token, published, **(check | {"nonce": "n2"}))
    assert refused.value.reason == "nonce_mismatch"
    secret = OctKey.import_key(CLIENT_SECRET.encode())
    hmac_token = jwt.encode({"alg": "HS256"}, claims, secret)
    head = oidc.b64url(b'{"alg":"none"}')
    body = oidc.b64url(json.dumps(claims).encode())
    for forged in (hmac_token, f"{head}.{body}."):
        with pytest.raises(oidc.OidcError) as refused:
            oidc.verify_id_token(forged, [*published, secret.as_dict()], **check)
        assert refused.value.reason == "algorithm_not_allowed"


def test_discovery_and_keys_are_cached_and_a_rotated_key_is_fetched(
    configured: Admin, browser: TestClient, provider: OidcProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr(sso, "providers", oidc.ProviderCache(ttl_s=300, clock=lambda: now[0]))
    for _ in range(3):
        assert _sign_in(browser).status_code == 200
    assert provider.fetches == {"discovery": 1, "jwks": 1}
    # The provider signs with a new key: its kid is unknown, so the keys are read again
    # once, and the sign-in works.
    provider.rotate_key("key-2")
    assert _sign_in(browser).status_code == 200
    assert _sign_in(browser).status_code == 200
    assert provider.fetches == {"discovery": 1, "jwks": 2}
    # Past the TTL both are read again.
    now[0] += 301
    assert _sign_in(browser).status_code == 200
    assert provider.fetches == {"discovery": 2, "jwks": 3}


def test_the_provider_cache_is_bounded(
    configured: Admin, browser: TestClient, provider: OidcProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = oidc.ProviderCache(max_entries=1)
    monkeypatch.setattr(sso, "providers", cache)
    assert _sign_in(browser).status_code == 200
    assert _sign_in(browser).status_code == 200
    # Discovery and the JWKS push each other out of a one-entry cache.
    assert len(cache) == 1
    assert provider.fetches == {"discovery": 2, "jwks": 2}


def test_starting_sign_ins_is_limited_per_address(
    configured: Admin, client: TestClient, provider: OidcProvider, state: AppState
) -> None:
    state.settings.sso_start_max_per_address = 3

    def browser_at(address: str) -> TestClient:
        return TestClient(client.app, base_url="https://testserver", follow_redirects=False,
                          client=(address, 50000))

    here = browser_at("203.0.113.5")
    drained_events()
    assert here.post(f"{API}/auth/sso/start", json={"email": "a@corp.test"}).status_code == 200
    # A domain no org allows counts too (it would tell which domains sign in here).
    assert here.post(f"{API}/auth/sso/start", json={"email": "a@x.test"}).status_code == 404
    assert here.post(f"{API}/auth/sso/start", json={"email": "a@corp.test"}).status_code == 200
    for _ in range(2):
        r = here.post(f"{API}/auth/sso/start", json={"email": "a@corp.test"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "sso_start_limited"
        assert 590 <= int(r.headers["retry-after"]) <= 601
    (limited,) = _events("auth.sso_start_limited")
    assert limited["source_ip"] == "203.0.113.5" and limited["detail"]["starts"] == 4
    # Another address is not held up.
    there = browser_at("203.0.113.6")
    assert there.post(f"{API}/auth/sso/start", json={"email": "a@corp.test"}).status_code == 200
    # Starts racing from one address are counted exactly.
    state.settings.sso_start_max_per_address = 4
    racer = browser_at("203.0.113.7")
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda _: racer.post(f"{API}/auth/sso/start",
                                 json={"email": "a@corp.test"}).status_code, range(8)))
    assert sorted(statuses) == [200] * 4 + [429] * 4


def test_turning_passwords_off_ends_the_sessions_opened_with_a_password(
    configured: Admin, client: TestClient, browser: TestClient, provider: OidcProvider,
    state: AppState,
) -> None:
    member = add_account(state, client, configured.org_id, "member@corp.test", "developer")
    assert _sign_in(browser).status_code == 200
    operator = make_org_admin(state, client, "Platform", "op@platform.test", is_operator=True)
    for headers in (member, configured.headers, operator.headers):
        assert client.get(f"{API}/me", headers=headers).status_code == 200
    drained_events()
    # The owner turns passwords off from a session opened with their password.
    r = client.put(f"{API}/sso", json=_config(provider, passwords_allowed=False),
                   headers=configured.headers)
    assert r.status_code == 200
    for headers in (member, configured.headers):
        assert client.get(f"{API}/me", headers=headers).status_code == 401
    # The session opened through the provider stays, and so does another org's operator.
    assert browser.get(f"{API}/me").status_code == 200
    assert client.get(f"{API}/me", headers=operator.headers).status_code == 200
    (ended,) = _events("admin.sessions_ended")
    assert ended["org_id"] == configured.org_id and ended["severity"] == "high"
    assert ended["actor_id"] == configured.account_id
    assert ended["detail"] == {"reason": "passwords_off", "sessions": 2}
    # Saved again while passwords are off: nothing more ends.
    r = client.put(f"{API}/sso?org_id={configured.org_id}",
                   json=_config(provider, passwords_allowed=False), headers=operator.headers)
    assert r.status_code == 200, r.text
    assert _events("admin.sessions_ended") == []
    assert browser.get(f"{API}/me").status_code == 200
