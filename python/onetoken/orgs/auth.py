"""Sign-in: passwords, second factors, lockouts, sessions (bearer and console cookie)."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from starlette.requests import Request

from onetoken.db.base import new_id, utcnow
from onetoken.kit.crypto import (
    SESSION_TOKEN_PREFIX,
    Secrets,
    generate_session_token,
    hash_password,
    keyed_hash,
    verify_password,
)
from onetoken.kit.errors import BadRequest, Unauthorized, Unprocessable
from onetoken.orgs import restriction
from onetoken.orgs.models import Account, AdminSession, Org, OrgSso
from onetoken.orgs.service import find_account, normalize_login
from onetoken.security import totp
from onetoken.security.log import SecurityEvent, record
from onetoken.security.login_guard import Attempt, LoginGuard
from onetoken.security.principal import Principal
from onetoken.state import AppState

log = logging.getLogger("onetoken.orgs")

SESSION_COOKIE = "ot_session"
CSRF_COOKIE = "ot_csrf"
CSRF_HEADER = "x-csrf-token"
MIN_PASSWORD_LEN = 12


@dataclass(frozen=True, slots=True)
class Credentials:
    identifier: str
    password: str
    totp_code: str | None
    source_ip: str
    user_agent: str


def _unknown_subject(secrets: Secrets, identifier: str) -> str:
    # Unknown identifiers are throttled like accounts (so locking reveals nothing), under
    # a keyed hash: what someone typed as a user name is never stored.
    return "u:" + keyed_hash(secrets.session, "login\x00" + normalize_login(identifier))[:40]


def authenticate(
    session: Session, secrets: Secrets, guard: LoginGuard, creds: Credentials
) -> Account:
    """The account for these credentials, or Unauthorized / LoginLocked. Every outcome is
    recorded in the security log; failures are committed before raising."""
    account = find_account(session, creds.identifier)
    org_id = account.org_id if account is not None else ""
    # An unknown identifier names no one whose restriction could apply.
    client = restriction.client(
        session, secrets, account.id if account is not None else "",
        creds.source_ip, creds.user_agent,
    )
    attempt = Attempt(
        subject=account.id if account is not None else _unknown_subject(secrets, creds.identifier),
        account_id=account.id if account is not None else "",
        org_id=org_id,
        source_ip=client.source_ip,
        user_agent=client.user_agent,
        network=client.network,
        family=client.family,
        address_key=restriction.address_key(secrets, creds.source_ip),
    )
    guard.check(session, attempt)
    ok = verify_password(account.password_hash if account else None, creds.password)
    reason = ""
    if account is None:
        reason = "unknown_account"
    elif not ok:
        reason = "bad_password"
    elif account.status != "active":
        reason = "disabled"
    elif session.get(Org, account.org_id) is None or _org_status(session, account) != "active":
        reason = "org_disabled"
    if reason:
        guard.failure(session, attempt, reason)
        session.commit()
        raise Unauthorized("Invalid login or password.", code="invalid_credentials")
    assert account is not None
    if not account.is_operator and not passwords_allowed(session, account.org_id):
        # Told only once the password was right: a guess learns nothing here. Operators
        # keep their password (the break-glass login, audited by the caller).
        guard.forgive(session, attempt)
        record(SecurityEvent(
            kind="auth.password_refused", severity="medium", org_id=account.org_id,
            actor_id=account.id, subject_id=account.id, source_ip=creds.source_ip,
            user_agent=creds.user_agent, detail={"reason": "passwords_off"},
        ))
        session.commit()
        raise Unauthorized(PASSWORDS_OFF, code="password_sign_in_disabled")
    if account.auth_status == "totp":
        if not creds.totp_code:
            # The password was right; the second factor is asked for, not counted as a
            # failure (the same 401 shape tells the console to show the code field).
            raise Unauthorized("A one-time code is required.", code="totp_required")
        if not use_totp_code(session, secrets, account, creds.totp_code):
            guard.failure(session, attempt, "bad_totp")
            session.commit()
            raise Unauthorized("Invalid one-time code.", code="invalid_totp")
    guard.success(session, attempt)
    account.last_login_at = utcnow()
    return account


PASSWORDS_OFF = (
    "Your organization signs in through its identity provider: use Sign in with SSO."
)


def passwords_allowed(session: Session, org_id: str) -> bool:
    """False when the org's members sign in through its identity provider only
    (docs/sso.md): their password sign-in, invitations and password resets are refused."""
    allowed = session.scalar(
        select(OrgSso.passwords_allowed).where(OrgSso.org_id == org_id, OrgSso.enabled)
    )
    return allowed is None or bool(allowed)


def break_glass(session: Session, account: Account) -> bool:
    """Whether this password sign-in is an operator's in an org whose members may not use
    passwords: allowed, and recorded as such (docs/sso.md, "Break-glass")."""
    return account.is_operator and not passwords_allowed(session, account.org_id)


def _org_status(session: Session, account: Account) -> str:
    org = session.get(Org, account.org_id)
    return org.status if org is not None else "missing"


def use_totp_code(session: Session, secrets: Secrets, account: Account, code: str) -> bool:
    """Whether `code` is the account's current one-time code and not used before.

    The time step is claimed with a conditional UPDATE (compare-and-set on the last
    used step), so of two requests racing with one observed code exactly one wins."""
    if account.totp_secret_encrypted is None:
        return False
    secret = secrets.decrypt(account.totp_secret_encrypted)
    step = totp.verify(secret, code, after_step=account.totp_last_step)
    if step is None:
        return False
    claimed = session.execute(
        update(Account)
        .where(
            Account.id == account.id,
            or_(Account.totp_last_step.is_(None), Account.totp_last_step < step),
        )
        .values(totp_last_step=step)
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        return False
    set_committed_value(account, "totp_last_step", step)
    return True


# -- step-up: re-authentication of a signed-in account ---------------------------------------


def login_guard(request: Request, state: AppState) -> LoginGuard:
    """The process's login guard (its burst detector keeps per-process state)."""
    guard = getattr(request.app.state, "login_guard", None)
    if not isinstance(guard, LoginGuard):
        guard = LoginGuard(state.settings)
        request.app.state.login_guard = guard
    return guard


