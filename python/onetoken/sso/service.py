"""An org's sign-in through its identity provider (docs/sso.md): its configuration, the
start of a sign-in, and the callback that checks the provider's answer and gives the
person their account (created at the first sign-in, its role from the provider's groups
at every sign-in).

A refusal raises SsoRefused with a fixed reason; the caller writes it to the security
log and shows the person its message. Nothing the provider sent (tokens, claims beyond
the account's own e-mail) is stored or logged.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.kit.crypto import DecryptionError, Secrets, keyed_hash
from onetoken.kit.errors import Conflict, Forbidden, NotFound, OnetokenError, Unprocessable
from onetoken.kit.net import networks
from onetoken.orgs import restriction
from onetoken.orgs import service as orgs
from onetoken.orgs.models import Account, AdminSession, Org, OrgSso, SsoFlow, SsoIdentity
from onetoken.security import audit
from onetoken.security.log import SecurityEvent, record
from onetoken.security.models import LoginThrottle
from onetoken.security.net import url_target_refused
from onetoken.security.principal import ROLES, Principal
from onetoken.sso import oidc
from onetoken.webhooks.dispatcher import Target
from onetoken.webhooks.service import INTERNAL_SUFFIXES

# How long a started sign-in may take at the provider.
FLOW_TTL = timedelta(minutes=10)
CALLBACK_PATH = "/api/v1/auth/sso/callback"

#: What the person is told for each refusal (the security log has the reason's name).
MESSAGES: dict[str, str] = {
    "invalid_state": "This sign-in link was already used or is unknown. Start again.",
    "expired_state": "The sign-in took too long. Start again.",
    "state_mismatch": "This sign-in was started in another browser. Start again here.",
    "provider_error": "The identity provider did not sign you in.",
    "sso_disabled": "Your organization does not sign in through an identity provider.",
    "address_not_allowed": "The identity provider's address is not allowed.",
    "discovery_failed": "The identity provider could not be reached. Try again later.",
    "issuer_mismatch": "The identity provider's configuration does not match its issuer.",
    "token_request_failed": "The identity provider did not confirm the sign-in.",
    "jwks_failed": "The identity provider's signing keys could not be read.",
    "malformed_id_token": "The identity provider's answer could not be read.",
    "algorithm_not_allowed": "The identity provider signs with an algorithm not accepted.",
    "bad_signature": "The identity provider's answer is not signed by it.",
    "wrong_issuer": "The identity provider's answer names another issuer.",
    "wrong_audience": "The identity provider's answer was issued to another application.",
    "wrong_authorized_party": "The identity provider's answer was issued to another "
                              "application.",
    "expired": "The identity provider's answer has expired. Start again.",
    "issued_in_future": "The identity provider's clock is off; ask your administrator.",
    "nonce_mismatch": "The identity provider's answer belongs to another sign-in. "
                      "Start again.",
    "email_missing": "The identity provider did not share your e-mail address.",
    "email_unverified": "Your e-mail address is not verified at the identity provider.",
    "domain_not_allowed": "Your e-mail domain may not sign in to this organization.",
    "no_mapped_group": "You are in no group that has a role in this organization; ask "
                       "your administrator to add you to one.",
    "email_in_use": "An account of another organization uses this e-mail address.",
    "account_disabled": "Your account is disabled.",
    "org_disabled": "Your organization is disabled.",
    "secret_unreadable": "The identity provider's client secret cannot be read here; ask "
                         "your administrator to set it again.",
}


class SsoRefused(Exception):
    """A sign-in refused: `reason` (a key of MESSAGES), the org when known."""

    def __init__(self, reason: str, org_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.org_id = org_id

    @property
    def message(self) -> str:
        return MESSAGES.get(self.reason, "The sign-in was refused.")


class SsoSettings(Protocol):
    sso_private_cidrs: str
    sso_timeout_seconds: float
    sso_start_max_per_address: int
    public_url: str


def target(settings: SsoSettings) -> Target:
    return Target(
        allow=networks(settings.sso_private_cidrs),
        deadline_s=settings.sso_timeout_seconds,
        ssl_context=httpx.create_ssl_context(),
    )


def redirect_uri(settings: SsoSettings) -> str:
    """Where the provider sends the browser back: registered at the provider as is."""
    return settings.public_url.rstrip("/") + CALLBACK_PATH


#: Discovery documents and JWKS of every org's provider, for this process.
providers = oidc.ProviderCache()


def _allow_http(settings: SsoSettings) -> bool:
    # Plain http only toward providers the operator placed on an allowed network.
    return bool(settings.sso_private_cidrs.strip())


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """A configuration as an admin sends it; `client_secret` None keeps the stored one."""

    issuer: str
    client_id: str
    client_secret: str | None
    allowed_domains: list[str]
    group_claim: str
    role_map: list[dict[str, str]]
    passwords_allowed: bool
    enabled: bool


def get_config(session: Session, org_id: str) -> OrgSso | None:
    return session.get(OrgSso, org_id)


def domains(config: OrgSso) -> list[str]:
    return [d for d in config.allowed_domains.split(",") if d]


def _snapshot(config: OrgSso | None) -> dict[str, Any]:
    if config is None:
        return {}
    return {
        "enabled": config.enabled,
        "issuer": config.issuer,
        "client_id": config.client_id,
        "allowed_domains": config.allowed_domains,
        "group_claim": config.group_claim,
        "role_map": config.role_map,
        "passwords_allowed": config.passwords_allowed,
    }


def _check(settings: SsoSettings, actor: Principal, body: Config) -> None:
    allow_http = _allow_http(settings)
    if not oidc.endpoint_ok(body.issuer, allow_http=allow_http):
        raise Unprocessable(
            "The issuer must be an https:// URL without credentials or fragment.",
            param="issuer",
        )
    allow = networks(settings.sso_private_cidrs)
    host = urlsplit(body.issuer).hostname or ""
    # As for webhooks: names internal by convention are refused even when they do not
    # resolve here; with an allow-list, what a name resolves to decides.
    internal = host == "localhost" or host.endswith(INTERNAL_SUFFIXES)
    if (internal and not allow) or url_target_refused(body.issuer, allow):
        raise Unprocessable(
            "The issuer's address is not on the public internet.", param="issuer"
        )
    for entry in body.role_map:
        if entry["role"] not in ROLES:
            raise Unprocessable("Unknown role in role_map.", param="role_map")
        # Only owners make owners, by hand or through the provider's groups.
        if entry["role"] == "owner" and actor.role != "owner" and not actor.is_operator:
            raise Forbidden("Only owners map a group to the owner role.", code="owner_required")
    if not body.role_map:
        raise Unprocessable("Map at least one group to a role.", param="role_map")


def save_config(
    session: Session,
    secrets_: Secrets,
    settings: SsoSettings,
    actor: Principal,
    org_id: str,
    body: Config,
) -> OrgSso:
    """Create or replace the org's configuration (audited with before and after, never
    the secret: only whether it changed)."""
    _check(settings, actor, body)
    config = get_config(session, org_id)
    before = _snapshot(config)
    passwords_were_allowed = config is None or not config.enabled or config.passwords_allowed
    if config is None:
        if not body.client_secret:
            raise Unprocessable("The client secret is required.", param="client_secret")
        config = OrgSso(org_id=org_id, created_at=utcnow())
        session.add(config)
    config.enabled = body.enabled
    config.issuer = body.issuer
    config.client_id = body.client_id
    if body.client_secret:
        config.client_secret_encrypted = secrets_.encrypt(body.client_secret)
    config.allowed_domains = ",".join(sorted({d.lower() for d in body.allowed_domains}))
    config.group_claim = body.group_claim
    config.role_map = [{"group": e["group"], "role": e["role"]} for e in body.role_map]
    config.passwords_allowed = body.passwords_allowed
    config.updated_at = utcnow()
    session.flush()
    audit.change(actor, "admin.sso_changed", subject_id=org_id, org_id=org_id,
                 before=before, after=_snapshot(config), severity="high",
                 extra={"client_secret_changed": bool(body.client_secret)})
    if passwords_were_allowed and config.enabled and not config.passwords_allowed:
        ended = _end_password_sessions(session, org_id)
        audit.event(actor, "admin.sessions_ended", "high", subject_id=org_id, org_id=org_id,
                    detail={"reason": "passwords_off", "sessions": ended})
    return config


def _end_password_sessions(session: Session, org_id: str) -> int:
    """End the sessions the org's members opened with a password: passwords off means
    the provider decides who is signed in, from now on. Operators keep theirs (their
    password is the break-glass way in); sessions opened through the provider stay."""
    members = select(Account.id).where(Account.org_id == org_id, Account.is_operator.is_(False))
    ended = session.execute(
        delete(AdminSession).where(AdminSession.method == "password",
                                   AdminSession.account_id.in_(members))
    )
    session.flush()
    return int(getattr(ended, "rowcount", 0) or 0)


def delete_config(session: Session, actor: Principal, org_id: str) -> None:
    """Sign-in through the provider ends; passwords work again (accounts created by it
    set one through a password reset)."""
    config = get_config(session, org_id)
    if config is None:
        raise NotFound("No identity provider is configured.")
    before = _snapshot(config)
    session.execute(delete(SsoIdentity).where(SsoIdentity.org_id == org_id))
    session.execute(delete(SsoFlow).where(SsoFlow.org_id == org_id))
    session.delete(config)
    session.flush()
    audit.change(actor, "admin.sso_removed", subject_id=org_id, org_id=org_id,
                 before=before, after={k: None for k in before}, severity="high")


# -- the sign-in ----------------------------------------------------------------------------


def find_org(session: Session, *, email: str = "", org_id: str = "") -> OrgSso:
    """The enabled configuration of the org named, or of the org whose allowed domains
    hold the address's domain."""
    if org_id:
        config = get_config(session, org_id)
        if config is not None and config.enabled:
            return config
    elif "@" in email:
        domain = email.rsplit("@", 1)[1].strip().lower()
        for config in session.scalars(select(OrgSso).where(OrgSso.enabled)):
            if domain in domains(config):
                return config
    raise NotFound("No organization signs in through an identity provider for this.",
                   code="sso_not_configured")


