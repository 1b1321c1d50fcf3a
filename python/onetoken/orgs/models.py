"""Tables of the orgs domain: organizations, their accounts and admin sessions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow

ORG_STATUSES = ("active", "disabled")


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"), index=True)
    # Sign-in identifiers (any of the three): login_name always, email and mobile optional.
    login_name: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), unique=True, nullable=True)
    mobile: Mapped[str | None] = mapped_column(String(32), unique=True, nullable=True)
    display_name: Mapped[str] = mapped_column(String(100), default="")
    # None until an invited account sets its password.
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    # active | disabled
    status: Mapped[str] = mapped_column(String(16), default="active")
    # invited (no password yet) | password | totp (password and a second factor)
    auth_status: Mapped[str] = mapped_column(String(16), default="password")
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    # Fernet token under the key derived from ONETOKEN_SECRET_KEY; set from enrolment on.
    totp_secret_encrypted: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # Last accepted TOTP time step: a code is accepted once.
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    invite_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    invite_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        CheckConstraint("role IN ('owner','admin','developer','billing','viewer')", name="role"),
    )


class AdminSession(Base):
    __tablename__ = "admin_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
