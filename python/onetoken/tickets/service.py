"""Tickets: opening, listing, messages, status changes, attachments, and the parts the
rights domain needs (export, erasure, the retention purge).

Callers commit. Org members reach only their org's tickets (`org_id`); staff pass
`org_id=None` and reach every org's. Error messages are fixed texts: nothing a customer
wrote ever comes back in an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.kit.errors import Conflict, NotFound, OnetokenError
from onetoken.tickets import content
from onetoken.tickets.models import Ticket, TicketAttachment, TicketMessage
from onetoken.tickets.store import AttachmentStore

ERASED = "[erased]"


class TicketClosed(Conflict, code="ticket_closed"): ...


class InvalidTransition(Conflict, code="invalid_transition"): ...


class TooManyAttachments(Conflict, code="too_many_attachments"): ...


class AttachmentTooLarge(
    OnetokenError, status=413, kind="invalid_request_error", code="attachment_too_large"
): ...


class UnsupportedAttachment(
    OnetokenError, status=415, kind="invalid_request_error", code="unsupported_attachment_type"
): ...


def _claim(session: Session, ticket: Ticket) -> None:
    """Take the ticket's row for this transaction and reload it: a write that changes
    nothing (a row lock on PostgreSQL, the write lock on SQLite), so concurrent changes to
    one ticket run one after the other and each sees the state the previous one committed
    (its status, its attachment count)."""
    session.execute(
        update(Ticket).where(Ticket.id == ticket.id).values(updated_at=Ticket.updated_at)
    )
    session.refresh(ticket)


def _not_closed(ticket: Ticket) -> None:
    if ticket.status == "closed":
        raise TicketClosed("This ticket is closed; open a new one.")


def create(
    session: Session,
    *,
    org_id: str,
    opened_by: str,
    subject: str,
    category: str,
    description: str,
) -> Ticket:
    now = utcnow()
    ticket = Ticket(
        id=new_id("tkt"),
        org_id=org_id,
        opened_by=opened_by,
        subject=subject,
        category=category,
        description=description,
        status="open",
        created_at=now,
        updated_at=now,
        last_message_at=now,
    )
    session.add(ticket)
    session.flush()
    return ticket


def get(session: Session, ticket_id: str, org_id: str | None) -> Ticket:
    """The ticket, within `org_id` (None: any org, for staff); 404 otherwise."""
    ticket = session.get(Ticket, ticket_id)
    if ticket is None or (org_id is not None and ticket.org_id != org_id):
        raise NotFound("Ticket not found.")
    return ticket


def list_tickets(
    session: Session,
    *,
    org_id: str | None,
    statuses: Sequence[str] | None = None,
    category: str | None = None,
    limit: int = 50,
    before: datetime | None = None,
) -> tuple[list[Ticket], bool]:
    """Newest first; `before` pages on `created_at`. Returns the page and whether more
    follow."""
    query = select(Ticket)
    if org_id is not None:
        query = query.where(Ticket.org_id == org_id)
    if statuses:
        query = query.where(Ticket.status.in_(list(statuses)))
    if category is not None:
        query = query.where(Ticket.category == category)
    if before is not None:
        query = query.where(Ticket.created_at < before)
    rows = list(
        session.scalars(query.order_by(Ticket.created_at.desc(), Ticket.id).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def counts(session: Session, ticket_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(messages, attachments) per ticket id."""
    if not ticket_ids:
        return {}
    ids = list(ticket_ids)
    messages = {
        row[0]: int(row[1])
        for row in session.execute(
            select(TicketMessage.ticket_id, func.count())
            .where(TicketMessage.ticket_id.in_(ids))
            .group_by(TicketMessage.ticket_id)
        )
    }
    attachments = {
        row[0]: int(row[1])
        for row in session.execute(
            select(TicketAttachment.ticket_id, func.count())
            .where(TicketAttachment.ticket_id.in_(ids))
            .group_by(TicketAttachment.ticket_id)
        )
    }
    return {i: (messages.get(i, 0), attachments.get(i, 0)) for i in ids}


def messages_of(session: Session, ticket_id: str) -> list[TicketMessage]:
    return list(
        session.scalars(
            select(TicketMessage)
            .where(TicketMessage.ticket_id == ticket_id)
            .order_by(TicketMessage.created_at, TicketMessage.id)
        )
    )


def attachments_of(session: Session, ticket_id: str) -> list[TicketAttachment]:
    return list(
        session.scalars(
            select(TicketAttachment)
            .where(TicketAttachment.ticket_id == ticket_id)
            .order_by(TicketAttachment.created_at, TicketAttachment.id)
        )
    )


