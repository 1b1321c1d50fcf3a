from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from onetoken.deps import PrincipalDep, SessionDep, StateDep
from onetoken.kit.errors import NotFound
from onetoken.orgs import service
from onetoken.orgs.schemas import LoginRequest, MeResponse, OrgResponse, TokenResponse

router = APIRouter(tags=["orgs"])
_bearer = HTTPBearer(auto_error=False)


@router.post("/auth/login", response_model=TokenResponse)
def login(body: LoginRequest, session: SessionDep, state: StateDep) -> TokenResponse:
    token, record = service.login(
        session,
        state.secrets,
        body.email,
        body.password,
        timedelta(hours=state.settings.session_ttl_hours),
    )
    return TokenResponse(access_token=token, expires_at=record.expires_at)


@router.post("/auth/logout", status_code=204)
def logout(
    _: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Response:
    if credentials is not None:
        service.logout(session, state.secrets, credentials.credentials)
    return Response(status_code=204)


@router.get("/me", response_model=MeResponse)
def me(principal: PrincipalDep) -> MeResponse:
    return MeResponse(
        id=principal.account_id,
        email=principal.email,
        role=principal.role,  # type: ignore[arg-type]
        org_id=principal.org_id,
    )


@router.get("/org", response_model=OrgResponse)
def get_own_org(principal: PrincipalDep, session: SessionDep) -> OrgResponse:
    return OrgResponse.model_validate(service.get_org(session, principal.org_id))


@router.get("/orgs/{org_id}", response_model=OrgResponse)
def get_org(org_id: str, principal: PrincipalDep, session: SessionDep) -> OrgResponse:
    # Another org's id answers exactly like an unknown one.
    if org_id != principal.org_id:
        raise NotFound("Organization not found.")
    return OrgResponse.model_validate(service.get_org(session, org_id))
