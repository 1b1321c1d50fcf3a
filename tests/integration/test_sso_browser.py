"""Sign in with SSO in a real browser (Debian's Chromium, driven by Playwright): the
console's form, the provider (tests/oidc_provider.py), the callback and on into the
console, with the browser's own cookie rules (the session cookie is SameSite=Strict, and
the navigation started at the provider's site) and the console's Content-Security-Policy.
A person in no mapped group lands back on the sign-in page, which says why."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from onetoken.control import build_state, create_app
from onetoken.settings import Settings
from onetoken.sso import service as sso
from tests import builders as build
from tests.oidc_provider import OidcProvider, running
from tests.support import TEST_SECRET, wait_until

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (.ci/run installs it)"
)


@dataclass
class Site:
    base: str
    provider: OidcProvider


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp_path = tmp_path_factory.mktemp("sso")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    settings = Settings(data_dir=tmp_path / "data", secret_key=SecretStr(TEST_SECRET),
                        public_url=base, sso_private_cidrs="127.0.0.1/32,::1/128")
    state = build_state(settings)
    with state.session_factory() as session:
        build.org_with_owner(session, "Corp", "owner@corp.test")
        session.commit()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, state=state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=15)
        # The provider as `localhost`, the console as 127.0.0.1: two sites to the browser,
        # as a real provider and onetoken are.
        with running("onetoken-corp", "browser-test-secret", sso.redirect_uri(settings),
                     host="localhost") as p:
            token = httpx.post(f"{base}/api/v1/auth/login", json={
                "email": "owner@corp.test", "password": build.PASSWORD}).json()["access_token"]
            r = httpx.put(f"{base}/api/v1/sso", headers={"Authorization": f"Bearer {token}"},
                          json={"issuer": p.issuer, "client_id": "onetoken-corp",
                                "client_secret": "browser-test-secret",
                                "allowed_domains": ["corp.test"],
                                "role_map": [{"group": "engineering", "role": "developer"}]})
            assert r.status_code == 200, r.text
            p.consent_page = True
            yield Site(base, p)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        state.db_engine.dispose()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh browser profile (no cookies) whose page must raise no error and break no
    Content-Security-Policy rule."""
    context = chromium.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy"
            in m.text else None)
    yield page
    context.close()
    assert errors == []


def _sso(page: Any, site: Site) -> None:
    page.goto(f"{site.base}/signin")
    page.fill("#sso-form input[name=email]", "alice@corp.test")
    page.click("#sso-form button[type=submit]")
    # At the provider's own page: from here the way back is a cross-site navigation.
    page.wait_for_url(f"{site.provider.issuer}/authorize**", timeout=15_000)
    page.click("#consent")


def test_sign_in_with_sso_in_a_browser(site: Site, page: Any) -> None:
    _sso(page, site)
    # Through the provider and the callback's page into the console: the session cookie
    # reached it, so the console asks for the terms of service rather than a sign-in.
    page.wait_for_url(f"{site.base}/terms**", timeout=15_000)
    assert site.provider.token_outcomes[-1] == "ok"
    me = page.evaluate("fetch('/api/v1/me').then((r) => r.json())")
    assert (me["email"], me["role"], me["auth_status"]) == ("alice@corp.test", "developer", "sso")


def test_a_person_in_no_mapped_group_is_told_why(site: Site, page: Any) -> None:
    site.provider.person.groups = ["marketing"]
    try:
        _sso(page, site)
        page.wait_for_url(f"{site.base}/signin?sso_error=no_mapped_group", timeout=15_000)
    finally:
        site.provider.person.groups = ["engineering"]
    assert "no group that has a role" in page.inner_text("#sso-error")
