"""Request and response bodies of the webhooks API (never a secret except on create and
rotate, never the full URL: it may embed a token)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from onetoken.webhooks.events import EventKind


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    kinds: list[EventKind] = Field(min_length=1, max_length=16)
    # Operators only: also receive platform-wide events (system alarms without an org).
    platform: bool = False


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    kinds: list[EventKind] | None = Field(default=None, min_length=1, max_length=16)
    status: Literal["active", "disabled"] | None = None


class EndpointResponse(BaseModel):
    id: str
    org_id: str
    url_display: str
    kinds: list[str]
    status: str
    platform: bool
    created_by: str | None
    created_at: datetime
    updated_at: datetime | None


class EndpointCreated(EndpointResponse):
    # Shown once: the signing secret (docs/webhooks.md).
    secret: str


class SecretRotated(BaseModel):
    id: str
    secret: str


class EndpointList(BaseModel):
    data: list[EndpointResponse]


class AttemptResponse(BaseModel):
    attempt: int
    status_code: int | None
    latency_ms: int
    error: str | None
    created_at: datetime


class DeliveryResponse(BaseModel):
    id: str
    endpoint_id: str
    event_id: str
    kind: str
    status: str
    attempts: int
    last_status_code: int | None
    last_latency_ms: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None


class DeliveryDetail(DeliveryResponse):
    attempt_log: list[AttemptResponse]


class DeliveryList(BaseModel):
    data: list[DeliveryResponse]
