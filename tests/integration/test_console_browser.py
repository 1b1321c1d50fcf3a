"""The console in a real browser (Debian's Chromium, driven by Playwright) against a real
`onetoken serve` and the mock upstream: sign in with a second factor, create a key and
call the gateway with it through the openai SDK, find the call in the log and the chart,
redeem a code, download an invoice and export one's data, acknowledge a security event and
resolve its incident; every page is screenshot at
desktop and phone width and must render without a console error or a failed API call.

A canary sent through the gateway must appear on no page, while the same call's request id
does (so the check can fail)."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from onetoken.security import totp
from onetoken.web.console import PAGES
from tests.support import wait_until

from .harness import Admin, cli

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
# A 1x1 PNG: an attachment whose type the API recognises from its bytes.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (.ci/run installs it)"
)


@dataclass
class Watch:
    """What went wrong in a page: console errors, uncaught errors, failed API calls."""

    problems: list[str] = field(default_factory=list)
    expected: set[tuple[int, str]] = field(default_factory=set)

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"failed: {r.method} {r.url} {r.failure}"))
        page.on("response", self._response)

    def _console(self, m: Any) -> None:
        # The browser's own line for an HTTP error: _response judges those.
        if m.type == "error" and not m.text.startswith("Failed to load resource: the server"):
            self.problems.append(f"console: {m.text} at {m.location}")

    def _response(self, r: Any) -> None:
        path = r.url.split("//", 1)[-1].split("/", 1)[-1]
        if r.status >= 400 and (r.status, "/" + path.split("?")[0]) not in self.expected:
            self.problems.append(f"HTTP {r.status}: {r.request.method} /{path}")

    def take(self) -> list[str]:
        out, self.problems = self.problems, []
        return out


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the run leaves its screenshots: $ONETOKEN_SCREENSHOT_DIR, or pytest's tmp dir."""
    wanted = os.environ.get("ONETOKEN_SCREENSHOT_DIR")
    out = Path(wanted) if wanted else tmp_path_factory.mktemp("console-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def owner(deployment: dict[str, Any], admin: Admin) -> dict[str, str]:
    """The bootstrap owner (an operator too), with a second factor enrolled."""
    creds = deployment["creds"]
    enrolled = admin.post("/api/v1/me/totp", {"current_password": creds["admin_password"]})
    secret = enrolled["secret"]
    admin.post("/api/v1/me/totp/confirm", {"code": totp.code_at(secret, time.time())})
    return {"email": creds["admin_email"], "password": creds["admin_password"],
            "secret": secret}


def ready(page: Any) -> None:
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)


def sign_in(page: Any, base: str, who: dict[str, str], watch: Watch) -> None:
    page.goto(f"{base}/keys")
    assert "/signin?next=/keys" in page.url
    page.fill("input[name=login]", who["email"])
    page.fill("input[name=password]", who["password"])
    # The first attempt tells the form a second factor is needed: the API's error, in place.
    watch.expected.add((401, "/api/v1/auth/session"))
    page.click("button[type=submit]")
    page.wait_for_selector("#totp-row:not([hidden])")
    assert "totp_required" in page.inner_text("form .form-error")
    # The next time step: the one the enrolment confirmed cannot be used again.
    page.fill("input[name=totp_code]", totp.code_at(who["secret"], time.time() + totp.PERIOD_S))
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/keys")
    ready(page)
    watch.expected.clear()
    watch.take()


def sign_in_with_password(page: Any, base: str, path: str, login: str, password: str) -> None:
    page.goto(f"{base}{path}")
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}{path}")
    ready(page)


