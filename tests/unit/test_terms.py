"""The terms of service accepted on behalf of the organization (policy section XII.2): each
trigger (a new account, an accepted invite, a new version) holds the session to its own
profile and the terms until it accepts; the acceptance is recorded with org, version,
time and address, audited, and listed for the org's admins."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from onetoken.bootstrap import bootstrap
from onetoken.orgs import service as orgs
from onetoken.orgs.models import TermsAcceptance
from onetoken.state import AppState
from tests import builders as build
from tests.unit.conftest import Admin, drained_events

API = "/api/v1"


def _login(
    client: TestClient, login: str, password: str, pending: str | None = build.TERMS_VERSION
) -> dict[str, str]:
    """Signs in; the answer names the version still to accept (`pending`)."""
    r = client.post(f"{API}/auth/login", json={"login": login, "password": password})
    assert r.status_code == 200, r.text
    assert r.json()["terms_pending"] == pending
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _held_back(client: TestClient, headers: dict[str, str], version: str) -> None:
    """Everything but the own profile and the terms answers 403 terms_not_accepted."""
    for method, path in (("GET", "/keys"), ("GET", "/org"), ("POST", "/keys"),
                         ("PATCH", "/me"), ("GET", "/accounts")):
        r = client.request(method, f"{API}{path}", headers=headers, json={"name": "x"})
        assert r.status_code == 403, (method, path, r.text)
        error = r.json()["error"]
        assert error["code"] == "terms_not_accepted" and error["type"] == "permission_error"
        assert version in error["message"] and error["param"] == "version"
    assert client.get(f"{API}/me", headers=headers).status_code == 200
    terms = client.get(f"{API}/me/terms", headers=headers).json()
    assert terms["version"] == version and terms["accepted_at"] is None
    assert "on behalf of my organization" in terms["statement"]


def _accept(client: TestClient, headers: dict[str, str], version: str) -> dict[str, Any]:
    r = client.post(f"{API}/me/terms/accept", headers=headers, json={"version": version})
    assert r.status_code == 200, r.text
    assert client.get(f"{API}/keys", headers=headers).status_code == 200
    return dict(r.json())


def _acceptances(state: AppState, account_id: str) -> list[TermsAcceptance]:
    with state.session_factory() as s:
        return list(s.scalars(select(TermsAcceptance).where(
            TermsAcceptance.account_id == account_id).order_by(TermsAcceptance.accepted_at)))


def test_a_new_account_is_held_until_it_accepts(
    client: TestClient, state: AppState, operator: Admin
) -> None:
    # An operator creates an org with its owner: the owner has accepted nothing.
    r = client.post(f"{API}/orgs", headers=operator.headers, json={
        "name": "Initech",
        "owner": {"email": "peter@initech.test", "password": build.PASSWORD, "role": "owner"}})
    assert r.status_code == 201, r.text
    org_id, owner_id = r.json()["id"], r.json()["owner"]["id"]
    h = _login(client, "peter@initech.test", build.PASSWORD)
    version = build.TERMS_VERSION
    _held_back(client, h, version)
    # An out-of-date page is not an acceptance of the current version.
    stale = client.post(f"{API}/me/terms/accept", headers=h, json={"version": "1999-01-01"})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "terms_version_mismatch"
    assert _acceptances(state, owner_id) == []

    drained_events()
    before = client.get(f"{API}/me/terms", headers=h).json()
    assert before["accepted_at"] is None
    # Accepted from a known address: the record keeps it.
    remote = TestClient(client.app, client=("198.51.100.7", 50000))
    accepted = _accept(remote, h, version)
    assert accepted["version"] == version and accepted["accepted_at"] is not None
    [record] = _acceptances(state, owner_id)
    assert (record.org_id, record.version, record.source_ip) == (org_id, version, "198.51.100.7")
    events = [e for e in drained_events() if e["kind"] == "account.terms_accepted"]
    assert [(e["org_id"], e["actor_id"], e["detail"]["version"]) for e in events] == [
        (org_id, owner_id, version)]
    # Accepting again changes nothing and is not audited twice.
    _accept(client, h, version)
    assert len(_acceptances(state, owner_id)) == 1
    assert not [e for e in drained_events() if e["kind"] == "account.terms_accepted"]
    # Signing in again, nothing is pending (the console's session answer says the same).
    _login(client, "peter@initech.test", build.PASSWORD, pending=None)
    console = client.post(f"{API}/auth/session",
                          json={"login": "peter@initech.test", "password": build.PASSWORD})
    assert console.status_code == 200 and console.json()["terms_pending"] is None

    # The org's admins list who accepted; other orgs see only their own.
    listed = client.get(f"{API}/terms/acceptances", headers=h).json()["data"]
    assert [(a["account_id"], a["org_id"], a["version"]) for a in listed] == [
        (owner_id, org_id, version)]
    ops = client.get(f"{API}/terms/acceptances", headers=operator.headers,
                     params={"org_id": org_id}).json()["data"]
    assert [a["account_id"] for a in ops] == [owner_id]
    mine = client.get(f"{API}/terms/acceptances", headers=operator.headers).json()["data"]
    assert [a["account_id"] for a in mine] == [operator.account_id]


def test_bootstrap_account_is_held_until_it_accepts(client: TestClient, state: AppState) -> None:
    with state.session_factory() as s:
        boot = bootstrap(s, state.secrets)
    assert boot.admin_password is not None
    h = _login(client, boot.admin_email, boot.admin_password)
    _held_back(client, h, build.TERMS_VERSION)
    _accept(client, h, build.TERMS_VERSION)


def test_an_accepted_invite_is_held_until_it_accepts(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    r = client.post(f"{API}/accounts", headers=admin.headers,
                    json={"email": "dana@acme.test", "role": "developer"})
    assert r.status_code == 201, r.text
    account_id, token = r.json()["id"], r.json()["invite_token"]
    r = client.post(f"{API}/auth/accept-invite",
                    json={"token": token, "password": build.PASSWORD})
    assert r.status_code == 200, r.text
    h = _login(client, "dana@acme.test", build.PASSWORD)
    _held_back(client, h, build.TERMS_VERSION)
    # Signing out stays open.
    assert client.post(f"{API}/auth/logout", headers=h).status_code == 204
    h = _login(client, "dana@acme.test", build.PASSWORD)
    _accept(client, h, build.TERMS_VERSION)
    [record] = _acceptances(state, account_id)
    assert record.org_id == admin.org_id
    listed = client.get(f"{API}/terms/acceptances", headers=admin.headers,
                        params={"version": build.TERMS_VERSION}).json()["data"]
    assert {a["account_id"] for a in listed} == {admin.account_id, account_id}


def test_a_new_version_holds_everyone_until_they_accept_it(
    client: TestClient, state: AppState, admin: Admin, other_admin: Admin
) -> None:
    assert client.get(f"{API}/keys", headers=admin.headers).status_code == 200
    state.settings.terms_version = "2027-03-01"
    # A session from before the change is held back as much as a new sign-in.
    _held_back(client, admin.headers, "2027-03-01")
    h = _login(client, admin.email, admin.password, pending="2027-03-01")
    _held_back(client, h, "2027-03-01")
    stale = client.post(f"{API}/me/terms/accept", headers=h,
                        json={"version": build.TERMS_VERSION})
    assert stale.status_code == 409
    _accept(client, h, "2027-03-01")
    assert client.get(f"{API}/keys", headers=admin.headers).status_code == 200
    # Each org's account accepts for itself: the other org is still held.
    _held_back(client, other_admin.headers, "2027-03-01")
    versions = [(a.version, a.org_id) for a in _acceptances(state, admin.account_id)]
    assert versions == [(build.TERMS_VERSION, admin.org_id), ("2027-03-01", admin.org_id)]


def test_members_do_not_list_acceptances(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    with state.session_factory() as s:
        viewer = orgs.create_account(s, admin.org_id, "vic@acme.test", build.PASSWORD, "viewer")
        build.accept_terms(s, viewer)
        s.commit()
    h = _login(client, "vic@acme.test", build.PASSWORD, pending=None)
    r = client.get(f"{API}/terms/acceptances", headers=h)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


def test_concurrent_accepts_record_one_acceptance(
    client: TestClient, state: AppState, admin: Admin
) -> None:
    state.settings.terms_version = "2027-06-01"
    drained_events()

    def accept(_: int) -> int:
        r = client.post(f"{API}/me/terms/accept", headers=admin.headers,
                        json={"version": "2027-06-01"})
        return r.status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(accept, range(12)))
    assert statuses == [200] * 12
    with state.session_factory() as s:
        count = s.scalar(select(func.count()).select_from(TermsAcceptance).where(
            TermsAcceptance.account_id == admin.account_id,
            TermsAcceptance.version == "2027-06-01"))
    assert count == 1
    events = [e for e in drained_events() if e["kind"] == "account.terms_accepted"]
    assert len(events) == 1
