"""Callback addresses of the caller's org and their delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response

from onetoken.kit.errors import Forbidden
from onetoken.kit.net import networks
from onetoken.security import audit
from onetoken.security.principal import Principal
from onetoken.state import AppState
from onetoken.web.deps import SessionDep, StateDep, WebhooksReadDep, WebhooksWriteDep
from onetoken.webhooks import current, service
from onetoken.webhooks.dispatcher import WebhookDispatcher
from onetoken.webhooks.models import WebhookDelivery, WebhookEndpoint
from onetoken.webhooks.schemas import (
    AttemptResponse,
    DeliveryDetail,
    DeliveryList,
    DeliveryResponse,
    EndpointCreate,
    EndpointCreated,
    EndpointList,
    EndpointResponse,
    EndpointUpdate,
    SecretRotated,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])



def _out(ep: WebhookEndpoint) -> EndpointResponse:
    return EndpointResponse(
        id=ep.id,
        org_id=ep.org_id,
        url_display=ep.url_display,
        kinds=list(ep.kinds or []),
        status=ep.status,
        platform=ep.platform,
        created_by=ep.created_by,
        created_at=ep.created_at,
        updated_at=ep.updated_at,
    )


def _delivery(d: WebhookDelivery) -> DeliveryResponse:
    return DeliveryResponse.model_validate(d, from_attributes=True)


def _dispatcher(state: AppState) -> WebhookDispatcher:
    installed = current()
    if installed is not None:
        return installed
    # A control API without a server process (tests, tools) still delivers test sends.
    cached = getattr(state, "_webhook_dispatcher", None)
    if isinstance(cached, WebhookDispatcher):
        return cached
    dispatcher = WebhookDispatcher(state.settings, state.secrets, state.session_factory)
    dispatcher.start()
    setattr(state, "_webhook_dispatcher", dispatcher)  # noqa: B010 (not a dataclass field)
    return dispatcher


def _writable(session: SessionDep, principal: Principal, endpoint_id: str) -> WebhookEndpoint:
    """An endpoint the caller may change: platform-wide ones only operators."""
    ep = service.get_endpoint(session, principal.org_id, endpoint_id)
    if ep.platform and not principal.is_operator:
        raise Forbidden("Only operators change platform-wide callback addresses.")
    return ep


def stop_test_sender(state: AppState) -> None:
    """Stop the dispatcher `_dispatcher` started for test sends, if it did."""
    cached = getattr(state, "_webhook_dispatcher", None)
    if isinstance(cached, WebhookDispatcher):
        cached.stop()
        delattr(state, "_webhook_dispatcher")


@router.post("", response_model=EndpointCreated, status_code=201)
def create_endpoint(
    body: EndpointCreate, principal: WebhooksWriteDep, session: SessionDep, state: StateDep
) -> EndpointCreated:
    """Register a callback address. The signing secret is in this response only."""
    if body.platform and not principal.is_operator:
        raise Forbidden("Only operators receive platform-wide events.")
    created = service.create_endpoint(
        session,
        state.secrets,
        org_id=principal.org_id,
        url=body.url,
        kinds=list(body.kinds),
        created_by=principal.account_id,
        allow=networks(state.settings.webhook_private_cidrs),
        platform=body.platform,
    )
    session.commit()
    ep = created.endpoint
    audit.event(principal, "admin.webhook_created", "medium", subject_id=ep.id,
                detail={"kinds": ",".join(ep.kinds), "host": ep.url_display})
    return EndpointCreated(**_out(ep).model_dump(), secret=created.secret)


@router.get("", response_model=EndpointList)
def list_endpoints(principal: WebhooksReadDep, session: SessionDep) -> EndpointList:
    return EndpointList(data=[_out(e) for e in service.list_endpoints(session, principal.org_id)])


@router.get("/deliveries", response_model=DeliveryList)
def list_deliveries(
    principal: WebhooksReadDep,
    session: SessionDep,
    endpoint_id: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: datetime | None = None,
) -> DeliveryList:
    """The delivery log of the org, newest first (metadata only)."""
    rows = service.list_deliveries(
        session, principal.org_id, endpoint_id=endpoint_id, limit=limit, before=before
    )
    return DeliveryList(data=[_delivery(d) for d in rows])


@router.get("/deliveries/{delivery_id}", response_model=DeliveryDetail)
def get_delivery(
    delivery_id: str, principal: WebhooksReadDep, session: SessionDep
) -> DeliveryDetail:
    d = service.get_delivery(session, principal.org_id, delivery_id)
    attempts = [
        AttemptResponse(attempt=a.attempt, status_code=a.status_code, latency_ms=a.latency_ms,
                        error=a.error, created_at=a.created_at)
        for a in service.attempts_of(session, d.id)
    ]
    return DeliveryDetail(**_delivery(d).model_dump(), attempt_log=attempts)


@router.get("/{endpoint_id}", response_model=EndpointResponse)
def get_endpoint(
    endpoint_id: str, principal: WebhooksReadDep, session: SessionDep
) -> EndpointResponse:
    return _out(service.get_endpoint(session, principal.org_id, endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointResponse)
def update_endpoint(
    endpoint_id: str,
    body: EndpointUpdate,
    principal: WebhooksWriteDep,
    session: SessionDep,
    state: StateDep,
) -> EndpointResponse:
    ep = _writable(session, principal, endpoint_id)
    before = {"kinds": list(ep.kinds), "status": ep.status, "host": ep.url_display}
    service.update_endpoint(
        session,
        state.secrets,
        ep,
        url=body.url,
        kinds=list(body.kinds) if body.kinds is not None else None,
        status=body.status,
        allow=networks(state.settings.webhook_private_cidrs),
    )
    session.commit()
    audit.change(principal, "admin.webhook_changed", subject_id=ep.id, before=before,
                 after={"kinds": list(ep.kinds), "status": ep.status, "host": ep.url_display})
    return _out(ep)


@router.post("/{endpoint_id}/rotate-secret", response_model=SecretRotated)
def rotate_secret(
    endpoint_id: str, principal: WebhooksWriteDep, session: SessionDep, state: StateDep
) -> SecretRotated:
    """A new signing secret (shown once); the old one stops signing at once."""
    ep = _writable(session, principal, endpoint_id)
    secret = service.rotate_secret(session, state.secrets, ep)
    session.commit()
    audit.event(principal, "admin.webhook_secret_rotated", "medium", subject_id=ep.id)
    return SecretRotated(id=ep.id, secret=secret)


@router.delete("/{endpoint_id}", status_code=204)
def delete_endpoint(endpoint_id: str, principal: WebhooksWriteDep, session: SessionDep) -> Response:
    ep = _writable(session, principal, endpoint_id)
    service.delete_endpoint(session, ep)
    session.commit()
    audit.event(principal, "admin.webhook_deleted", "medium", subject_id=endpoint_id)
    return Response(status_code=204)


@router.post("/{endpoint_id}/test", response_model=DeliveryDetail, status_code=202)
def send_test(
    endpoint_id: str, principal: WebhooksWriteDep, session: SessionDep, state: StateDep
) -> DeliveryDetail:
    """Queue a `webhook_test` event for sending now and answer with the pending delivery
    at once (the attempt runs on the delivery workers, never on this request; follow it
    at `GET /webhooks/deliveries/{id}`). A failed test is retried like any delivery."""
    ep = _writable(session, principal, endpoint_id)
    if ep.status != "active":
        raise Forbidden("The callback address is disabled.", code="endpoint_disabled")
    d = _dispatcher(state).test_delivery(session, ep)
    audit.event(principal, "admin.webhook_tested", "info", subject_id=ep.id)
    return get_delivery(d.id, principal, session)
