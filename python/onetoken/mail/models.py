"""The mail outbox: each message waits here until the mail worker has sent it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow

# pending: waiting for its next attempt; sent; failed: gave up after the last attempt.
MAIL_STATUSES = ("pending", "sent", "failed")


class MailMessage(Base):
    """One message to one address. The body (which may hold a one-time link) is stored
    encrypted and emptied once sent or given up; what stays is who was sent which kind of
    message and when."""

    __tablename__ = "mail_outbox"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # invitation | password_reset | balance_low | quota_exhausted | security_alert
    kind: Mapped[str] = mapped_column(String(32))
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    to_address: Mapped[str] = mapped_column(String(254))
    subject: Mapped[str] = mapped_column(String(200))
    body_encrypted: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The error class of the last failed attempt, never the server's text.
    last_error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_mail_outbox_status_next_attempt_at", "status", "next_attempt_at"),)
