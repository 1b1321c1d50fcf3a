"""The console's pages (onetoken.web.console): each needs a session, sends the strict
Content-Security-Policy, shows only what the caller's role may open, and its assets come
from this origin."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from onetoken.orgs import auth
from onetoken.security.permissions import PERMISSIONS, held
from onetoken.state import AppState
from onetoken.web.console import CSP, PAGES, SIGN_IN_PATH

from .conftest import add_account, make_org_admin

API = "/api/v1"


@pytest.fixture
def browser(client: TestClient) -> TestClient:
    """The app over https, as a browser reaches it: the session cookie is Secure."""
    return TestClient(client.app, base_url="https://testserver", follow_redirects=False)


def console_session(client: TestClient, email: str, password: str) -> None:
    r = client.post(f"{API}/auth/session", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    assert client.cookies.get(auth.SESSION_COOKIE)


def test_every_page_requires_a_session(browser: TestClient) -> None:
    for page in PAGES:
        browser.cookies.clear()
        r = browser.get(page.path)
        assert r.status_code == 303, page.path
        assert r.headers["location"] == f"{SIGN_IN_PATH}?next={page.path}"
        assert r.headers["content-security-policy"] == CSP
        # A session token that resolves to nothing is no session either.
        browser.cookies.set(auth.SESSION_COOKIE, "ots_" + "x" * 40)
        assert browser.get(page.path).status_code == 303, page.path


def test_pages_send_the_csp_and_load_only_own_assets(
    client: TestClient, browser: TestClient, state: AppState
) -> None:
    admin = make_org_admin(state, client, "Acme", "owner@acme.test", is_operator=True)
    client = browser
    r = client.get(SIGN_IN_PATH)
    assert r.status_code == 200, r.text
    console_session(client, admin.email, admin.password)
    for page in PAGES:
        r = client.get(page.path)
        assert r.status_code == 200, page.path
        headers = r.headers
        assert headers["content-security-policy"] == CSP
        assert "frame-ancestors 'none'" in CSP and "script-src 'self'" in CSP
        assert headers["x-frame-options"] == "DENY"
        html = r.text
        # No inline script or handler: the CSP would refuse it.
        assert re.search(r"<script(?![^>]*\bsrc=)", html) is None, page.path
        assert re.search(r"\son[a-z]+=", html) is None, page.path
        for src in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert src.startswith("/"), (page.path, src)
            if src.startswith("/console/static/"):
                asset = client.get(src)
                assert asset.status_code == 200, src
                assert asset.headers["x-content-type-options"] == "nosniff"


def test_navigation_and_pages_follow_the_role(
    client: TestClient, browser: TestClient, state: AppState
) -> None:
    owner = make_org_admin(state, client, "Acme", "owner@acme.test")
    add_account(state, client, owner.org_id, "viewer@acme.test", "viewer")
    client = browser
    console_session(client, "viewer@acme.test", "another long password")
    held_by_viewer = held("viewer", False)
    r = client.get(f"{API}/me/permissions")
    assert r.status_code == 200, r.text
    assert r.json()["permissions"] == held_by_viewer
    overview = client.get("/").text
    for page in PAGES:
        linked = f'href="{page.path}"' in overview
        assert linked == (page.listed and page.permission in held_by_viewer), page.path
        r = client.get(page.path)
        assert r.status_code == (200 if page.permission in held_by_viewer else 403), page.path
    # Every page's permission is one of the matrix.
    assert {p.permission for p in PAGES} <= set(PERMISSIONS)


def test_unsafe_api_calls_from_the_console_need_the_csrf_token(
    client: TestClient, browser: TestClient, state: AppState
) -> None:
    admin = make_org_admin(state, client, "Acme", "owner@acme.test")
    client = browser
    console_session(client, admin.email, admin.password)
    r = client.post(f"{API}/keys", json={"name": "no token"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    csrf = client.cookies.get(auth.CSRF_COOKIE)
    r = client.post(f"{API}/keys", json={"name": "with token"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text


def test_each_role_can_read_everything_its_pages_load(
    client: TestClient, state: AppState
) -> None:
    """A page a role may open loads only what that role may read: no `data-load` of a
    page in its navigation is refused to its session (a page asking for more than its
    permission would fill in with errors)."""
    owner = make_org_admin(state, client, "Acme", "owner@acme.test")
    add_account(state, client, owner.org_id, "viewer@acme.test", "viewer")
    add_account(state, client, owner.org_id, "admin@acme.test", "admin")
    new_pages = {"/models", "/organization", "/security/incidents", "/applications"}
    for email, role, password in (
        ("viewer@acme.test", "viewer", "another long password"),
        ("admin@acme.test", "admin", "another long password"),
        (owner.email, "owner", owner.password),
    ):
        tab = TestClient(client.app, base_url="https://testserver", follow_redirects=False)
        console_session(tab, email, password)
        perms = held(role, False)
        listed = {p.path for p in PAGES if p.listed and p.permission in perms}
        # Every member sees the models with their processor and the org's terms; only
        # those who handle security events see the incidents.
        assert {"/models", "/organization", "/applications"} <= listed, role
        assert ("/security/incidents" in listed) == (role != "viewer"), role
        assert "/operator/orgs" not in listed
        loaded = 0
        for path in sorted(listed):
            html = tab.get(path).text
            for url in re.findall(r'data-load="([^"]+)"', html):
                url = url.replace("&amp;", "&").replace("{today}", "2026-01-01T00:00:00Z")
                assert "{" not in url, (path, url)
                r = tab.get(url)
                # Call metadata needs a running gateway (503 here); never a refusal.
                assert r.status_code not in (401, 403), (role, path, url, r.text)
                if path in new_pages:
                    assert r.status_code == 200, (role, path, url, r.text)
                    loaded += 1
        assert loaded >= 3, role


def test_processor_facts_and_the_no_training_rule_are_on_the_pages(
    client: TestClient, browser: TestClient, state: AppState
) -> None:
    admin = make_org_admin(state, client, "Acme", "admin@acme.test", "admin")
    console_session(browser, admin.email, admin.password)
    models = browser.get("/models").text
    for field in ("vendor", "region", "trains_on_data", "zero_retention"):
        assert f'data-f="processor.{field}"' in models, field
    catalog = browser.get("/catalog").text
    assert 'data-f="processor.trains_on_data"' in catalog
    assert 'data-f="no_training"' in catalog and "owner_only" in catalog
    # An admin may write the policy but not lift no_training: the form's PUT is refused
    # with the code the page names, and the form shows it in place.
    csrf = browser.cookies.get(auth.CSRF_COOKIE)
    r = browser.put(f"{API}/orgs/{admin.org_id}/policy", json={"no_training": False},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403 and r.json()["error"]["code"] == "owner_only", r.text


def test_operators_terminate_an_org_only_after_typing_its_id_again(
    client: TestClient, browser: TestClient, state: AppState
) -> None:
    operator = make_org_admin(state, client, "Platform", "ops@platform.test", is_operator=True)
    console_session(browser, operator.email, operator.password)
    html = browser.get("/operator/orgs").text
    form = re.search(r'<form id="terminate".*?</form>', html, re.S)
    assert form is not None
    # The confirmation has no name: it is compared in the page, never sent to the API.
    confirm = re.search(r"<input data-same-as=\"org_id\"[^>]*>", form.group(0))
    assert confirm is not None and "name=" not in confirm.group(0)
    assert 'data-api="/api/v1/orgs/{org_id}/terms" data-method="PATCH"' in html
    assert 'data-api="/api/v1/orgs/{org_id}/termination" data-method="GET"' in html


def test_operators_place_and_lift_holds_the_org_reads_them_and_restricts_processing(
    client: TestClient, browser: TestClient, state: AppState
) -> None:
    admin = make_org_admin(state, client, "Acme", "admin@acme.test", "admin")
    operator = make_org_admin(state, client, "Platform", "ops@platform.test", is_operator=True)
    console_session(browser, operator.email, operator.password)
    # The org is chosen by `?org=`; anything but an id is ignored, never put in a path.
    assert 'id="holds"' not in browser.get("/operator/holds?org=../security/blocked").text
    html = browser.get(f"/operator/holds?org={admin.org_id}").text
    assert f'data-load="/api/v1/orgs/{admin.org_id}/holds"' in html
    assert f'data-api="/api/v1/orgs/{admin.org_id}/holds" data-method="POST"' in html
    lift = re.search(r'data-actions="([^"]+)"', html)
    assert lift is not None
    _, method, url, when = lift.group(1).split("|")
    assert (method, when) == ("POST", "state=standing")
    # The page's calls, as the console sends them.
    csrf = {"X-CSRF-Token": browser.cookies.get(auth.CSRF_COOKIE) or ""}
    placed = browser.post(f"{API}/orgs/{admin.org_id}/holds", headers=csrf, json={
        "reason": "Case 2026-114", "expires_at": "2099-01-01T00:00:00Z"})
    assert placed.status_code == 201, placed.text
    hold = placed.json()
    listed = browser.get(f"{API}/orgs/{admin.org_id}/holds").json()
    assert [h["state"] for h in listed["data"]] == ["standing"] and listed["held"]

    tab = TestClient(client.app, base_url="https://testserver", follow_redirects=False)
    console_session(tab, admin.email, admin.password)
    org_page = tab.get("/organization").text
    assert 'data-load="/api/v1/org/holds"' in org_page
    assert f'data-api="/api/v1/orgs/{admin.org_id}/restriction" data-method="PUT"' in org_page
    assert 'data-api="/api/v1/me/restriction" data-method="PUT"' in tab.get("/privacy").text
    seen = tab.get(f"{API}/org/holds").json()
    assert seen["held"] and seen["data"][0]["reason"] == "Case 2026-114"

    lifted = browser.post(url.replace("{org_id}", admin.org_id).replace("{id}", hold["id"]),
                          headers=csrf)
    assert lifted.status_code == 200 and lifted.json()["state"] == "lifted", lifted.text
    assert not tab.get(f"{API}/org/holds").json()["held"]