#: The login_throttles scope counting the sign-ins started from one address.
START_SCOPE = "sso_start"


class SsoStartLimited(OnetokenError, status=429, kind="rate_limit_error",
                      code="sso_start_limited"):

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many sign-ins were started from your address. Try again later.")
        self.headers = {"Retry-After": str(max(1, retry_after))}


def limit_start(
    session: Session, secrets_: Secrets, settings: SsoSettings, source_ip: str,
    user_agent: str,
) -> None:
    """Count one start against its address; SsoStartLimited past
    `sso_start_max_per_address` starts in a flow's lifetime. Each start costs a request
    to the provider and a row, and anyone may call it: like the sign-in lockout, the
    counter is in the control DB (every process shares it) under the address's token, and
    it is committed here, so a refused or failing start still counts."""
    subject = restriction.address_key(secrets_, source_ip)
    if not subject:
        return
    now = utcnow()
    starts, began = _count_start(session, subject, now)
    if starts <= settings.sso_start_max_per_address:
        return
    if starts == settings.sso_start_max_per_address + 1:
        record(SecurityEvent(
            kind="auth.sso_start_limited", severity="medium", source_ip=source_ip,
            user_agent=user_agent,
            detail={"starts": starts, "window_s": int(FLOW_TTL.total_seconds())},
        ))
    raise SsoStartLimited(int((began + FLOW_TTL - now).total_seconds()) + 1)