def add_message(
    session: Session, ticket: Ticket, *, staff: bool, author_id: str, body: str
) -> TicketMessage:
    """A message, and the status it implies: staff answering waits on the customer (and
    stamps the first staff response once); the customer writing waits on staff (or stays
    `open` while nobody from staff has answered), which also reopens a resolved ticket."""
    _claim(session, ticket)
    _not_closed(ticket)
    now = utcnow()
    message = TicketMessage(
        id=new_id("tmsg"),
        ticket_id=ticket.id,
        author_kind="staff" if staff else "customer",
        author_id=author_id,
        body=body,
        created_at=now,
    )
    session.add(message)
    if staff:
        ticket.status = "waiting_on_customer"
        if ticket.first_staff_response_at is None:
            ticket.first_staff_response_at = now
    else:
        ticket.status = "open" if ticket.first_staff_response_at is None else "waiting_on_staff"
    ticket.resolved_at = None
    ticket.last_message_at = now
    ticket.updated_at = now
    session.flush()
    return message


def set_status(session: Session, ticket: Ticket, status: str, *, staff: bool) -> None:
    """Change the status. Closed is final for everyone; customers may resolve, close, or
    reopen (`open`) a resolved ticket; staff may set any status."""
    _claim(session, ticket)
    if status == ticket.status:
        return
    _not_closed(ticket)
    if not staff and status == "open" and ticket.status != "resolved":
        raise InvalidTransition("Only a resolved ticket can be reopened.")
    now = utcnow()
    if status == "open" and ticket.first_staff_response_at is not None and not staff:
        # Reopened after an answer: it is staff's turn.
        status = "waiting_on_staff"
    ticket.status = status
    if status == "resolved":
        ticket.resolved_at = now
    elif status == "closed":
        ticket.closed_at = now
    else:
        ticket.resolved_at = None
    ticket.updated_at = now
    session.flush()


def add_attachment(
    session: Session,
    store: AttachmentStore,
    ticket: Ticket,
    data: bytes,
    *,
    claimed_name: str,
    uploaded_by: str,
    max_bytes: int,
    max_count: int,
) -> TicketAttachment:
    """Check the bytes (kind from content, size, count), store them under a random key and
    record the attachment. The file is removed again when the row cannot be written."""
    _claim(session, ticket)
    _not_closed(ticket)
    if len(data) > max_bytes:
        raise AttachmentTooLarge(f"Attachments are limited to {max_bytes} bytes.")
    kind = content.detect(data)
    if kind is None:
        raise UnsupportedAttachment(
            "Attachments must be PNG, JPEG, GIF or WebP images, PDF, or plain UTF-8 text."
        )
    existing = session.scalar(
        select(func.count()).select_from(TicketAttachment).where(
            TicketAttachment.ticket_id == ticket.id
        )
    )
    if int(existing or 0) >= max_count:
        raise TooManyAttachments(f"A ticket holds at most {max_count} attachments.")
    key = store.put(data)
    try:
        now = utcnow()
        attachment = TicketAttachment(
            id=new_id("tatt"),
            ticket_id=ticket.id,
            author_kind="customer",
            uploaded_by=uploaded_by,
            filename=content.safe_filename(claimed_name, kind),
            content_type=kind.content_type,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            storage_key=key,
            created_at=now,
        )
        session.add(attachment)
        ticket.updated_at = now
        session.flush()
    except BaseException:
        store.delete(key)
        raise
    return attachment


def read_attachment(
    session: Session, store: AttachmentStore, ticket: Ticket, attachment_id: str
) -> tuple[TicketAttachment, bytes]:
    attachment = session.get(TicketAttachment, attachment_id)
    if attachment is None or attachment.ticket_id != ticket.id:
        raise NotFound("Attachment not found.")
    try:
        return attachment, store.get(attachment.storage_key)
    except KeyError:
        raise NotFound("Attachment not found.") from None


# -- retention, export and erasure (onetoken.rights) ------------------------------------------


@dataclass
class Removed:
    """What a purge or an erasure took out: rows, and the stored files to delete once the
    transaction has committed (a file deleted first would be lost on a rollback)."""

    tickets: int = 0
    messages: int = 0
    attachments: int = 0
    storage_keys: list[str] = field(default_factory=list)


def _remove_attachments(session: Session, rows: Sequence[TicketAttachment], out: Removed) -> None:
    out.storage_keys += [a.storage_key for a in rows]
    out.attachments += len(rows)
    ids = [a.id for a in rows]
    if ids:
        session.execute(delete(TicketAttachment).where(TicketAttachment.id.in_(ids)))


