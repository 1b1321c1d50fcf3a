"""The console: HTML pages served by the control process at `/` (docs/console.md).

Pages are rendered on the server from Jinja2 templates and fill themselves in with a
little hand-written JavaScript (static/console.js) that calls the control API with the
session cookie and its CSRF token, so the API's sessions, CSRF check and permission
matrix apply to everything the console does, and nothing here re-implements them. A page
is shown only to a caller holding its permission, and its navigation lists only the pages
the caller may open (the same list as GET /api/v1/me/permissions).

Assets come from the package (and plotly.min.js from the plotly wheel); the pages send a
Content-Security-Policy that admits scripts from this origin only and no framing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from onetoken import __version__
from onetoken.incidents.models import NOTE_MAX_CHARS
from onetoken.incidents.schemas import Resolution as IncidentResolution
from onetoken.incidents.schemas import Status as IncidentStatus
from onetoken.orgs import acceptance, auth
from onetoken.orgs.schemas import Settlement
from onetoken.security.permissions import held
from onetoken.security.principal import Principal
from onetoken.sso import service as sso
from onetoken.state import AppState
from onetoken.tickets.schemas import Category, Status
from onetoken.webhooks.events import EVENT_KINDS

STATIC_URL = "/console/static"
SIGN_IN_PATH = "/signin"
TERMS_PATH = "/terms"
# Where the links of invitation and password reset mails lead (onetoken.mail.notices).
INVITE_PATH = "/accept-invite"
RESET_PATH = "/reset-password"

#: Scripts, styles, images and API calls from this origin only; no inline script, no
#: plug-ins, no framing (clickjacking), forms post nowhere else.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Page:
    path: str
    title: str
    #: The permission of the matrix a caller needs to see the page at all.
    permission: str
    template: str
    #: The navigation's section: "" (everyone), "admin" or "operator".
    section: str = ""
    #: Listed in the navigation (a ticket's thread is reached from its list instead).
    listed: bool = True


PAGES: tuple[Page, ...] = (
    Page("/", "Overview", "self", "overview.html"),
    Page("/keys", "Keys", "keys.read", "keys.html"),
    Page("/applications", "Applications", "applications.read", "applications.html"),
    Page("/usage", "Usage", "calls.read", "usage.html"),
    Page("/billing", "Billing", "billing.read", "billing.html"),
    Page("/models", "Models", "models.read", "models.html"),
    Page("/sql", "SQL", "analytics.sql", "sql.html"),
    Page("/tickets", "Tickets", "tickets.read", "tickets.html"),
    Page("/tickets/thread", "Ticket", "tickets.read", "ticket.html", listed=False),
    Page("/privacy", "Privacy", "self", "privacy.html"),
    Page("/organization", "Organization", "org.read", "organization.html"),
    Page("/members", "Members", "members.read", "members.html", "admin"),
    Page("/webhooks", "Webhooks", "webhooks.read", "webhooks.html", "admin"),
    Page("/sso", "Single sign-on", "org.write", "sso.html", "admin"),
    Page("/security", "Security log", "security.read", "security.html", "admin"),
    Page("/security/incidents", "Incidents", "security.handle", "incidents.html", "admin"),
    Page("/security/siem", "SIEM", "security.read", "siem.html", "admin"),
    Page("/security/incident", "Incident", "security.handle", "incident.html", "admin",
         listed=False),
    Page("/catalog", "Providers and models", "providers.read", "catalog.html", "admin"),
    Page("/operator/orgs", "Organizations", "orgs.manage", "orgs.html", "operator"),
    Page("/operator/money", "Orders and credits", "billing.money", "money.html", "operator"),
    Page("/operator/blocked", "Blocked addresses", "security.block", "blocked.html", "operator"),
    Page("/operator/holds", "Legal holds", "holds.manage", "holds.html", "operator"),
    Page("/operator/tickets", "Ticket queue", "tickets.staff", "queue.html", "operator"),
    Page("/operator/tickets/thread", "Ticket (staff)", "tickets.staff", "ticket.html", "operator",
         listed=False),
)


class _Assets(StaticFiles):
    """The console's own files, never sniffed into another type."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _package_dir(name: str) -> Path:
    return Path(str(files("onetoken.web.console") / name))


def plotly_js() -> Path:
    """plotly's own bundle, from its wheel (never a CDN)."""
    return Path(str(files("plotly") / "package_data" / "plotly.min.js"))