def _count_start(session: Session, subject: str, now: datetime) -> tuple[int, datetime]:
    """The address's starts in its current window with this one, and when the window
    began (login_throttles: failures, last_failure_at). One UPDATE, so starts racing in
    several processes are each counted."""
    row = LoginThrottle
    stale = or_(row.last_failure_at.is_(None), row.last_failure_at <= now - FLOW_TTL)
    count = (
        update(row)
        .where(row.scope == START_SCOPE, row.subject == subject)
        .values(failures=case((stale, 1), else_=row.failures + 1),
                last_failure_at=case((stale, now), else_=row.last_failure_at))
        .returning(row.failures, row.last_failure_at)
    )
    retried = False
    while True:
        counted = session.execute(count).first()
        if counted is None:
            session.add(LoginThrottle(scope=START_SCOPE, subject=subject, failures=1,
                                      last_failure_at=now))
        try:
            session.commit()
        except IntegrityError:
            # Another process counted this address's first start at the same moment.
            session.rollback()
            if retried:
                raise
            retried = True
            continue
        if counted is None:
            return 1, now
        return int(counted[0]), counted[1] or now


@dataclass(frozen=True, slots=True)
class Started:
    authorize_url: str
    # The cookie binding the flow to this browser (only its keyed hash is stored).
    browser_token: str
    org_id: str


