"""Callback addresses (CRUD) and the delivery log.

Every function takes the caller's org id and answers another org's rows exactly like
missing ones. Secrets and URLs are encrypted at rest; the secret is returned only by
create and rotate, once.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.db.session import get_scoped
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import NotFound, Unprocessable
from onetoken.kit.net import IpNetwork
from onetoken.security.net import url_target_refused
from onetoken.webhooks.events import EVENT_KINDS
from onetoken.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from onetoken.webhooks.signing import generate_secret

MAX_ENDPOINTS_PER_ORG = 20
MAX_URL_LEN = 2048
_NOT_PUBLIC = "The URL must point to a public address."
INTERNAL_SUFFIXES = (".localhost", ".local", ".internal")


def check_url(url: str, *, allow: Sequence[IpNetwork]) -> str:
    """Validate a callback URL; returns its display form (scheme://host[:port]).

    The host must be public, or inside ONETOKEN_WEBHOOK_PRIVATE_CIDRS (`allow`): an
    address literal is judged as is, a name by what it resolves to now (delivery checks
    again, on the address it connects to). Messages are fixed texts: the URL may carry a
    token and is never echoed."""
    if len(url) > MAX_URL_LEN:
        raise Unprocessable("The URL is too long.", param="url")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise Unprocessable("The URL is malformed.", param="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unprocessable("The URL must be http(s)://host/...", param="url")
    if parts.username is not None or parts.password is not None:
        raise Unprocessable("Credentials in the URL are not accepted.", param="url")
    if parts.fragment:
        raise Unprocessable("The URL must not have a fragment.", param="url")
    host = parts.hostname
    # Names that are internal by convention are refused even when they do not resolve
    # here; with an allow-list, what a name resolves to decides.
    if not allow and (host == "localhost" or host.endswith(INTERNAL_SUFFIXES)):
        raise Unprocessable(_NOT_PUBLIC, param="url")
    if url_target_refused(url, allow):
        raise Unprocessable(_NOT_PUBLIC, param="url")
    shown_host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown_host}" + (f":{port}" if port else "")


def check_kinds(kinds: Sequence[str]) -> list[str]:
    unknown = [k for k in kinds if k not in EVENT_KINDS]
    if unknown or not kinds:
        raise Unprocessable(
            "kinds must be a non-empty list of: " + ", ".join(EVENT_KINDS), param="kinds"
        )
    return sorted(set(kinds))


@dataclass(frozen=True, slots=True)
class Created:
    endpoint: WebhookEndpoint
    secret: str


def create_endpoint(
    session: Session,
    secrets: Secrets,
    *,
    org_id: str,
    url: str,
    kinds: Sequence[str],
    created_by: str,
    allow: Sequence[IpNetwork],
    platform: bool = False,
) -> Created:
    display = check_url(url, allow=allow)
    count = len(list_endpoints(session, org_id))
    if count >= MAX_ENDPOINTS_PER_ORG:
        raise Unprocessable("Too many callback addresses for this organization.")
    secret = generate_secret()
    endpoint = WebhookEndpoint(
        id=new_id("whk"),
        org_id=org_id,
        url_encrypted=secrets.encrypt(url.strip()),
        url_display=display,
        kinds=check_kinds(kinds),
        secret_encrypted=secrets.encrypt(secret),
        status="active",
        platform=platform,
        created_by=created_by,
    )
    session.add(endpoint)
    session.flush()
    return Created(endpoint, secret)


def list_endpoints(session: Session, org_id: str) -> list[WebhookEndpoint]:
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.org_id == org_id)
            .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        )
    )


def get_endpoint(session: Session, org_id: str, endpoint_id: str) -> WebhookEndpoint:
    return get_scoped(
        session, WebhookEndpoint, endpoint_id, (org_id,), "Callback address not found."
    )


def update_endpoint(
    session: Session,
    secrets: Secrets,
    endpoint: WebhookEndpoint,
    *,
    url: str | None,
    kinds: Sequence[str] | None,
    status: str | None,
    allow: Sequence[IpNetwork],
) -> None:
    if url is not None:
        endpoint.url_display = check_url(url, allow=allow)
        endpoint.url_encrypted = secrets.encrypt(url.strip())
    if kinds is not None:
        endpoint.kinds = check_kinds(kinds)
    if status is not None:
        endpoint.status = status
    endpoint.updated_at = utcnow()
    session.flush()


def rotate_secret(session: Session, secrets: Secrets, endpoint: WebhookEndpoint) -> str:
    secret = generate_secret()
    endpoint.secret_encrypted = secrets.encrypt(secret)
    endpoint.updated_at = utcnow()
    session.flush()
    return secret


def delete_endpoint(session: Session, endpoint: WebhookEndpoint) -> None:
    """The endpoint and its pending payloads go; the delivery log (metadata) stays until
    its retention period ends."""
    now = utcnow()
    for d in session.scalars(
        select(WebhookDelivery).where(
            WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == "pending"
        )
    ):
        d.status = "failed"
        d.payload = None
        d.last_error = "endpoint_deleted"
        d.finished_at = now
        d.next_attempt_at = None
    session.delete(endpoint)
    session.flush()


def list_deliveries(
    session: Session,
    org_id: str,
    *,
    endpoint_id: str | None = None,
    limit: int = 100,
    before: datetime | None = None,
) -> list[WebhookDelivery]:
    q = select(WebhookDelivery).where(WebhookDelivery.org_id == org_id)
    if endpoint_id is not None:
        q = q.where(WebhookDelivery.endpoint_id == endpoint_id)
    if before is not None:
        q = q.where(WebhookDelivery.created_at < before)
    q = q.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit)
    return list(session.scalars(q))


def get_delivery(session: Session, org_id: str, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.org_id != org_id:
        raise NotFound("Delivery not found.")
    return delivery


def attempts_of(session: Session, delivery_id: str) -> list[WebhookAttempt]:
    return list(
        session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.attempt)
        )
    )


def purge_log(session: Session, before: datetime, *, keep_orgs: Collection[str] = ()) -> int:
    """Delete finished deliveries (and their attempts) created before `before`, except
    those of `keep_orgs` (under a legal hold)."""
    ids = list(
        session.scalars(
            select(WebhookDelivery.id).where(
                WebhookDelivery.created_at < before, WebhookDelivery.status != "pending",
                WebhookDelivery.org_id.not_in(list(keep_orgs)),
            )
        )
    )
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(chunk)))
        session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(chunk)))
    return len(ids)