def test_console_flows_and_every_page(
    deployment: dict[str, Any], owner: dict[str, str], admin: Admin, chromium: Any,
    screenshots: Path, tmp_path: Path,
) -> None:
    server = deployment["server"]
    base = server.control_url
    context = chromium.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    watch = Watch()
    watch.attach(page)

    sign_in(page, base, owner, watch)

    # A key, created in the console and shown once, works at the gateway.
    page.fill("form[data-api='/api/v1/keys'] input[name=name]", "from the console")
    page.fill("form[data-api='/api/v1/keys'] input[name='limits.rpm']", "600")
    page.click("form[data-api='/api/v1/keys'] button[type=submit]")
    page.wait_for_selector("#key-secret:not([hidden])")
    key = page.inner_text("#key-secret dd[data-f=key]").strip()
    assert key.startswith("ot-"), key
    page.wait_for_selector("#keys td:has-text('from the console')")
    # Its limits change in place (the id from the table).
    row = page.locator("#keys tr", has_text="from the console")
    key_id = row.locator("td[data-label=Id]").inner_text()
    page.fill("#change-key input[name=key_id]", key_id)
    page.fill("#change-key input[name='limits.rpm']", "1200")
    page.click("#change-key button[type=submit]")
    page.wait_for_selector("#keys tr:has-text('from the console') td:has-text('1200')")
    canary = f"canary-{uuid.uuid4().hex}"
    client = OpenAI(base_url=f"{server.gateway_url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": canary}], max_tokens=5)
    raw.parse()
    request_id = raw.headers["x-request-id"]

    # The call in the log and in the charts (metadata only).
    def call_listed() -> bool:
        page.goto(f"{base}/usage")
        ready(page)
        return request_id in page.inner_text("#calls")

    wait_until(call_listed, 30, 0.5, message="the call in the console's call log")
    assert int(page.get_attribute("#chart-model", "data-points") or 0) >= 1
    assert "demo-chat" in page.inner_text("#chart-model")
    # Filters narrow the rows; the CSV holds what is shown.
    page.fill("form[data-filter] input[name=model_served]", "no-such-model")
    page.click("form[data-filter] button[type=submit]")
    page.wait_for_selector("#calls td.empty")
    assert request_id not in page.inner_text("#calls")
    page.fill("form[data-filter] input[name=model_served]", "")
    page.click("form[data-filter] button[type=submit]")
    page.wait_for_selector(f"#calls td:has-text('{request_id}')")
    with page.expect_download() as got:
        page.click("button[data-csv]")
    csv_text = Path(got.value.path()).read_text()
    assert request_id in csv_text and canary not in csv_text

    # The same call in a read-only SQL query; a refused statement shows the API's error.
    page.goto(f"{base}/sql")
    ready(page)
    page.click("#sql button[type=submit]")
    page.wait_for_selector("#sql-result td:has-text('mock-gpt')")
    watch.expected.add((400, "/api/v1/analytics/sql"))
    page.fill("#sql textarea[name=query]", "DROP TABLE onetoken.call_log")
    page.click("#sql button[type=submit]")
    page.wait_for_selector("#sql .form-error:has-text('sql_refused')")
    watch.expected.clear()

    # A redemption code credits the balance.
    made = json.loads(cli(deployment["data_dir"], "billing", "codes", "create",
                          "--credit", "7", "--json").stdout)
    page.goto(f"{base}/billing")
    ready(page)
    before = page.inner_text("#balance")
    page.fill("form[data-api='/api/v1/billing/redeem'] input[name=code]", made["codes"][0])
    page.click("form[data-api='/api/v1/billing/redeem'] button[type=submit]")
    page.wait_for_selector("#redeemed:not([hidden])")
    wait_until(lambda: page.inner_text("#balance") != before, 10, 0.1,
               message="the balance after redeeming")
    # A used code is refused, and the form shows the API's message in place.
    watch.expected.add((422, "/api/v1/billing/redeem"))
    page.fill("form[data-api='/api/v1/billing/redeem'] input[name=code]", made["codes"][0])
    page.click("form[data-api='/api/v1/billing/redeem'] button[type=submit]")
    page.wait_for_selector("form[data-api='/api/v1/billing/redeem'] .form-error:not(:empty)")
    watch.expected.clear()

    # An invoice, requested and downloaded.
    month = datetime.now(UTC).strftime("%Y-%m")
    form = "form[data-api='/api/v1/billing/invoices']"
    page.fill(f"{form} input[name=period]", month)
    page.fill(f"{form} input[name=title]", "Acme Ltd")
    page.fill(f"{form} input[name=tax_id]", "TAX-1")
    page.fill(f"{form} input[name=address]", "1 Main Street")
    page.click(f"{form} button[type=submit]")
    page.wait_for_selector("#invoices a:has-text('Download')")
    with page.expect_download() as got:
        page.click("#invoices a:has-text('Download')")
    invoice = Path(got.value.path()).read_text()
    assert "Acme Ltd" in invoice and "TAX-1" in invoice

    # Export my data.
    page.goto(f"{base}/privacy")
    ready(page)
    with page.expect_download() as got:
        page.click("#export-account")
    exported = json.loads(Path(got.value.path()).read_text())
    assert owner["email"] in json.dumps(exported)

    # An admin adds a model on an existing provider, and the gateway serves it.
    page.goto(f"{base}/catalog")
    ready(page)
    provider_row = page.locator("#providers tbody tr").first
    provider_id = provider_row.locator("td[data-label=Id]").inner_text()
    page.fill("#new-model input[name=name]", "console-chat")
    page.fill("#new-model input[name=provider_id]", provider_id)
    page.fill("#new-model input[name=upstream_model]", "mock-gpt")
    page.fill("#new-model input[name=input_price]", "1")
    page.click("#new-model button[type=submit]")
    page.wait_for_selector("#models td:has-text('console-chat')")

    def served() -> bool:
        try:
            client.chat.completions.create(
                model="console-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        except openai.APIStatusError:
            return False
        return True

    wait_until(served, 10, 0.2, message="the new model served by the gateway")

    # An operator blocks an address and lifts the block again.
    page.goto(f"{base}/operator/blocked")
    ready(page)
    page.fill("form[data-api='/api/v1/security/blocked'] input[name=source]", "198.51.100.9")
    page.click("form[data-api='/api/v1/security/blocked'] button[type=submit]")
    page.wait_for_selector("#blocked td:has-text('198.51.100.9/32')")
    page.click("#blocked button:has-text('Unblock')")
    page.wait_for_selector("#blocked td.empty")

    # An event of the security log, acknowledged from the log's table: that opens its
    # incident, taken at once; on the incident's page it is assigned, noted, unassigned
    # and resolved, each step on the timeline.
    def event_listed() -> bool:
        page.goto(f"{base}/security")
        ready(page)
        return page.locator("#events button:has-text('Acknowledge')").count() > 0

    wait_until(event_listed, 30, 0.5, message="an event in the console's security log")
    page.locator("#events button:has-text('Acknowledge')").first.click()
    page.wait_for_selector(
        "#incident-taken:not([hidden]) dd[data-f=status]:has-text('acknowledged')")
    incident_id = page.inner_text("#incident-taken dd[data-f=id]").strip()
    # The row action also reloads the log's table: leave once that has answered, or the
    # navigation cancels its request.
    page.wait_for_load_state("networkidle")
    page.click("#incident-taken a:has-text('Open the incident')")
    page.wait_for_url(f"{base}/security/incident?id={incident_id}")
    ready(page)
    assert page.inner_text("#incident-status") == "acknowledged"
    me = page.inner_text("#incident dd[data-f=opened_by]").strip()
    page.fill("#assign input[name=assignee_id]", me)
    page.click("#assign button[type=submit]")
    page.wait_for_selector(f"#incident dd[data-f=assignee_id]:has-text('{me}')")
    page.fill("#note input[name=text]", "checked with the customer by phone")
    page.click("#note button[type=submit]")
    page.wait_for_selector("#timeline td:has-text('checked with the customer by phone')")
    page.click("#unassign button[type=submit]")
    page.wait_for_selector("#timeline td:has-text('incident.unassigned')")
    assert page.inner_text("#incident dd[data-f=assignee_id]") == "\N{EN DASH}"
    page.select_option("#resolve select[name=resolution]", "false_positive")
    page.click("#resolve button[type=submit]")
    page.wait_for_selector("#incident-status:has-text('resolved')")
    page.wait_for_selector("#timeline td:has-text('incident.resolved')")
    timeline = page.inner_text("#timeline")
    assert "incident.opened" in timeline and "false_positive" in timeline

    # A customer of another organization opens a ticket with an attachment; staff answer
    # it and close it; the customer sees both.
    password = "a customer's long password"
    customer_org = admin.post("/api/v1/orgs", {"name": "Customer Co", "owner": {
        "email": "owner@customer.test", "role": "owner", "password": password}})["id"]
    customer_context = chromium.new_context(viewport=DESKTOP)
    customer = customer_context.new_page()
    watch.attach(customer)
    # A new account accepts the terms of service on behalf of its org before anything else
    # (docs/terms.md): every page leads there until it does, and the API refuses the rest.
    customer.goto(f"{base}/tickets")
    customer.fill("input[name=login]", "owner@customer.test")
    customer.fill("input[name=password]", password)
    customer.click("button[type=submit]")
    customer.wait_for_url(f"{base}/terms?next=/tickets")
    ready(customer)
    assert "on behalf of my organization" in customer.inner_text("#terms")
    customer.screenshot(path=str(screenshots / "terms-desktop.png"), full_page=True)
    r = admin.http.get("/api/v1/terms/acceptances", params={"org_id": customer_org})
    assert r.status_code == 200 and r.json()["data"] == []
    customer.click("#terms button[type=submit]")
    customer.wait_for_url(f"{base}/tickets")
    ready(customer)
    accepted = admin.get(f"/api/v1/terms/acceptances?org_id={customer_org}")["data"]
    assert [a["org_id"] for a in accepted] == [customer_org]
    shot = tmp_path / "screen.png"
    shot.write_bytes(PNG)
    customer.fill("#new-ticket input[name=subject]", "The chart is empty")
    customer.select_option("#new-ticket select[name=category]", "technical")
    customer.fill("#new-ticket textarea[name=description]", "Since this morning.")
    customer.set_input_files("#new-ticket input[type=file]", str(shot))
    customer.click("#new-ticket button[type=submit]")
    customer.wait_for_url(f"{base}/tickets/thread?id=*")
    ready(customer)
    ticket_id = customer.url.split("id=", 1)[1]
    assert "image/png" in customer.inner_text("#ticket table")
    page.goto(f"{base}/operator/tickets")
    ready(page)
    page.click("#queue a:has-text('The chart is empty')")
    page.wait_for_url(f"{base}/operator/tickets/thread?id={ticket_id}")
    ready(page)
    assert "Since this morning." in page.inner_text("#ticket")
    with page.expect_download() as got:
        page.click("#ticket table a:has-text('Download')")
    assert Path(got.value.path()).read_bytes() == PNG
    page.fill("#reply textarea[name=body]", "Fixed on our side.")
    page.click("#reply button[type=submit]")
    page.wait_for_selector("#ticket .thread li:has-text('Fixed on our side.')")
    page.select_option("#set-status select[name=status]", "closed")
    page.click("#set-status button[type=submit]")
    page.wait_for_selector("#ticket-status:has-text('closed')")
    customer.reload()
    ready(customer)
    assert "Fixed on our side." in customer.inner_text("#ticket .thread")
    assert customer.inner_text("#ticket-status") == "closed"
    # Closed is final: the API's refusal shows in the form.
    watch.expected.add((409, f"/api/v1/tickets/{ticket_id}/messages"))
    customer.fill("#reply textarea[name=body]", "One more thing")
    customer.click("#reply button[type=submit]")
    customer.wait_for_selector("#reply .form-error:not(:empty)")
    watch.expected.clear()

    # Every page, desktop and phone: rendered, no console error, no failed API call, and
    # the canary nowhere while the request id is on the usage page. A customer's ticket
    # thread is shown to that customer.
    problems = watch.take()
    assert problems == [], "\n".join(problems)
    phone_context = chromium.new_context(viewport=PHONE, storage_state=context.storage_state(),
                                         is_mobile=True, has_touch=True)
    phone = phone_context.new_page()
    watch.attach(phone)
    customer_phone_context = chromium.new_context(
        viewport=PHONE, storage_state=customer_context.storage_state(), is_mobile=True,
        has_touch=True)
    customer_phone = customer_phone_context.new_page()
    watch.attach(customer_phone)
    seen_request_id = False
    for p in PAGES:
        name = p.path.strip("/").replace("/", "-") or "overview"
        query = "" if p.listed else f"?id={incident_id if 'incident' in p.path else ticket_id}"
        tabs = (("desktop", page), ("phone", phone))
        if p.path == "/tickets/thread":
            tabs = (("desktop", customer), ("phone", customer_phone))
        for label, tab in tabs:
            tab.goto(f"{base}{p.path}{query}")
            ready(tab)
            tab.screenshot(path=str(screenshots / f"{name}-{label}.png"), full_page=True)
            html = tab.content()
            assert canary not in html, p.path
            seen_request_id = seen_request_id or request_id in html
            problems = watch.take()
            assert problems == [], f"{p.path} {label}: " + "\n".join(problems)
    assert seen_request_id
    for c in (phone_context, customer_phone_context, customer_context, context):
        c.close()
    # Every page at both widths, and the terms page a new account meets first.
    assert len(list(screenshots.glob("*.png"))) == 2 * len(PAGES) + 1