def start(
    session: Session, secrets_: Secrets, settings: SsoSettings, config: OrgSso, login_hint: str
) -> Started:
    """Record a new flow and answer where to send the browser. Refused (SsoRefused)
    when the provider's discovery fails."""
    try:
        meta = providers.discover(target(settings), config.issuer,
                                  allow_http=_allow_http(settings))
    except oidc.OidcError as exc:
        raise SsoRefused(exc.reason, config.org_id) from None
    state = secrets.token_urlsafe(32)
    browser = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    verifier, challenge = oidc.pkce_pair()
    now = utcnow()
    session.add(SsoFlow(
        id=new_id("ssf"),
        org_id=config.org_id,
        state_hash=_hash(secrets_, "state", state),
        browser_hash=_hash(secrets_, "browser", browser),
        nonce=nonce,
        code_verifier_encrypted=secrets_.encrypt(verifier),
        created_at=now,
        expires_at=now + FLOW_TTL,
    ))
    # Abandoned flows are swept here rather than by a scheduler.
    session.execute(delete(SsoFlow).where(SsoFlow.expires_at < now))
    session.flush()
    url = oidc.authorization_url(
        meta, client_id=config.client_id, redirect_uri=redirect_uri(settings), state=state,
        nonce=nonce, code_challenge=challenge, login_hint=login_hint,
    )
    return Started(url, browser, config.org_id)


def _hash(secrets_: Secrets, purpose: str, value: str) -> str:
    return keyed_hash(secrets_.session, f"sso-{purpose}\x00{value}")


@dataclass(frozen=True, slots=True)
class SignedIn:
    account: Account
    created: bool
    role_before: str | None


def _claim_flow(session: Session, secrets_: Secrets, state: str, browser_token: str) -> SsoFlow:
    """The flow of `state`, taken out of the table (a state works once, whatever comes
    next) and committed before any network call."""
    if not state or len(state) > 128:
        raise SsoRefused("invalid_state")
    flow = session.scalars(
        select(SsoFlow).where(SsoFlow.state_hash == _hash(secrets_, "state", state))
    ).first()
    if flow is None:
        raise SsoRefused("invalid_state")
    taken = session.execute(delete(SsoFlow).where(SsoFlow.id == flow.id))
    session.commit()
    # Of two callbacks racing with one state, exactly one deletes the row.
    if getattr(taken, "rowcount", 0) != 1:
        raise SsoRefused("invalid_state", flow.org_id)
    if flow.expires_at <= utcnow():
        raise SsoRefused("expired_state", flow.org_id)
    if not browser_token or not hmac.compare_digest(
        flow.browser_hash, _hash(secrets_, "browser", browser_token)
    ):
        raise SsoRefused("state_mismatch", flow.org_id)
    return flow


