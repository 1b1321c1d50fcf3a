"""Sign-in through an org's identity provider (OpenID Connect, docs/sso.md): the org's
configuration (admins), the start of a sign-in and the provider's callback (public)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from onetoken.kit.errors import BadRequest
from onetoken.orgs import auth, service
from onetoken.orgs.models import OrgSso
from onetoken.security import audit
from onetoken.security.log import SecurityEvent, record
from onetoken.security.net import client_ip
from onetoken.sso import service as sso
from onetoken.sso.schemas import SsoConfigIn, SsoConfigResponse, SsoStartRequest, SsoStartResponse
from onetoken.state import AppState
from onetoken.web.console import SECURITY_HEADERS, SIGN_IN_PATH
from onetoken.web.deps import OrgWriteDep, PublicDep, SessionDep, StateDep

router = APIRouter(tags=["sso"])

#: Binds a started sign-in to the browser that started it. SameSite=Lax: the provider
#: sends the browser back with a top-level GET from its own site.
FLOW_COOKIE = "ot_sso"
_FLOW_COOKIE_PATH = "/api/v1/auth/sso"
# Reasons that point at a forged or replayed answer rather than a person's situation.
_SUSPICIOUS = frozenset({
    "state_mismatch", "bad_signature", "nonce_mismatch", "wrong_issuer", "wrong_audience",
    "wrong_authorized_party", "algorithm_not_allowed", "invalid_state",
})


def _response(config: OrgSso, state: AppState) -> SsoConfigResponse:
    return SsoConfigResponse(
        org_id=config.org_id,
        enabled=config.enabled,
        issuer=config.issuer,
        client_id=config.client_id,
        client_secret_set=True,
        allowed_domains=sso.domains(config),
        group_claim=config.group_claim,
        role_map=config.role_map,  # type: ignore[arg-type]
        passwords_allowed=config.passwords_allowed,
        redirect_uri=sso.redirect_uri(state.settings),
        created_at=config.created_at,
        updated_at=config.updated_at,
    )


@router.get("/sso", response_model=SsoConfigResponse)
def get_sso(
    principal: OrgWriteDep,
    session: SessionDep,
    state: StateDep,
    org_id: Annotated[str | None, Query(max_length=32)] = None,
) -> SsoConfigResponse:
    """The org's identity provider (`configured` false when none, with the redirect URI to
    register); operators may name another org with `org_id`. The client secret is never
    returned."""
    target = service.target_org(session, principal, org_id)
    config = sso.get_config(session, target)
    if config is None:
        return SsoConfigResponse(
            configured=False, org_id=target, redirect_uri=sso.redirect_uri(state.settings)
        )
    return _response(config, state)


@router.put("/sso", response_model=SsoConfigResponse)
def put_sso(
    body: SsoConfigIn,
    principal: OrgWriteDep,
    session: SessionDep,
    state: StateDep,
    org_id: Annotated[str | None, Query(max_length=32)] = None,
) -> SsoConfigResponse:
    """Set the org's identity provider. The issuer must answer discovery from a public
    address (or one the operator allowed); only owners map a group to `owner`. With
    `passwords_allowed: false` the org's members sign in through the provider only.
    Operators may name another org with `org_id` (the break-glass path: docs/sso.md)."""
    target = service.target_org(session, principal, org_id)
    config = sso.save_config(
        session, state.secrets, state.settings, principal, target,
        sso.Config(
            issuer=body.issuer,
            client_id=body.client_id,
            client_secret=body.client_secret.get_secret_value() if body.client_secret else None,
            allowed_domains=list(body.allowed_domains),
            group_claim=body.group_claim,
            role_map=[m.model_dump() for m in body.role_map],
            passwords_allowed=body.passwords_allowed,
            enabled=body.enabled,
        ),
    )
    session.commit()
    return _response(config, state)


@router.delete("/sso", status_code=204)
def delete_sso(
    principal: OrgWriteDep,
    session: SessionDep,
    org_id: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    """Remove the org's identity provider: its members sign in with passwords again
    (accounts it created set theirs with a password reset)."""
    sso.delete_config(session, principal, service.target_org(session, principal, org_id))
    session.commit()
    return Response(status_code=204)


# -- the sign-in ----------------------------------------------------------------------------


def _refused(request: Request, state: AppState, exc: sso.SsoRefused, stage: str) -> None:
    record(SecurityEvent(
        kind="auth.sso_refused",
        severity="high" if exc.reason in _SUSPICIOUS else "medium",
        org_id=exc.org_id,
        source_ip=client_ip(request, state.settings),
        user_agent=request.headers.get("user-agent", "")[:256],
        detail={"reason": exc.reason, "stage": stage},
    ))


@router.post("/auth/sso/start", response_model=SsoStartResponse, dependencies=[PublicDep])
def start_sso(
    body: SsoStartRequest, request: Request, response: Response, session: SessionDep,
    state: StateDep,
) -> SsoStartResponse:
    """Start signing in through the identity provider of the org named, or of the org
    whose allowed domains hold the e-mail address: answers the provider's authorization
    URL (code flow with PKCE) and sets a short-lived cookie binding the sign-in to this
    browser. At most `ONETOKEN_SSO_START_MAX_PER_ADDRESS` starts per address in ten
    minutes (429 `sso_start_limited` with Retry-After beyond)."""
    sso.limit_start(session, state.secrets, state.settings, client_ip(request, state.settings),
                    request.headers.get("user-agent", "")[:256])
    config = sso.find_org(session, email=body.email or "", org_id=body.org_id or "")
    try:
        started = sso.start(session, state.secrets, state.settings, config,
                            login_hint=body.email or "")
    except sso.SsoRefused as exc:
        _refused(request, state, exc, "start")
        # 400: the request is fine, the provider's side is not (a business refusal).
        raise BadRequest(exc.message, code=f"sso_{exc.reason}") from None
    session.commit()
    response.set_cookie(FLOW_COOKIE, started.browser_token,
                        max_age=int(sso.FLOW_TTL.total_seconds()), path=_FLOW_COOKIE_PATH,
                        secure=True, httponly=True, samesite="lax")
    return SsoStartResponse(authorize_url=started.authorize_url, org_id=started.org_id)


class _Actor:
    def __init__(self, account_id: str, org_id: str, source_ip: str, user_agent: str) -> None:
        self.account_id = account_id
        self.org_id = org_id
        self.source_ip = source_ip
        self.user_agent = user_agent
        self.audit_marks: list[str] = []


@router.get(
    "/auth/sso/callback",
    dependencies=[PublicDep],
    responses={
        200: {"description": "Signed in: a page that moves on to the console.",
              "content": {"text/html": {"schema": {"type": "string"}}}},
        303: {"description": "Refused: back to the sign-in page, which says why "
                             "(`sso_error`)."},
    },
)
def sso_callback(
    request: Request,
    session: SessionDep,
    state: StateDep,
    code: Annotated[str, Query(max_length=2048)] = "",
    state_param: Annotated[str, Query(alias="state", max_length=256)] = "",
    error: Annotated[str, Query(max_length=256)] = "",
) -> Response:
    """Where the identity provider sends the browser back. On success the console session
    starts (cookies as POST /auth/session sets them) and the page moves on to the console;
    otherwise the browser goes back to the sign-in page with the reason."""
    source_ip = client_ip(request, state.settings)
    user_agent = request.headers.get("user-agent", "")[:256]
    try:
        done = sso.finish(
            session, state.secrets, state.settings, state=state_param, code=code, error=error,
            browser_token=request.cookies.get(FLOW_COOKIE, ""),
        )
    except sso.SsoRefused as exc:
        session.rollback()
        _refused(request, state, exc, "callback")
        back = RedirectResponse(f"{SIGN_IN_PATH}?sso_error={quote(exc.reason)}",
                                status_code=303, headers=SECURITY_HEADERS)
        back.delete_cookie(FLOW_COOKIE, path=_FLOW_COOKIE_PATH, secure=True, httponly=True,
                           samesite="lax")
        return back
    account = done.account
    token, _ = auth.issue_session(
        session, state.secrets, account, timedelta(hours=state.settings.session_ttl_hours),
        method="sso",
    )
    session.commit()
    actor = _Actor(account.id, account.org_id, source_ip, user_agent)
    audit.event(actor, "auth.sso_login", "info", subject_id=account.id,
                detail={"created": done.created, "role": account.role})
    if done.created:
        audit.event(actor, "admin.account_created", "medium", subject_id=account.id,
                    detail={"role": account.role, "auth_status": "sso"})
    if done.role_before is not None:
        audit.change(actor, "admin.role_changed", subject_id=account.id, severity="high",
                     before={"role": done.role_before}, after={"role": account.role},
                     extra={"by": "identity_provider"})
    return _signed_in(state, token)


def _signed_in(state: AppState, token: str) -> Response:
    # A page of this site moves on to the console, rather than a redirect: the browser
    # arrived from the provider's site, and SameSite=Strict cookies are not sent on the
    # rest of a navigation that started elsewhere.
    page = HTMLResponse(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="0;url=/"><title>Signed in</title></head>'
        '<body><p>Signed in. <a href="/">Continue to the console</a>.</p></body></html>',
        headers=SECURITY_HEADERS,
    )
    max_age = state.settings.session_ttl_hours * 3600
    page.set_cookie(auth.SESSION_COOKIE, token, max_age=max_age, path="/", secure=True,
                    httponly=True, samesite="strict")
    page.set_cookie(auth.CSRF_COOKIE, auth.csrf_token(state.secrets, token), max_age=max_age,
                    path="/", secure=True, httponly=False, samesite="strict")
    page.delete_cookie(FLOW_COOKIE, path=_FLOW_COOKIE_PATH, secure=True, httponly=True,
                       samesite="lax")
    return page
