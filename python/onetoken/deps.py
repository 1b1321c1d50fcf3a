"""Application state and FastAPI dependencies shared by every domain router."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from onetoken.db.session import SessionFactory
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Forbidden, Unauthorized
from onetoken.settings import Settings

if TYPE_CHECKING:
    from onetoken.gateway.snapshot import SnapshotSource
    from onetoken.gateway.supervisor import ControlRuntime


@dataclass
class AppState:
    settings: Settings
    secrets: Secrets
    db_engine: Engine
    session_factory: SessionFactory
    # Ingestion and upkeep of a serving control process; None in tools and tests.
    runtime: ControlRuntime | None
    # What gateways poll over the gateway channel (onetoken.gateway.router).
    snapshots: SnapshotSource
    # The gateway channel's bearer token (kit.channel.GATEWAY).
    gateway_token: str

    def config_changed(self) -> None:
        """Called after a change that gateways must see has been committed (it bumped the
        config revision with it): answers the gateways' waiting snapshot polls now."""
        self.snapshots.changed()


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: str
    org_id: str
    role: str
    email: str
    # Platform staff (accounts.is_operator): hold the operator permissions in
    # onetoken.security.permissions across every org.
    is_operator: bool = False
    source_ip: str = ""
    user_agent: str = ""
    session_id: str = ""
    # Audit events the request already recorded (so the generic one is not added).
    audit_marks: list[str] = field(default_factory=list, compare=False)


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
    from onetoken.orgs import auth
    from onetoken.security.net import client_ip

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
    return replace(
        principal,
        source_ip=client_ip(request, state.settings),
        user_agent=request.headers.get("user-agent", "")[:256],
    )
