"""FastAPI dependencies shared by every route: the state, a DB session, the signed-in
Principal, and `require(permission)`, which admits holders of a permission of the matrix
(onetoken.security.permissions) and audits unsafe requests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import cache
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from onetoken.kit.errors import Forbidden, NotFound, OnetokenError, Unauthorized
from onetoken.orgs import acceptance, auth, restriction
from onetoken.orgs.models import Account
from onetoken.security import audit
from onetoken.security.net import client_ip
from onetoken.security.permissions import (
    PERMISSIONS,
    ROLE_DENIED_MESSAGE,
    UNSAFE_METHODS,
    holds,
)
from onetoken.security.principal import Principal
from onetoken.state import AppState


class ServiceUnavailable(OnetokenError):
    """503: the endpoint reads what only a serving control process has open (ClickHouse,
    through its ingestion), and this process serves none."""

    status_code = 503
    type = "service_unavailable"
    code = "call_log_unavailable"


def call_log_sink(state: AppState) -> Any:
    """The running server's ClickHouse reader: chDB lets one process open its path, so the
    control API and the ops channel (onetoken.ops) read through the server's own client."""
    sink = getattr(state.runtime, "sink", None)
    if sink is None:
        raise ServiceUnavailable("Call metadata is served by a running gateway.")
    return sink


def get_state(request: Request) -> AppState:
    state = request.app.state.onetoken
    assert isinstance(state, AppState)
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="Token from POST /api/v1/auth/login")


def get_principal(
    request: Request,
    state: StateDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The signed-in account: a bearer token (API), or the console's session cookie, which
    must come with its CSRF token on unsafe methods (double submit, bound to the session)."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        token = credentials.credentials
    else:
        token = request.cookies.get(auth.SESSION_COOKIE, "")
        if not token:
            raise Unauthorized("Missing bearer token.")
        if request.method not in ("GET", "HEAD", "OPTIONS") and not auth.csrf_ok(
            state.secrets, token, request
        ):
            raise Forbidden("Missing or invalid CSRF token.", code="csrf_failed")
    principal = auth.resolve_session(session, state.secrets, token)
    if principal is None:
        raise Unauthorized("Invalid or expired token.")
    # What the request's records keep of its client: restricted when the account or its
    # org asked (policy XIII.4); the clear values live only in this request.
    client = restriction.client(
        session, state.secrets, principal.account_id,
        client_ip(request, state.settings), request.headers.get("user-agent", "")[:256],
    )
    return replace(principal, source_ip=client.source_ip, user_agent=client.user_agent)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def own_account(session: Session, principal: Principal) -> Account:
    """The signed-in account's row (404 when it is gone since the session was made)."""
    account = session.get(Account, principal.account_id)
    if account is None:
        raise NotFound("Account not found.")
    return account


@cache
def require(name: str) -> Callable[..., Iterator[Principal]]:
    """The dependency that admits holders of permission `name` and yields the Principal.

    Unsafe methods are audited into the security log when they finish (who, which
    endpoint, outcome), unless the service recorded a more precise audit event."""
    permission = PERMISSIONS[name]

    def dependency(
        request: Request, principal: PrincipalDep, session: SessionDep
    ) -> Iterator[Principal]:
        settings = get_state(request).settings
        if not permission.before_terms:
            # Before the role: until the terms are accepted nothing else is open, and the
            # answer says which version to accept.
            acceptance.check_accepted(session, principal.account_id, settings.terms_version)
        tenant_money_admin = settings.tenant_money_admin
        if not holds(
            permission, principal.role, principal.is_operator,
            tenant_money_admin=tenant_money_admin,
        ):
            audit.access_denied(request, principal, permission.name)
            raise Forbidden(ROLE_DENIED_MESSAGE)
        if request.method not in UNSAFE_METHODS:
            yield principal
            return
        try:
            yield principal
        except OnetokenError as exc:
            audit.request_done(request, principal, outcome="refused", error_code=exc.code)
            raise
        except Exception:
            audit.request_done(request, principal, outcome="failed", error_code="internal_error")
            raise
        audit.request_done(request, principal, outcome="ok", error_code="")

    dependency.__name__ = f"require_{name.replace('.', '_')}"
    dependency.onetoken_permission = permission  # type: ignore[attr-defined]
    return dependency


# One dependency per permission of the matrix (onetoken.security.permissions): a route
# names the permission it needs in its signature, e.g. `principal: KeysWriteDep`.
# Any signed-in account, the terms of service accepted or not (own profile, the terms,
# sign out, export and cancel).
SignedInDep = Annotated[Principal, Depends(require("session"))]
SelfDep = Annotated[Principal, Depends(require("self"))]
OrgReadDep = Annotated[Principal, Depends(require("org.read"))]
OrgWriteDep = Annotated[Principal, Depends(require("org.write"))]
OrgsManageDep = Annotated[Principal, Depends(require("orgs.manage"))]
TermsWriteDep = Annotated[Principal, Depends(require("terms.write"))]
PoolsManageDep = Annotated[Principal, Depends(require("pools.manage"))]
HoldsManageDep = Annotated[Principal, Depends(require("holds.manage"))]
MembersReadDep = Annotated[Principal, Depends(require("members.read"))]
MembersWriteDep = Annotated[Principal, Depends(require("members.write"))]
KeysReadDep = Annotated[Principal, Depends(require("keys.read"))]
KeysWriteDep = Annotated[Principal, Depends(require("keys.write"))]
AppsReadDep = Annotated[Principal, Depends(require("applications.read"))]
AppsWriteDep = Annotated[Principal, Depends(require("applications.write"))]
ProvidersReadDep = Annotated[Principal, Depends(require("providers.read"))]
ProvidersWriteDep = Annotated[Principal, Depends(require("providers.write"))]
ModelsReadDep = Annotated[Principal, Depends(require("models.read"))]
ModelsWriteDep = Annotated[Principal, Depends(require("models.write"))]
BillingReadDep = Annotated[Principal, Depends(require("billing.read"))]
BillingWriteDep = Annotated[Principal, Depends(require("billing.write"))]
# Moving the platform's money: operators (owners too where ONETOKEN_TENANT_MONEY_ADMIN=true).
BillingMoneyDep = Annotated[Principal, Depends(require("billing.money"))]
CallsReadDep = Annotated[Principal, Depends(require("calls.read"))]
UsageReadDep = Annotated[Principal, Depends(require("usage.read"))]
AnalyticsSqlDep = Annotated[Principal, Depends(require("analytics.sql"))]
SecurityReadDep = Annotated[Principal, Depends(require("security.read"))]
SecurityBlockDep = Annotated[Principal, Depends(require("security.block"))]
SecurityHandleDep = Annotated[Principal, Depends(require("security.handle"))]
SiemWriteDep = Annotated[Principal, Depends(require("siem.write"))]
WebhooksReadDep = Annotated[Principal, Depends(require("webhooks.read"))]
WebhooksWriteDep = Annotated[Principal, Depends(require("webhooks.write"))]
TicketsReadDep = Annotated[Principal, Depends(require("tickets.read"))]
TicketsWriteDep = Annotated[Principal, Depends(require("tickets.write"))]
TicketsStaffDep = Annotated[Principal, Depends(require("tickets.staff"))]


def public() -> None:
    """Marks an endpoint that needs no session (login, health)."""


public.onetoken_public = True  # type: ignore[attr-defined]

PublicDep = Depends(public)
