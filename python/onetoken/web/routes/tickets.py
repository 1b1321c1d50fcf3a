"""Work orders (docs/tickets.md): an org's own tickets for its members, and the queue
across orgs for staff, each staff access written to the security log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from onetoken.kit.errors import ErrorResponse
from onetoken.security import audit
from onetoken.security.principal import Principal
from onetoken.state import AppState
from onetoken.tickets import content, service
from onetoken.tickets.models import Ticket, TicketAttachment, TicketMessage
from onetoken.tickets.schemas import (
    AttachmentResponse,
    Category,
    CustomerStatusChange,
    MessageCreate,
    MessageResponse,
    StaffStatusChange,
    Status,
    TicketCreate,
    TicketDetail,
    TicketList,
    TicketResponse,
)
from onetoken.tickets.store import AttachmentStore, open_store
from onetoken.web.deps import (
    SessionDep,
    StateDep,
    TicketsReadDep,
    TicketsStaffDep,
    TicketsWriteDep,
)

router = APIRouter(
    prefix="/tickets",
    tags=["tickets"],
    responses={
        413: {"model": ErrorResponse, "description": "Attachment too large."},
        415: {"model": ErrorResponse, "description": "Attachment type not accepted."},
    },
)

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_DOWNLOAD: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file, as an attachment, with the type checked at upload.",
        "content": {k.content_type.split(";")[0]: _BINARY for k in content.KINDS},
    }
}
_UPLOAD: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The file's bytes (the type is decided from them, not from any header).",
        "content": {"application/octet-stream": _BINARY},
    }
}
# Statuses the staff queue shows when none is asked for: everything not yet closed.
_QUEUE_DEFAULT = ("open", "waiting_on_staff", "waiting_on_customer", "resolved")

Limit = Annotated[int, Query(ge=1, le=200)]


def _store(state: AppState) -> AttachmentStore:
    return open_store(state.settings.ticket_store_dir)


def _summary(ticket: Ticket, counts: tuple[int, int]) -> TicketResponse:
    return TicketResponse(
        id=ticket.id,
        org_id=ticket.org_id,
        opened_by=ticket.opened_by,
        subject=ticket.subject,
        category=ticket.category,
        status=ticket.status,
        created_at=ticket.created_at,
        updated_at=ticket.updated_at,
        last_message_at=ticket.last_message_at,
        first_staff_response_at=ticket.first_staff_response_at,
        resolved_at=ticket.resolved_at,
        closed_at=ticket.closed_at,
        message_count=counts[0],
        attachment_count=counts[1],
    )


def _message(m: TicketMessage) -> MessageResponse:
    return MessageResponse.model_validate(m, from_attributes=True)


def _attachment(a: TicketAttachment) -> AttachmentResponse:
    return AttachmentResponse.model_validate(a, from_attributes=True)


def _detail(session: Session, ticket: Ticket) -> TicketDetail:
    messages = service.messages_of(session, ticket.id)
    attachments = service.attachments_of(session, ticket.id)
    return TicketDetail(
        **_summary(ticket, (len(messages), len(attachments))).model_dump(),
        description=ticket.description,
        messages=[_message(m) for m in messages],
        attachments=[_attachment(a) for a in attachments],
    )


def _page(session: Session, rows: list[Ticket], has_more: bool) -> TicketList:
    counts = service.counts(session, [t.id for t in rows])
    return TicketList(data=[_summary(t, counts[t.id]) for t in rows], has_more=has_more)


def _download(attachment: TicketAttachment, data: bytes) -> Response:
    return Response(
        content=data,
        media_type=attachment.content_type,
        headers={
            "Content-Disposition": content.content_disposition(attachment.filename),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
            # Opened in a tab anyway, the file can run nothing and load nothing.
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over `limit`: a declared length
    over it is refused unread, and a longer stream is cut while it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise service.AttachmentTooLarge(f"Attachments are limited to {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise service.AttachmentTooLarge(f"Attachments are limited to {limit} bytes.")
    return bytes(body)


def _staff_event(principal: Principal, kind: str, ticket: Ticket, **detail: str) -> None:
    """Staff touching a customer's ticket: recorded in that org's security log."""
    audit.event(principal, kind, "medium", subject_id=ticket.id, org_id=ticket.org_id,
                detail={"category": ticket.category, **detail})


# -- the org's own tickets ---------------------------------------------------------------------


@router.get("", response_model=TicketList)
def list_tickets(
    principal: TicketsReadDep,
    session: SessionDep,
    status: Status | None = None,
    category: Category | None = None,
    limit: Limit = 50,
    before: datetime | None = None,
) -> TicketList:
    """The org's tickets, newest first (`before`: the `created_at` of the last one seen)."""
    rows, more = service.list_tickets(
        session, org_id=principal.org_id, statuses=[status] if status else None,
        category=category, limit=limit, before=before,
    )
    return _page(session, rows, more)


@router.post("", response_model=TicketDetail, status_code=201)
def open_ticket(
    body: TicketCreate, principal: TicketsWriteDep, session: SessionDep
) -> TicketDetail:
    """Open a ticket; attach files to it with POST /tickets/{ticket_id}/attachments."""
    ticket = service.create(
        session, org_id=principal.org_id, opened_by=principal.account_id,
        subject=body.subject, category=body.category, description=body.description,
    )
    session.commit()
    audit.event(principal, "ticket.opened", "info", subject_id=ticket.id,
                detail={"category": ticket.category})
    return _detail(session, ticket)


# -- staff: the queue across orgs (before /{ticket_id}, which would match "staff") -----------