_env = Environment(
    loader=FileSystemLoader(_package_dir("templates")),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _html(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    body = _env.get_template(template).render(static=STATIC_URL, version=__version__, **context)
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _principal(request: Request) -> Principal | None:
    state: AppState = request.app.state.onetoken
    token = request.cookies.get(auth.SESSION_COOKIE, "")
    if not token:
        return None
    with state.session_factory() as session:
        return auth.resolve_session(session, state.secrets, token)


def _terms_pending(state: AppState, principal: Principal) -> bool:
    with state.session_factory() as session:
        version = state.settings.terms_version
        return acceptance.accepted_at(session, principal.account_id, version) is None


#: An org id as the console's pages take it from `?org=` (it goes into API paths).
_ORG_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _org_param(request: Request) -> str:
    """The `?org=` a page was opened with (the operators' holds page), when it is an id."""
    value = request.query_params.get("org", "")
    return value if _ORG_ID.fullmatch(value) else ""


def _page_handler(page: Page) -> Callable[[Request], Response]:
    def handler(request: Request) -> Response:
        principal = _principal(request)
        if principal is None:
            target = f"{SIGN_IN_PATH}?next={quote(page.path, safe='/')}"
            return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        state: AppState = request.app.state.onetoken
        # The API answers 403 terms_not_accepted to this session until the person accepts
        # the current terms on behalf of the org (docs/terms.md): ask first.
        if _terms_pending(state, principal):
            target = f"{TERMS_PATH}?next={quote(page.path, safe='/')}"
            return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        perms = held(principal.role, principal.is_operator,
                     tenant_money_admin=state.settings.tenant_money_admin)
        nav = [p for p in PAGES if p.permission in perms and p.listed]
        context: dict[str, Any] = {
            "page": page,
            "nav": nav,
            "perms": set(perms),
            "me": principal,
            "settings": state.settings,
            "event_kinds": EVENT_KINDS,
            "ticket_categories": get_args(Category),
            "ticket_statuses": get_args(Status),
            "incident_statuses": get_args(IncidentStatus),
            "incident_resolutions": get_args(IncidentResolution),
            "note_max_chars": NOTE_MAX_CHARS,
            "settlement_periods": get_args(Settlement),
            "org_param": _org_param(request),
        }
        if page.permission not in perms:
            return _html("denied.html", status=403, **context)
        return _html(page.template, **context)

    handler.__name__ = "console_" + (page.path.strip("/").replace("/", "_") or "overview")
    return handler


def _sign_in(request: Request) -> Response:
    # A refused sign-in through the identity provider comes back here with its reason;
    # only the fixed message of a known reason is shown, never what the URL carries.
    reason = request.query_params.get("sso_error", "")
    return _html("signin.html", page=Page(SIGN_IN_PATH, "Sign in", "", "signin.html"),
                 sso_error=sso.MESSAGES.get(reason, "The sign-in was refused." if reason else ""))


def _token_page(path: str, title: str, template: str) -> Callable[[Request], Response]:
    """A public page that sets a password with the one-time token of its link."""

    def handler(request: Request) -> Response:
        token = request.query_params.get("token", "")[:256]
        return _html(template, page=Page(path, title, "", template), token=token)

    handler.__name__ = "console_" + path.strip("/").replace("-", "_")
    return handler


def _terms(request: Request) -> Response:
    """The current terms of service, to accept on behalf of the org (any signed-in
    person; the acceptance itself goes through the API)."""
    principal = _principal(request)
    if principal is None:
        target = f"{SIGN_IN_PATH}?next={quote(TERMS_PATH, safe='/')}"
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    state: AppState = request.app.state.onetoken
    with state.session_factory() as session:
        terms = acceptance.status(session, principal.account_id, state.settings.terms_version,
                                  state.settings.terms_url)
    return _html("terms.html", page=Page(TERMS_PATH, "Terms of service", "", "terms.html"),
                 me=principal, terms=terms)


def _plotly(_: Request) -> Response:
    return FileResponse(plotly_js(), media_type="text/javascript",
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "public, max-age=86400"})


def install(app: FastAPI) -> None:
    """Add the pages and their assets: plain routes, outside the API and its schema
    (docs/permissions.md lists API endpoints; these pages only call them)."""
    # Declared before the static mount, which would otherwise answer for it.
    app.add_route(f"{STATIC_URL}/plotly.min.js", _plotly, methods=["GET"],
                  include_in_schema=False)
    app.mount(STATIC_URL, _Assets(directory=_package_dir("static")), name="console-static")
    app.add_route(SIGN_IN_PATH, _sign_in, methods=["GET"], include_in_schema=False)
    app.add_route(TERMS_PATH, _terms, methods=["GET"], include_in_schema=False)
    for path, title, template in (
        (INVITE_PATH, "Accept your invitation", "accept-invite.html"),
        (RESET_PATH, "Reset your password", "reset-password.html"),
    ):
        app.add_route(path, _token_page(path, title, template), methods=["GET"],
                      include_in_schema=False)
    for page in PAGES:
        app.add_route(page.path, _page_handler(page), methods=["GET"], include_in_schema=False)