def purge_closed(
    session: Session, cutoff: datetime, *, keep_orgs: Collection[str] = ()
) -> Removed:
    """Delete tickets closed before `cutoff`, with their messages and attachments, except
    those of `keep_orgs` (under a legal hold)."""
    out = Removed()
    ids = list(
        session.scalars(
            select(Ticket.id).where(
                Ticket.status == "closed", Ticket.closed_at < cutoff,
                Ticket.org_id.not_in(list(keep_orgs)),
            )
        )
    )
    if not ids:
        return out
    _remove_attachments(
        session,
        list(session.scalars(select(TicketAttachment).where(TicketAttachment.ticket_id.in_(ids)))),
        out,
    )
    out.messages = _rowcount(
        session.execute(delete(TicketMessage).where(TicketMessage.ticket_id.in_(ids)))
    )
    out.tickets = _rowcount(session.execute(delete(Ticket).where(Ticket.id.in_(ids))))
    return out


def erase_account(session: Session, org_id: str, account_id: str) -> Removed:
    """Account cancellation: what the account submitted is erased, the processing record
    stays (docs/tickets.md).

    - tickets it opened: subject, description, every message (staff answers quote and
      address the person) and every attachment are erased, and the ticket is closed so
      the retention purge removes the rest on schedule;
    - tickets of its org opened by others: its own messages and attachments are erased.

    Ticket ids, categories, statuses and timestamps stay: they hold nothing personal once
    the account is pseudonymous, and the org keeps the record that it asked for help and
    how fast it was answered.
    """
    out = Removed()
    now = utcnow()
    opened = list(
        session.scalars(
            select(Ticket).where(Ticket.org_id == org_id, Ticket.opened_by == account_id)
        )
    )
    opened_ids = [t.id for t in opened]
    for ticket in opened:
        ticket.subject = ERASED
        ticket.description = ERASED
        if ticket.status != "closed":
            ticket.status = "closed"
            ticket.closed_at = now
        ticket.updated_at = now
    org_tickets = select(Ticket.id).where(Ticket.org_id == org_id)
    messages = list(
        session.scalars(
            select(TicketMessage).where(
                TicketMessage.ticket_id.in_(org_tickets),
                (TicketMessage.ticket_id.in_(opened_ids))
                | (
                    (TicketMessage.author_kind == "customer")
                    & (TicketMessage.author_id == account_id)
                ),
            )
        )
    )
    for message in messages:
        message.body = ERASED
    out.messages = len(messages)
    _remove_attachments(
        session,
        list(
            session.scalars(
                select(TicketAttachment).where(
                    TicketAttachment.ticket_id.in_(org_tickets),
                    (TicketAttachment.ticket_id.in_(opened_ids))
                    | (TicketAttachment.uploaded_by == account_id),
                )
            )
        ),
        out,
    )
    out.tickets = len(opened)
    session.flush()
    return out


def delete_files(store: AttachmentStore, keys: Sequence[str]) -> None:
    for key in keys:
        store.delete(key)


def export_part(session: Session, org_id: str, account_id: str) -> list[dict[str, Any]]:
    """The tickets the account opened or wrote in, whole (its org's members see them all
    anyway); attachments as metadata with the API path that downloads each, so an export
    stays one document of bounded size."""
    wrote_in = select(TicketMessage.ticket_id).where(
        TicketMessage.author_kind == "customer", TicketMessage.author_id == account_id
    )
    tickets = session.scalars(
        select(Ticket)
        .where(
            Ticket.org_id == org_id,
            (Ticket.opened_by == account_id) | Ticket.id.in_(wrote_in),
        )
        .order_by(Ticket.created_at, Ticket.id)
    )
    out = []
    for t in tickets:
        out.append(
            {
                "id": t.id,
                "subject": t.subject,
                "category": t.category,
                "description": t.description,
                "status": t.status,
                "opened_by": t.opened_by,
                "created_at": _iso(t.created_at),
                "first_staff_response_at": _iso(t.first_staff_response_at),
                "resolved_at": _iso(t.resolved_at),
                "closed_at": _iso(t.closed_at),
                "messages": [
                    {"author_kind": m.author_kind, "author_id": m.author_id, "body": m.body,
                     "created_at": _iso(m.created_at)}
                    for m in messages_of(session, t.id)
                ],
                "attachments": [
                    {"id": a.id, "filename": a.filename, "content_type": a.content_type,
                     "size_bytes": a.size_bytes, "sha256": a.sha256,
                     "uploaded_by": a.uploaded_by, "created_at": _iso(a.created_at),
                     "download": f"/api/v1/tickets/{t.id}/attachments/{a.id}"}
                    for a in attachments_of(session, t.id)
                ],
            }
        )
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