def step_up(
    session: Session,
    secrets: Secrets,
    guard: LoginGuard,
    principal: Principal,
    account: Account,
    *,
    password: str | None = None,
    totp_code: str | None = None,
) -> str:
    """Check the proofs given (the current password, a current one-time code) under the
    sign-in lockouts, per account and per source address with backoff: LoginLocked while
    locked. Returns "" when all hold, else the failure (`bad_password`, `bad_totp`), which
    is counted, written to the security log as metadata and committed; the caller
    refuses the request with its own error."""
    attempt = Attempt(
        subject=account.id,
        account_id=account.id,
        org_id=account.org_id,
        source_ip=principal.source_ip,
        user_agent=principal.user_agent,
        address_key=restriction.address_key(secrets, principal.source_ip),
    )
    guard.check(session, attempt)
    reason = ""
    if password is not None and not verify_password(account.password_hash, password):
        reason = "bad_password"
    elif totp_code is not None and not use_totp_code(session, secrets, account, totp_code):
        reason = "bad_totp"
    if reason:
        guard.failure(session, attempt, reason, kind="auth.step_up_failed")
        session.commit()
    else:
        guard.forgive(session, attempt)
    return reason


def issue_session(
    session: Session, secrets: Secrets, account: Account, ttl: timedelta,
    method: str = "password",
) -> tuple[str, AdminSession]:
    """A new session token for `account` (returned once, stored as a keyed hash);
    `method`: how it was opened, `password` or `sso`."""
    token = generate_session_token()
    now = utcnow()
    record = AdminSession(
        id=new_id("ses"),
        account_id=account.id,
        token_hash=secrets.hash_session_token(token),
        created_at=now,
        expires_at=now + ttl,
        method=method,
    )
    session.add(record)
    # Expired sessions are swept here rather than by a scheduler.
    session.execute(delete(AdminSession).where(AdminSession.expires_at < now))
    session.flush()
    return token, record


def logout(session: Session, secrets: Secrets, token: str) -> None:
    session.execute(
        delete(AdminSession).where(AdminSession.token_hash == secrets.hash_session_token(token))
    )
    session.commit()


def end_sessions(session: Session, account_id: str, *, keep_session_id: str = "") -> None:
    session.execute(
        delete(AdminSession).where(
            AdminSession.account_id == account_id, AdminSession.id != keep_session_id
        )
    )


def end_org_sessions(session: Session, org_id: str) -> None:
    """Sign every account of the org out (the org was disabled)."""
    session.execute(
        delete(AdminSession).where(
            AdminSession.account_id.in_(select(Account.id).where(Account.org_id == org_id))
        )
    )


def resolve_session(session: Session, secrets: Secrets, token: str) -> Principal | None:
    if not token.startswith(SESSION_TOKEN_PREFIX) or len(token) > 128:
        return None
    row = session.execute(
        select(AdminSession, Account, Org.status)
        .join(Account, Account.id == AdminSession.account_id)
        .join(Org, Org.id == Account.org_id)
        .where(AdminSession.token_hash == secrets.hash_session_token(token))
    ).one_or_none()
    if row is None:
        return None
    admin_session, account, org_status = row
    # The org's status is read on every request too, not only when it is disabled: a
    # session that outlived the sign-out (a concurrent sign-in) still ends.
    if (
        admin_session.expires_at <= utcnow()
        or account.status != "active"
        or org_status != "active"
    ):
        return None
    return Principal(
        account_id=account.id,
        org_id=account.org_id,
        role=account.role,
        email=account.email or "",
        is_operator=account.is_operator,
        session_id=admin_session.id,
    )


