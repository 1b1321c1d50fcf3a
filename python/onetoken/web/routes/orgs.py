"""Sign-in, own account, organizations and their accounts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Conflict, NotFound
from onetoken.mail import notices
from onetoken.orgs import acceptance, auth, members, reset, restriction, service
from onetoken.orgs.models import Account, AdminSession
from onetoken.orgs.schemas import (
    AccountCreate,
    AccountCreated,
    AccountList,
    AccountResponse,
    AccountUpdate,
    ConsoleSessionResponse,
    InviteAccept,
    LoginRequest,
    MeResponse,
    MeUpdate,
    OrgAdminUpdate,
    OrgCreate,
    OrgCreated,
    OrgList,
    OrgResponse,
    OrgUpdate,
    PasswordChange,
    PasswordReset,
    PasswordResetRequest,
    PasswordResetRequested,
    PermissionsResponse,
    RestrictionResponse,
    RestrictionUpdate,
    TermsAccept,
    TermsAcceptanceList,
    TermsAcceptanceResponse,
    TermsResponse,
    TokenResponse,
    TotpCodeBody,
    TotpDisableRequest,
    TotpEnrolment,
    TotpEnrolRequest,
)
from onetoken.security import audit
from onetoken.security.login_guard import LoginGuard
from onetoken.security.net import client_ip
from onetoken.security.permissions import held
from onetoken.security.principal import Principal
from onetoken.state import AppState
from onetoken.web.deps import (
    MembersReadDep,
    MembersWriteDep,
    OrgReadDep,
    OrgsManageDep,
    OrgWriteDep,
    PrincipalDep,
    PublicDep,
    SelfDep,
    SessionDep,
    SignedInDep,
    StateDep,
    own_account,
)

router = APIRouter(tags=["accounts"])
_bearer = HTTPBearer(auto_error=False)



def _sign_in(
    request: Request, body: LoginRequest, state: AppState, session: SessionDep
) -> tuple[str, AdminSession, Account]:
    creds = auth.Credentials(
        identifier=body.identifier,
        password=body.password.get_secret_value(),
        totp_code=body.totp_code,
        source_ip=client_ip(request, state.settings),
        user_agent=request.headers.get("user-agent", "")[:256],
    )
    account = auth.authenticate(session, state.secrets, auth.login_guard(request, state), creds)
    break_glass = auth.break_glass(session, account)
    token, record = auth.issue_session(
        session, state.secrets, account, timedelta(hours=state.settings.session_ttl_hours)
    )
    session.commit()
    client = restriction.client(
        session, state.secrets, account.id, creds.source_ip, creds.user_agent
    )
    audit.event(
        _RequestActor(account, client.source_ip, client.user_agent),
        "auth.login",
        "info",
        subject_id=account.id,
        detail={"second_factor": account.auth_status == "totp"},
    )
    if break_glass:
        # An operator's password while the org's members must use its identity provider
        # (docs/sso.md, "Break-glass"): allowed, and for everyone watching the log to see.
        audit.event(_RequestActor(account, creds.source_ip, creds.user_agent),
                    "auth.break_glass_login", "high", subject_id=account.id)
    return token, record, account


class _RequestActor:
    def __init__(self, account: Account, source_ip: str, user_agent: str) -> None:
        self.account_id = account.id
        self.org_id = account.org_id
        self.source_ip = source_ip
        self.user_agent = user_agent
        self.audit_marks: list[str] = []


@router.post("/auth/login", response_model=TokenResponse, dependencies=[PublicDep])
def login(
    body: LoginRequest, request: Request, session: SessionDep, state: StateDep
) -> TokenResponse:
    """A bearer token for the admin API."""
    token, record, account = _sign_in(request, body, state, session)
    return TokenResponse(access_token=token, expires_at=record.expires_at,
                         terms_pending=_terms_pending(session, state, account))


def _terms_pending(session: Session, state: AppState, account: Account) -> str | None:
    version = state.settings.terms_version
    return version if acceptance.accepted_at(session, account.id, version) is None else None


@router.post("/auth/session", response_model=ConsoleSessionResponse, dependencies=[PublicDep])
def console_login(
    body: LoginRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    state: StateDep,
) -> ConsoleSessionResponse:
    """A console session: Secure, HttpOnly, SameSite=Strict cookie, plus a CSRF token
    (also set as a readable cookie) to send back in X-CSRF-Token on unsafe requests."""
    token, record, account = _sign_in(request, body, state, session)
    csrf = auth.csrf_token(state.secrets, token)
    max_age = state.settings.session_ttl_hours * 3600
    # Path "/": the console's pages (onetoken.web.console) read the session too.
    response.set_cookie(auth.SESSION_COOKIE, token, max_age=max_age, path="/",
                        secure=True, httponly=True, samesite="strict")
    response.set_cookie(auth.CSRF_COOKIE, csrf, max_age=max_age, path="/",
                        secure=True, httponly=False, samesite="strict")
    return ConsoleSessionResponse(csrf_token=csrf, expires_at=record.expires_at,
                                  terms_pending=_terms_pending(session, state, account))


@router.post("/auth/logout", status_code=204)
def logout(
    principal: SignedInDep,
    request: Request,
    session: SessionDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Response:
    token = credentials.credentials if credentials is not None else request.cookies.get(
        auth.SESSION_COOKIE, ""
    )
    if token:
        auth.logout(session, state.secrets, token)
    audit.event(principal, "auth.logout", "info", subject_id=principal.account_id)
    response = Response(status_code=204)
    response.delete_cookie(auth.SESSION_COOKIE, path="/", secure=True, httponly=True,
                           samesite="strict")
    response.delete_cookie(auth.CSRF_COOKIE, path="/", secure=True, samesite="strict")
    return response


@router.post("/auth/accept-invite", response_model=AccountResponse, dependencies=[PublicDep])
def accept_invite(body: InviteAccept, session: SessionDep, state: StateDep) -> AccountResponse:
    """Set the password of an invited account with its one-time invite token."""
    account = auth.accept_invite(
        session, state.secrets, body.token.get_secret_value(), body.password.get_secret_value()
    )
    session.commit()
    audit.event(_RequestActor(account, "", ""), "auth.invite_accepted", "info",
                subject_id=account.id)
    return AccountResponse.model_validate(account)


_RESET_ANSWER = "If the address belongs to an account, a password reset link is on its way."


@router.post("/auth/password-reset/request", response_model=PasswordResetRequested,
             status_code=202, dependencies=[PublicDep])
def request_password_reset(
    body: PasswordResetRequest, session: SessionDep, state: StateDep
) -> PasswordResetRequested:
    """Send a password reset link to the address, if it belongs to an active account
    (at most ONETOKEN_PASSWORD_RESET_MAX_PER_HOUR a hour). The answer is the same in
    every case, and so is its timing: the message is sent in the background."""
    settings = state.settings
    if settings.smtp_url is not None:
        issued = reset.request(
            session, state.secrets, body.email,
            ttl=timedelta(minutes=settings.password_reset_ttl_minutes),
            max_per_hour=settings.password_reset_max_per_hour,
        )
        if issued is not None:
            account, token = issued
            notices.password_reset(session, state.secrets, settings, account, token,
                                   settings.password_reset_ttl_minutes)
            session.commit()
            audit.event(_RequestActor(account, "", ""), "auth.password_reset_requested",
                        "medium", subject_id=account.id)
            _wake_mail()
    return PasswordResetRequested(detail=_RESET_ANSWER)


@router.post("/auth/password-reset", status_code=204, dependencies=[PublicDep])
def password_reset(body: PasswordReset, session: SessionDep, state: StateDep) -> Response:
    """Set a new password with the token of a reset link: once, before it expires. Every
    session of the account ends."""
    account = reset.reset(
        session, state.secrets, body.token.get_secret_value(), body.password.get_secret_value()
    )
    session.commit()
    audit.event(_RequestActor(account, "", ""), "auth.password_reset", "high",
                subject_id=account.id)
    return Response(status_code=204)


def _wake_mail() -> None:
    from onetoken import mail

    worker = mail.current()
    if worker is not None:
        worker.wake()


def _invite_by_mail(
    session: Session, state: AppState, account: Account, token: str | None
) -> None:
    """With SMTP configured, an invited account with an address gets its link by e-mail
    (the inviter still sees the token once)."""
    if token is None or state.settings.smtp_url is None or account.invite_expires_at is None:
        return
    notices.invitation(session, state.secrets, state.settings, account, token,
                       account.invite_expires_at)


# -- own account ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnSignIn:
    """What onetoken.orgs.auth needs to change the caller's own sign-in (password, second
    factor): a wrong current password there counts towards the sign-in lockout (the
    guard) like a failed sign-in."""

    session: Session
    secrets: Secrets
    guard: LoginGuard
    principal: Principal
    account: Account

    def args(self) -> tuple[Session, Secrets, LoginGuard, Principal, Account]:
        return self.session, self.secrets, self.guard, self.principal, self.account


def own_sign_in(
    request: Request, principal: PrincipalDep, session: SessionDep, state: StateDep
) -> OwnSignIn:
    # The signed-in principal as get_principal made it (the route's own `self` permission
    # check reaches the same one), so the route declares its permission once.
    guard = auth.login_guard(request, state)
    return OwnSignIn(session, state.secrets, guard, principal, own_account(session, principal))


OwnSignInDep = Annotated[OwnSignIn, Depends(own_sign_in)]


def _me_response(account: Account) -> MeResponse:
    return MeResponse(
        id=account.id,
        email=account.email or "",
        role=account.role,  # type: ignore[arg-type]
        org_id=account.org_id,
        login_name=account.login_name,
        mobile=account.mobile,
        display_name=account.display_name,
        auth_status=account.auth_status,  # type: ignore[arg-type]
        is_operator=account.is_operator,
        restriction=account.restriction,  # type: ignore[arg-type]
    )


@router.get("/me", response_model=MeResponse)
def me(principal: SignedInDep, session: SessionDep) -> MeResponse:
    return _me_response(own_account(session, principal))


@router.get("/me/permissions", response_model=PermissionsResponse)
def my_permissions(principal: SelfDep, state: StateDep) -> PermissionsResponse:
    """What the caller may do: the console shows only these pages and actions (each
    request is still checked against the matrix)."""
    return PermissionsResponse(
        role=principal.role,  # type: ignore[arg-type]
        is_operator=principal.is_operator,
        permissions=held(principal.role, principal.is_operator,
                         tenant_money_admin=state.settings.tenant_money_admin),
    )


@router.get("/me/terms", response_model=TermsResponse)
def my_terms(principal: SignedInDep, session: SessionDep, state: StateDep) -> TermsResponse:
    """The current terms of service and whether the caller accepted them. Until they do,
    every other call of their session answers 403 `terms_not_accepted`."""
    settings = state.settings
    return TermsResponse.model_validate(
        acceptance.status(session, principal.account_id, settings.terms_version,
                          settings.terms_url)
    )


@router.post("/me/terms/accept", response_model=TermsResponse)
def accept_terms(
    body: TermsAccept, principal: SignedInDep, session: SessionDep, state: StateDep
) -> TermsResponse:
    """Accept the current terms of service on behalf of the caller's organization
    (`version`: the one read). Recorded with the org, the time and the client address, and
    in the security log; accepting again changes nothing."""
    settings = state.settings
    record, new = acceptance.accept(
        session,
        own_account(session, principal),
        version=body.version,
        current=settings.terms_version,
        source_ip=principal.source_ip,
    )
    session.commit()
    if new:
        audit.event(principal, "account.terms_accepted", "info", subject_id=record.id,
                    org_id=record.org_id, detail={"version": record.version})
    return TermsResponse.model_validate(
        acceptance.status(session, principal.account_id, settings.terms_version,
                          settings.terms_url)
    )


@router.get("/terms/acceptances", response_model=TermsAcceptanceList)
def list_terms_acceptances(
    principal: MembersReadDep,
    session: SessionDep,
    org_id: Annotated[str | None, Query(max_length=32)] = None,
    version: Annotated[str | None, Query(max_length=32)] = None,
) -> TermsAcceptanceList:
    """Who in the org accepted which version of the terms of service, newest first (org
    admins; operators may name another org with `org_id`)."""
    target = service.target_org(session, principal, org_id)
    return TermsAcceptanceList(
        data=[
            TermsAcceptanceResponse.model_validate(a)
            for a in acceptance.list_for_org(session, target, version=version)
        ]
    )


@router.patch("/me", response_model=MeResponse)
def update_me(body: MeUpdate, principal: SelfDep, session: SessionDep) -> MeResponse:
    account = own_account(session, principal)
    before = members.snapshot(account)
    if body.display_name is not None:
        account.display_name = body.display_name
    session.commit()
    audit.change(principal, "account.profile_changed", subject_id=account.id, before=before,
                 after=members.snapshot(account), severity="info")
    return _me_response(account)


@router.post("/me/password", status_code=204)
def change_password(
    body: PasswordChange,
    principal: SelfDep,
    own: OwnSignInDep,
) -> Response:
    """Other sessions of the account end; this one stays. Wrong current passwords count
    towards the sign-in lockout (429 `login_locked` while it lasts)."""
    auth.change_password(
        *own.args(),
        body.current_password.get_secret_value(),
        body.new_password.get_secret_value(),
    )
    own.session.commit()
    audit.event(principal, "account.password_changed", "medium", subject_id=own.account.id)
    return Response(status_code=204)


@router.post("/me/totp", response_model=TotpEnrolment)
def totp_enrol(
    body: TotpEnrolRequest,
    principal: SelfDep,
    own: OwnSignInDep,
) -> TotpEnrolment:
    """Start enrolling a TOTP second factor (needs the current password); confirm with a
    code to turn it on."""
    secret, uri = auth.totp_enrol(*own.args(), body.current_password.get_secret_value())
    own.session.commit()
    audit.event(principal, "account.totp_enrolment_started", "info",
                subject_id=principal.account_id)
    return TotpEnrolment(secret=secret, otpauth_uri=uri)


@router.post("/me/totp/confirm", response_model=MeResponse)
def totp_confirm(
    body: TotpCodeBody,
    principal: SelfDep,
    own: OwnSignInDep,
) -> MeResponse:
    auth.totp_confirm(*own.args(), body.code)
    own.session.commit()
    audit.change(principal, "account.totp_enabled", subject_id=own.account.id,
                 before={"auth_status": "password"}, after={"auth_status": "totp"})
    return _me_response(own.account)


@router.post("/me/totp/disable", response_model=MeResponse)
def totp_disable(
    body: TotpDisableRequest,
    principal: SelfDep,
    own: OwnSignInDep,
) -> MeResponse:
    """Needs the current password and a current one-time code."""
    auth.totp_disable(
        *own.args(),
        current_password=body.current_password.get_secret_value(),
        code=body.code,
    )
    own.session.commit()
    audit.change(principal, "account.totp_disabled", subject_id=own.account.id,
                 before={"auth_status": "totp"}, after={"auth_status": "password"},
                 severity="high")
    return _me_response(own.account)


# -- restriction of processing (policy XIII.4) --------------------------------------------------


def _audit_restriction(
    session: Session, state: AppState, principal: Principal, kind: str, *,
    subject_id: str, org_id: str, before: str, after: str,
) -> None:
    """Who set or lifted it, and when (the security log's ts). The request that turns it
    on is recorded without the clear client values already."""
    actor = principal
    if restriction.restricted(session, principal.account_id):
        ip, ua = restriction.restricted_values(
            state.secrets, principal.source_ip, principal.user_agent
        )
        actor = replace(principal, source_ip=ip, user_agent=ua)
    audit.change(actor, kind, subject_id=subject_id, org_id=org_id,
                 before={"restriction": before}, after={"restriction": after}, severity="medium")


@router.get("/me/restriction", response_model=RestrictionResponse)
def get_my_restriction(principal: SelfDep, session: SessionDep) -> RestrictionResponse:
    account = own_account(session, principal)
    return RestrictionResponse(
        mode=account.restriction,  # type: ignore[arg-type]
        effective=restriction.effective(session, account.id),  # type: ignore[arg-type]
    )


@router.put("/me/restriction", response_model=RestrictionResponse)
def set_my_restriction(
    body: RestrictionUpdate, principal: SelfDep, session: SessionDep, state: StateDep
) -> RestrictionResponse:
    """Restriction of processing for the caller's own account: `restricted` records a
    keyed token of the client address and the User-Agent's product only, for the calls of
    the account's keys and its own requests here. The gateways serve the change before
    this answers (docs/retention.md); the choice is in the security log."""
    account = own_account(session, principal)
    before = restriction.set_account(session, state.secrets, account, body.mode)
    state.commit_change(session)
    _audit_restriction(session, state, principal, "account.restriction_changed",
                       subject_id=account.id, org_id=account.org_id, before=before,
                       after=body.mode)
    return get_my_restriction(principal, session)


@router.put("/orgs/{org_id}/restriction", response_model=OrgResponse)
def set_org_restriction(
    org_id: str, body: RestrictionUpdate, principal: OrgWriteDep, session: SessionDep,
    state: StateDep,
) -> OrgResponse:
    """Restriction of processing for the whole organization (its admins): every member's
    calls and requests, whatever their own setting (the stricter applies). Operators see
    it on the organization; they do not set it for the org."""
    if org_id != principal.org_id:
        raise NotFound("Organization not found.")
    org = service.get_org(session, org_id)
    before = restriction.set_org(session, state.secrets, org, body.mode)
    state.commit_change(session)
    _audit_restriction(session, state, principal, "org.restriction_changed",
                       subject_id=org.id, org_id=org.id, before=before, after=body.mode)
    return OrgResponse.model_validate(org)


# -- organizations ----------------------------------------------------------------------------


@router.get("/org", response_model=OrgResponse)
def get_own_org(principal: OrgReadDep, session: SessionDep) -> OrgResponse:
    return OrgResponse.model_validate(service.get_org(session, principal.org_id))


@router.patch("/org", response_model=OrgResponse)
def update_own_org(body: OrgUpdate, principal: OrgWriteDep, session: SessionDep) -> OrgResponse:
    org = service.get_org(session, principal.org_id)
    before = {"name": org.name}
    if body.name is not None:
        org.name = body.name
    session.commit()
    audit.change(principal, "admin.org_changed", subject_id=org.id, before=before,
                 after={"name": org.name}, severity="info")
    return OrgResponse.model_validate(org)


@router.get("/orgs", response_model=OrgList)
def list_orgs(_: OrgsManageDep, session: SessionDep) -> OrgList:
    """Every organization (operators)."""
    return OrgList(data=[OrgResponse.model_validate(o) for o in service.list_orgs(session)])


@router.post("/orgs", response_model=OrgCreated, status_code=201)
def create_org(
    body: OrgCreate, principal: OrgsManageDep, session: SessionDep, state: StateDep
) -> OrgCreated:
    """A new organization and its first owner (invited unless a password is given)."""
    org = service.create_org(session, body.name)
    owner = body.owner.model_copy(update={"role": "owner"})
    account, token = members.create(
        session, state.secrets, principal, org.id,
        role="owner",
        login_name=owner.login_name,
        email=owner.email,
        mobile=owner.mobile,
        display_name=owner.display_name,
        password=owner.password.get_secret_value() if owner.password else None,
    )
    _invite_by_mail(session, state, account, token)
    state.commit_change(session)
    _wake_mail()
    audit.event(principal, "admin.org_created", "medium", subject_id=org.id, org_id=org.id)
    return OrgCreated(
        **OrgResponse.model_validate(org).model_dump(),
        owner=_created(account, token),
    )


@router.get("/orgs/{org_id}", response_model=OrgResponse)
def get_org(org_id: str, principal: OrgReadDep, session: SessionDep) -> OrgResponse:
    # Another org's id answers exactly like an unknown one (operators see every org).
    if org_id != principal.org_id and not principal.is_operator:
        raise NotFound("Organization not found.")
    return OrgResponse.model_validate(service.get_org(session, org_id))


@router.patch("/orgs/{org_id}", response_model=OrgResponse)
def update_org(
    org_id: str, body: OrgAdminUpdate, principal: OrgsManageDep, session: SessionDep,
    state: StateDep,
) -> OrgResponse:
    """Rename, disable or re-enable any organization (operators). A disabled org's keys
    are refused by the gateway within a second, its accounts are signed out at once and
    cannot sign in."""
    org = service.get_org(session, org_id)
    before = {"name": org.name, "status": org.status}
    if org.status == "terminated" and body.status is not None:
        # Its members are anonymized and its keys revoked: there is nothing to re-enable.
        raise Conflict("A terminated organization stays terminated.", code="org_terminated")
    if body.name is not None:
        org.name = body.name
    if body.status is not None and body.status != org.status:
        org.status = body.status
        from onetoken.db.session import bump_revision

        bump_revision(session)
        if org.status != "active":
            auth.end_org_sessions(session, org.id)
    state.commit_change(session)
    audit.change(principal, "admin.org_changed", subject_id=org.id, org_id=org.id,
                 before=before, after={"name": org.name, "status": org.status}, severity="high")
    return OrgResponse.model_validate(org)


# -- an org's accounts ------------------------------------------------------------------------


def _created(account: Account, token: str | None) -> AccountCreated:
    return AccountCreated(
        **AccountResponse.model_validate(account).model_dump(),
        invite_token=token,
        invite_expires_at=account.invite_expires_at if token else None,
    )


@router.get("/accounts", response_model=AccountList)
def list_accounts(
    principal: MembersReadDep,
    session: SessionDep,
    org_id: Annotated[str | None, Query(max_length=32)] = None,
) -> AccountList:
    """The org's accounts (operators may name another org with `org_id`)."""
    target = service.target_org(session, principal, org_id)
    return AccountList(
        data=[AccountResponse.model_validate(a) for a in members.list_accounts(session, target)]
    )


@router.post("/accounts", response_model=AccountCreated, status_code=201)
def create_account(
    body: AccountCreate, principal: MembersWriteDep, session: SessionDep, state: StateDep
) -> AccountCreated:
    account, token = members.create(
        session, state.secrets, principal, principal.org_id,
        password=body.password.get_secret_value() if body.password else None,
        **body.model_dump(exclude={"password"}),
    )
    _invite_by_mail(session, state, account, token)
    session.commit()
    _wake_mail()
    return _created(account, token)


def _member_change(
    session: Session,
    principal: Principal,
    account_id: str,
    change: Callable[..., Account],
    *args: Any,
) -> AccountResponse:
    """Apply `change` (a onetoken.orgs.members function) to an account of the principal's
    org, commit, and answer the account as it now stands."""
    account = change(session, principal, principal.org_id, account_id, *args)
    session.commit()
    return AccountResponse.model_validate(account)


@router.get("/accounts/{account_id}", response_model=AccountResponse)
def get_account(account_id: str, principal: MembersReadDep, session: SessionDep) -> AccountResponse:
    return AccountResponse.model_validate(
        members.get_account(session, principal.org_id, account_id)
    )


@router.patch("/accounts/{account_id}", response_model=AccountResponse)
def update_account(
    account_id: str, body: AccountUpdate, principal: MembersWriteDep, session: SessionDep
) -> AccountResponse:
    changes = body.model_dump(include=body.model_fields_set)
    return _member_change(session, principal, account_id, members.update, changes)


@router.post("/accounts/{account_id}/disable", response_model=AccountResponse)
def disable_account(
    account_id: str, principal: MembersWriteDep, session: SessionDep
) -> AccountResponse:
    """Signs the account out everywhere; its API keys keep working until revoked."""
    return _member_change(session, principal, account_id, members.set_status, "disabled")


@router.post("/accounts/{account_id}/enable", response_model=AccountResponse)
def enable_account(
    account_id: str, principal: MembersWriteDep, session: SessionDep
) -> AccountResponse:
    return _member_change(session, principal, account_id, members.set_status, "active")


@router.post("/accounts/{account_id}/totp/reset", response_model=AccountResponse)
def reset_totp(
    account_id: str, principal: MembersWriteDep, session: SessionDep
) -> AccountResponse:
    return _member_change(session, principal, account_id, members.reset_second_factor)