@router.get("/staff/queue", response_model=TicketList)
def staff_queue(
    principal: TicketsStaffDep,
    session: SessionDep,
    status: Status | None = None,
    category: Category | None = None,
    org_id: Annotated[str | None, Query(max_length=32)] = None,
    limit: Limit = 50,
    before: datetime | None = None,
) -> TicketList:
    """Every org's tickets, newest first; without `status`, those not closed."""
    rows, more = service.list_tickets(
        session, org_id=org_id, statuses=[status] if status else _QUEUE_DEFAULT,
        category=category, limit=limit, before=before,
    )
    return _page(session, rows, more)


@router.get("/staff/{ticket_id}", response_model=TicketDetail)
def staff_get(ticket_id: str, principal: TicketsStaffDep, session: SessionDep) -> TicketDetail:
    ticket = service.get(session, ticket_id, None)
    _staff_event(principal, "ticket.staff_read", ticket)
    return _detail(session, ticket)


@router.post("/staff/{ticket_id}/messages", response_model=MessageResponse, status_code=201)
def staff_answer(
    ticket_id: str, body: MessageCreate, principal: TicketsStaffDep, session: SessionDep
) -> MessageResponse:
    ticket = service.get(session, ticket_id, None)
    message = service.add_message(
        session, ticket, staff=True, author_id=principal.account_id, body=body.body
    )
    session.commit()
    _staff_event(principal, "ticket.staff_answered", ticket)
    return _message(message)


@router.post("/staff/{ticket_id}/status", response_model=TicketResponse)
def staff_status(
    ticket_id: str, body: StaffStatusChange, principal: TicketsStaffDep, session: SessionDep
) -> TicketResponse:
    ticket = service.get(session, ticket_id, None)
    before = ticket.status
    service.set_status(session, ticket, body.status, staff=True)
    session.commit()
    _staff_event(principal, "ticket.staff_status", ticket, status_before=before,
                 status_after=ticket.status)
    return _summary(ticket, service.counts(session, [ticket.id])[ticket.id])


@router.get(
    "/staff/{ticket_id}/attachments/{attachment_id}",
    response_class=Response,
    responses=_DOWNLOAD,
)
def staff_download(
    ticket_id: str,
    attachment_id: str,
    principal: TicketsStaffDep,
    session: SessionDep,
    state: StateDep,
) -> Response:
    ticket = service.get(session, ticket_id, None)
    attachment, data = service.read_attachment(session, _store(state), ticket, attachment_id)
    _staff_event(principal, "ticket.staff_download", ticket, attachment_id=attachment.id)
    return _download(attachment, data)


# -- one ticket of the org ---------------------------------------------------------------------


@router.get("/{ticket_id}", response_model=TicketDetail)
def get_ticket(ticket_id: str, principal: TicketsReadDep, session: SessionDep) -> TicketDetail:
    return _detail(session, service.get(session, ticket_id, principal.org_id))


@router.post("/{ticket_id}/messages", response_model=MessageResponse, status_code=201)
def add_message(
    ticket_id: str, body: MessageCreate, principal: TicketsWriteDep, session: SessionDep
) -> MessageResponse:
    ticket = service.get(session, ticket_id, principal.org_id)
    message = service.add_message(
        session, ticket, staff=False, author_id=principal.account_id, body=body.body
    )
    session.commit()
    return _message(message)


@router.post("/{ticket_id}/status", response_model=TicketResponse)
def set_status(
    ticket_id: str, body: CustomerStatusChange, principal: TicketsWriteDep, session: SessionDep
) -> TicketResponse:
    """Resolve or close the ticket, or reopen (`open`) a resolved one."""
    ticket = service.get(session, ticket_id, principal.org_id)
    service.set_status(session, ticket, body.status, staff=False)
    session.commit()
    return _summary(ticket, service.counts(session, [ticket.id])[ticket.id])


@router.post(
    "/{ticket_id}/attachments",
    response_model=AttachmentResponse,
    status_code=201,
    openapi_extra=_UPLOAD,
)
async def upload_attachment(
    ticket_id: str,
    request: Request,
    principal: TicketsWriteDep,
    session: SessionDep,
    state: StateDep,
    filename: Annotated[str, Query(min_length=1, max_length=255)] = "attachment",
) -> AttachmentResponse:
    """Attach a file: the request body is the file. PNG, JPEG, GIF, WebP, PDF or plain
    UTF-8 text, decided from the bytes; the name only labels the download."""
    settings = state.settings
    ticket = await run_in_threadpool(service.get, session, ticket_id, principal.org_id)
    if ticket.status == "closed":
        raise service.TicketClosed("This ticket is closed; open a new one.")
    data = await _read_capped(request, settings.ticket_attachment_max_bytes)

    def store() -> AttachmentResponse:
        attachment = service.add_attachment(
            session, _store(state), ticket, data, claimed_name=filename,
            uploaded_by=principal.account_id, max_bytes=settings.ticket_attachment_max_bytes,
            max_count=settings.ticket_attachments_max,
        )
        session.commit()
        return _attachment(attachment)

    out = await run_in_threadpool(store)
    audit.event(principal, "ticket.attachment_added", "info", subject_id=ticket.id,
                detail={"content_type": out.content_type, "size_bytes": out.size_bytes})
    return out


@router.get(
    "/{ticket_id}/attachments/{attachment_id}", response_class=Response, responses=_DOWNLOAD
)
def download_attachment(
    ticket_id: str,
    attachment_id: str,
    principal: TicketsReadDep,
    session: SessionDep,
    state: StateDep,
) -> Response:
    ticket = service.get(session, ticket_id, principal.org_id)
    attachment, data = service.read_attachment(session, _store(state), ticket, attachment_id)
    return _download(attachment, data)
