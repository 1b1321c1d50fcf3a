"""Request and response bodies of the tickets API (docs/tickets.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Category = Literal["billing", "technical", "account", "security", "privacy", "other"]
Status = Literal["open", "waiting_on_staff", "waiting_on_customer", "resolved", "closed"]
# What a customer may set: resolve, close, or reopen a resolved ticket.
CustomerStatus = Literal["open", "resolved", "closed"]

MAX_TEXT = 20_000


class TicketCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=200)
    category: Category
    description: str = Field(min_length=1, max_length=MAX_TEXT)


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    body: str = Field(min_length=1, max_length=MAX_TEXT)


class CustomerStatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: CustomerStatus


class StaffStatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Status


class TicketResponse(BaseModel):
    id: str
    org_id: str
    opened_by: str | None
    subject: str
    category: str
    status: str
    created_at: datetime
    updated_at: datetime
    last_message_at: datetime
    first_staff_response_at: datetime | None
    resolved_at: datetime | None
    closed_at: datetime | None
    message_count: int
    attachment_count: int


class TicketList(BaseModel):
    data: list[TicketResponse]
    has_more: bool


class MessageResponse(BaseModel):
    id: str
    ticket_id: str
    author_kind: str
    author_id: str | None
    body: str
    created_at: datetime


class AttachmentResponse(BaseModel):
    id: str
    ticket_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    author_kind: str
    uploaded_by: str | None
    created_at: datetime


class TicketDetail(TicketResponse):
    description: str
    messages: list[MessageResponse]
    attachments: list[AttachmentResponse]