def finish(
    session: Session,
    secrets_: Secrets,
    settings: SsoSettings,
    *,
    state: str,
    code: str,
    error: str,
    browser_token: str,
) -> SignedIn:
    """Check the provider's answer to a started flow and give the person's account
    (flushed, not committed). SsoRefused for every failed check."""
    flow = _claim_flow(session, secrets_, state, browser_token)
    org_id = flow.org_id
    if error or not code or len(code) > 2048:
        raise SsoRefused("provider_error", org_id)
    config = get_config(session, org_id)
    if config is None or not config.enabled:
        raise SsoRefused("sso_disabled", org_id)
    outbound = target(settings)
    try:
        meta = providers.discover(outbound, config.issuer, allow_http=_allow_http(settings))
        id_token = oidc.redeem_code(
            outbound, meta,
            client_id=config.client_id,
            client_secret=secrets_.decrypt(config.client_secret_encrypted),
            code=code,
            redirect_uri=redirect_uri(settings),
            code_verifier=secrets_.decrypt(flow.code_verifier_encrypted),
        )
        claims = oidc.verify_id_token(
            id_token, providers.jwks(outbound, meta, oidc.token_kid(id_token)),
            issuer=config.issuer, client_id=config.client_id, nonce=flow.nonce,
            now=int(time.time()),
        )
    except oidc.OidcError as exc:
        raise SsoRefused(exc.reason, org_id) from None
    except DecryptionError:
        # Stored under a secret key this deployment no longer has.
        raise SsoRefused("secret_unreadable", org_id) from None
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise SsoRefused("email_missing", org_id)
    email = orgs.normalize_email(email)
    if claims.get("email_verified") is False:
        raise SsoRefused("email_unverified", org_id)
    if email.rsplit("@", 1)[1] not in domains(config):
        raise SsoRefused("domain_not_allowed", org_id)
    role = mapped_role(config, claims.get(config.group_claim))
    if role is None:
        raise SsoRefused("no_mapped_group", org_id)
    return _account_for(session, config, str(claims["sub"]), email, role, claims.get("name"))


def mapped_role(config: OrgSso, groups: object) -> str | None:
    """The highest role (ROLES order) any of the person's groups maps to."""
    held = {groups} if isinstance(groups, str) else (
        {g for g in groups if isinstance(g, str)} if isinstance(groups, list) else set()
    )
    roles = {e["role"] for e in config.role_map if e["group"] in held}
    return next((r for r in ROLES if r in roles), None)


def _account_for(
    session: Session, config: OrgSso, subject: str, email: str, role: str, name: object
) -> SignedIn:
    org_id = config.org_id
    org = session.get(Org, org_id)
    if org is None or org.status != "active":
        raise SsoRefused("org_disabled", org_id)
    account = session.scalars(
        select(Account).join(SsoIdentity, SsoIdentity.account_id == Account.id).where(
            SsoIdentity.org_id == org_id, SsoIdentity.subject == subject[:255]
        )
    ).first()
    created = False
    if account is None:
        account = session.scalars(select(Account).where(Account.email == email)).first()
        if account is not None and account.org_id != org_id:
            raise SsoRefused("email_in_use", org_id)
        if account is None:
            # Created just in time; the terms of service are asked for at its first page.
            try:
                account = orgs.create_account(
                    session, org_id, email, None, role,
                    display_name=name[:100] if isinstance(name, str) else "",
                )
            except (Conflict, Unprocessable):
                # Another account signs in with this address as its login name, or the
                # address cannot be one.
                raise SsoRefused("email_in_use", org_id) from None
            account.auth_status = "sso"
            created = True
        session.add(SsoIdentity(account_id=account.id, org_id=org_id, subject=subject[:255],
                                created_at=utcnow()))
    if account.status != "active":
        raise SsoRefused("account_disabled", org_id)
    role_before = None
    # The provider's groups decide the role at every sign-in, except that an org keeps
    # its last active owner.
    if account.role != role and not (account.role == "owner" and _last_owner(session, account)):
        role_before = account.role
        account.role = role
    account.last_login_at = utcnow()
    account.updated_at = utcnow()
    session.flush()
    return SignedIn(account, created, role_before)


def _last_owner(session: Session, account: Account) -> bool:
    owners = session.scalar(
        select(func.count()).select_from(Account).where(
            Account.org_id == account.org_id, Account.role == "owner", Account.status == "active"
        )
    )
    return int(owners or 0) <= 1
