"""Application state and FastAPI dependencies shared by every domain router."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    from onetoken.gateway.supervisor import GatewaySupervisor

log = logging.getLogger("onetoken.deps")


@dataclass
class AppState:
    settings: Settings
    secrets: Secrets
    db_engine: Engine
    session_factory: SessionFactory
    runtime: GatewaySupervisor | None

    def config_changed(self) -> None:
        """Push a fresh snapshot now; called after a change has been committed.

        The change is already committed, so a failed push is logged, not raised: the
        revision watcher retries it within a second."""
        if self.runtime is None:
            return
        try:
            self.runtime.push_snapshot()
        except Exception as exc:
            log.error("snapshot.push_failed", extra={"exc_type": type(exc).__name__})


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: str
    org_id: str
    role: str
    email: str


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
    state: StateDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    from onetoken.orgs import service as orgs_service

    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Missing bearer token.")
    principal = orgs_service.resolve_session(session, state.secrets, credentials.credentials)
    if principal is None:
        raise Unauthorized("Invalid or expired token.")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]

WRITE_ROLES = frozenset({"owner", "admin"})
BILLING_ROLES = frozenset({"owner", "admin", "billing"})


def require_roles(roles: frozenset[str]) -> Callable[[Principal], Principal]:
    def check(principal: PrincipalDep) -> Principal:
        if principal.role not in roles:
            raise Forbidden("Your role does not allow this action.")
        return principal

    return check


WriterDep = Annotated[Principal, Depends(require_roles(WRITE_ROLES))]
BillingWriterDep = Annotated[Principal, Depends(require_roles(BILLING_ROLES))]