# -- console cookies and CSRF ---------------------------------------------------------------


def csrf_token(secrets: Secrets, session_token: str) -> str:
    """The CSRF token of a console session: bound to it, so a token planted by another
    site (cookie tossing) does not match."""
    return keyed_hash(secrets.session, "csrf\x00" + session_token)


def csrf_ok(secrets: Secrets, session_token: str, request: Request) -> bool:
    header = request.headers.get(CSRF_HEADER, "")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    expected = csrf_token(secrets, session_token)
    return bool(header) and hmac.compare_digest(header, cookie) and hmac.compare_digest(
        header, expected
    )


# -- passwords, invites and second factors ----------------------------------------------------


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise Unprocessable(
            f"Passwords must be at least {MIN_PASSWORD_LEN} characters.", param="password"
        )


def change_password(
    session: Session,
    secrets: Secrets,
    guard: LoginGuard,
    principal: Principal,
    account: Account,
    current: str,
    new: str,
) -> None:
    if step_up(session, secrets, guard, principal, account, password=current):
        # 400, not 401: the session is fine, only the confirmation failed.
        raise BadRequest("The current password is wrong.", code="invalid_credentials")
    check_password_strength(new)
    account.password_hash = hash_password(new)
    account.updated_at = utcnow()
    end_sessions(session, account.id, keep_session_id=principal.session_id)


def accept_invite(session: Session, secrets: Secrets, token: str, password: str) -> Account:
    check_password_strength(password)
    if not token.startswith("oti_") or len(token) > 128:
        raise Unauthorized("Invalid or expired invite.", code="invalid_invite")
    account = session.scalars(
        select(Account).where(Account.invite_token_hash == secrets.hash_session_token(token))
    ).first()
    now = utcnow()
    if (
        account is None
        or account.invite_expires_at is None
        or account.invite_expires_at <= now
        or account.status != "active"
    ):
        raise Unauthorized("Invalid or expired invite.", code="invalid_invite")
    if not account.is_operator and not passwords_allowed(session, account.org_id):
        raise Unauthorized(PASSWORDS_OFF, code="password_sign_in_disabled")
    account.password_hash = hash_password(password)
    account.auth_status = "password"
    account.invite_token_hash = None
    account.invite_expires_at = None
    account.updated_at = now
    session.flush()
    return account


def totp_enrol(
    session: Session,
    secrets: Secrets,
    guard: LoginGuard,
    principal: Principal,
    account: Account,
    current_password: str,
) -> tuple[str, str]:
    """Start (or restart) enrolment, given the current password: a new secret, stored
    encrypted, active only once a code from it is confirmed. Returns (secret, otpauth
    URI), shown once."""
    if account.auth_status == "totp":
        raise BadRequest("A second factor is already enabled; disable it first.",
                         code="totp_already_enabled")
    if step_up(session, secrets, guard, principal, account, password=current_password):
        raise BadRequest("The current password is wrong.", code="invalid_credentials")
    secret = totp.generate_secret()
    account.totp_secret_encrypted = secrets.encrypt(secret)
    account.totp_last_step = None
    session.flush()
    return secret, totp.provisioning_uri(secret, account.login_name)


def totp_confirm(
    session: Session,
    secrets: Secrets,
    guard: LoginGuard,
    principal: Principal,
    account: Account,
    code: str,
) -> None:
    if account.auth_status == "totp":
        raise BadRequest("A second factor is already enabled.", code="totp_already_enabled")
    if account.totp_secret_encrypted is None:
        raise BadRequest("Start enrolment first.", code="totp_not_enrolled")
    if step_up(session, secrets, guard, principal, account, totp_code=code):
        raise BadRequest("Invalid one-time code.", code="invalid_totp")
    account.auth_status = "totp"
    account.updated_at = utcnow()
    session.flush()


def totp_disable(
    session: Session,
    secrets: Secrets,
    guard: LoginGuard,
    principal: Principal,
    account: Account,
    *,
    current_password: str,
    code: str,
) -> None:
    """Turn the second factor off, given the current password and a current code."""
    if account.auth_status != "totp":
        raise BadRequest("No second factor is enabled.", code="totp_not_enabled")
    failed = step_up(
        session, secrets, guard, principal, account, password=current_password, totp_code=code
    )
    if failed == "bad_password":
        raise BadRequest("The current password is wrong.", code="invalid_credentials")
    if failed:
        raise BadRequest("Invalid one-time code.", code="invalid_totp")
    account.totp_secret_encrypted = None
    account.totp_last_step = None
    account.auth_status = "password"
    account.updated_at = utcnow()
    session.flush()
