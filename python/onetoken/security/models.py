"""Tables of the security domain in the control DB (shared by every process of a
deployment): login protection state and blocked sources."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow


class LoginThrottle(Base):
    """Consecutive failed sign-ins of one subject and the lockout they earned.

    scope `account` (subject: account id, or a keyed hash of an unknown login identifier,
    so unknown names lock exactly like real ones) or `ip` (subject: the source address).
    Scope `sso_start` counts sign-ins started through an identity provider per address
    (failures: starts in the window that began at last_failure_at).
    """

    __tablename__ = "login_throttles"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject: Mapped[str] = mapped_column(String(80), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class LoginSource(Base):
    """Networks (/24, /64) and User-Agent families an account has signed in from."""

    __tablename__ = "login_sources"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # net | ua
    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BlockedSource(Base):
    __tablename__ = "blocked_sources"

    cidr: Mapped[str] = mapped_column(String(64), primary_key=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # A fixed reason code (e.g. `auth_flood`), never free text.
    reason: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
