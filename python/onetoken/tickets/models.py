"""Tables of the tickets domain: work orders, their messages and their attachments.

These are the one place the service keeps content, and only what a customer (or the
staff answering them) chose to write here; a ticket is purged with its attachments
ONETOKEN_TICKET_RETENTION_DAYS after it closes (rights.retention). Attachment bytes are
not in the database: `storage_key` names them in the attachment store (tickets.store).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow
from onetoken.orgs.models import Org

CATEGORIES = ("billing", "technical", "account", "security", "privacy", "other")
# open: nobody from staff has answered yet; waiting_on_staff: the customer wrote last;
# waiting_on_customer: staff answered; closed is final (retention counts from it).
STATUSES = ("open", "waiting_on_staff", "waiting_on_customer", "resolved", "closed")
AUTHOR_KINDS = ("customer", "staff")


class Ticket(Base):
    __tablename__ = "tickets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id))
    # The account that opened it (pseudonymous once that account is cancelled).
    opened_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    subject: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(24), default="open")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_message_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    first_staff_response_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), nullable=True
    )
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_tickets_org_id_created_at", "org_id", "created_at"),
        Index("ix_tickets_status_created_at", "status", "created_at"),
        Index("ix_tickets_closed_at", "closed_at"),
    )


class TicketMessage(Base):
    __tablename__ = "ticket_messages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(
        ForeignKey(Ticket.id, ondelete="CASCADE"), index=True
    )
    author_kind: Mapped[str] = mapped_column(String(16))
    author_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TicketAttachment(Base):
    __tablename__ = "ticket_attachments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(
        ForeignKey(Ticket.id, ondelete="CASCADE"), index=True
    )
    author_kind: Mapped[str] = mapped_column(String(16))
    uploaded_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Sanitised, with the extension of the detected type; shown, never used as a path.
    filename: Mapped[str] = mapped_column(String(200))
    # Decided from the bytes (tickets.content), never from what the client claimed.
    content_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    # The random name in the attachment store.
    storage_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
