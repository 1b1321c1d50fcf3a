"""Self-service password reset: a person who forgot their password asks for a link by
e-mail address, and sets a new password with the token in it.

The request answers the same whether or not the address belongs to an account, and
whether or not a message goes out (an unknown address, a disabled account, the hourly
limit): nothing tells a caller which addresses exist. A token is stored as a keyed hash,
works once and only until it expires; using it ends every session of the account."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.kit.crypto import Secrets, generate_session_token, hash_password
from onetoken.kit.errors import Unauthorized
from onetoken.orgs import auth
from onetoken.orgs.auth import check_password_strength, end_sessions
from onetoken.orgs.models import Account, Org, PasswordReset
from onetoken.orgs.service import normalize_email

TOKEN_PREFIX = "otr_"  # noqa: S105 (a prefix, like oti_ for invites)
_INVALID = "Invalid or expired password reset."


def request(
    session: Session,
    secrets: Secrets,
    email: str,
    *,
    ttl: timedelta,
    max_per_hour: int,
) -> tuple[Account, str] | None:
    """A new reset token for the active account with this address, or None (no such
    account, or it was sent `max_per_hour` resets in the last hour)."""
    account = session.scalars(
        select(Account).join(Org, Org.id == Account.org_id).where(
            Account.email == normalize_email(email),
            Account.status == "active",
            Org.status == "active",
        )
    ).first()
    if account is None or not (
        account.is_operator or auth.passwords_allowed(session, account.org_id)
    ):
        return None
    now = utcnow()
    recent = session.scalar(
        select(func.count()).select_from(PasswordReset).where(
            PasswordReset.account_id == account.id,
            PasswordReset.created_at > now - timedelta(hours=1),
        )
    )
    if (recent or 0) >= max_per_hour:
        return None
    token = TOKEN_PREFIX + generate_session_token()
    session.add(
        PasswordReset(
            id=new_id("pwr"),
            account_id=account.id,
            token_hash=secrets.hash_session_token(token),
            created_at=now,
            expires_at=now + ttl,
        )
    )
    session.flush()
    return account, token


def reset(session: Session, secrets: Secrets, token: str, password: str) -> Account:
    """Set the password with a reset token: once, before it expires. Every session of
    the account ends, and its other unused reset tokens stop working."""
    check_password_strength(password)
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        raise Unauthorized(_INVALID, code="invalid_reset_token")
    now = utcnow()
    record = session.scalars(
        select(PasswordReset).where(PasswordReset.token_hash == secrets.hash_session_token(token))
    ).first()
    if record is None or record.used_at is not None or record.expires_at <= now:
        raise Unauthorized(_INVALID, code="invalid_reset_token")
    # Claimed with a conditional update: two uses of one token at once set one password.
    claimed = session.execute(  # type: ignore[attr-defined]  # a CursorResult
        update(PasswordReset)
        .where(PasswordReset.id == record.id, PasswordReset.used_at.is_(None))
        .values(used_at=now)
    ).rowcount
    account = session.get(Account, record.account_id)
    if not claimed or account is None or account.status != "active":
        raise Unauthorized(_INVALID, code="invalid_reset_token")
    if not account.is_operator and not auth.passwords_allowed(session, account.org_id):
        raise Unauthorized(auth.PASSWORDS_OFF, code="password_sign_in_disabled")
    session.execute(
        update(PasswordReset)
        .where(PasswordReset.account_id == account.id, PasswordReset.used_at.is_(None))
        .values(used_at=now)
    )
    account.password_hash = hash_password(password)
    # An account made by the identity provider gets its first password here too.
    if account.auth_status in ("invited", "sso"):
        account.auth_status = "password"
        account.invite_token_hash = None
        account.invite_expires_at = None
    account.updated_at = now
    end_sessions(session, account.id)
    session.flush()
    return account


def purge_expired(session: Session, now: datetime) -> int:
    """Drop reset tokens that expired over an hour ago (the last hour's rows are the
    per-account limit on reset mails)."""
    result = session.execute(
        delete(PasswordReset).where(PasswordReset.expires_at < now - timedelta(hours=1))
    )
    return int(getattr(result, "rowcount", 0) or 0)
