"""Turns events into deliveries and delivers them: signed POSTs, retried with
exponential backoff, every attempt in the delivery log.

Events are persisted as delivery rows before any attempt, so a restart loses nothing
queued in the DB; a delivery is claimed with a conditional update (a lease), so several
server processes sharing one control DB never send the same attempt twice.

A poller thread hands due deliveries to a bounded pool of workers, at most one attempt per
endpoint and half the workers per org at a time, and every attempt has one deadline for
all of it: a slow or dripping
receiver holds one worker for at most ONETOKEN_WEBHOOK_TIMEOUT_SECONDS and delays only its
own endpoint's deliveries. An attempt resolves the target once, checks every address, and
connects only to a checked one (the name stays in Host and TLS SNI), so DNS cannot point a
delivery at an address the check refused.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from onetoken import __version__
from onetoken.db.base import new_id, utcnow
from onetoken.db.session import SessionFactory
from onetoken.kit.crypto import DecryptionError, Secrets
from onetoken.kit.net import IpAddress, IpNetwork, networks
from onetoken.kit.worker import LoopThread
from onetoken.security.net import AddressRefused, Resolver, resolve_checked
from onetoken.webhooks.events import Scalar, clean_data, envelope, new_event_id, normalize_kind
from onetoken.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from onetoken.webhooks.signing import SIGNATURE_HEADER, header_value

log = logging.getLogger("onetoken.webhooks")

# How long a claimed delivery is hidden from other workers beyond its attempt's deadline.
_LEASE_MARGIN_S = 60.0
_QUEUE_CAP = 10_000


class WebhookSettings(Protocol):
    webhook_max_attempts: int
    webhook_backoff_base_seconds: float
    webhook_backoff_max_seconds: float
    webhook_timeout_seconds: float
    webhook_poll_interval_seconds: float
    webhook_workers: int
    webhook_private_cidrs: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: HTTP status (None when no response), latency, error class."""

    ok: bool
    status_code: int | None
    latency_ms: int
    error: str | None


def backoff_seconds(settings: WebhookSettings, attempts: int) -> float:
    """Delay before attempt `attempts + 1`: base * 2^(attempts-1), capped, +-20% jitter."""
    raw = settings.webhook_backoff_base_seconds * 2 ** max(0, min(attempts - 1, 30))
    return float(min(settings.webhook_backoff_max_seconds, raw) * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)


def _error_class(exc: Exception) -> str:
    if isinstance(exc, AddressRefused):
        return "target_not_allowed"
    if isinstance(exc, httpcore.TimeoutException):
        return "timeout"
    if isinstance(exc, (httpcore.ConnectError, OSError)):
        return "connect_error"  # OSError: the name did not resolve
    if isinstance(exc, (httpcore.NetworkError, httpcore.ProtocolError)):
        return "http_error"
    if isinstance(exc, DecryptionError):
        return "secret_unreadable"
    return "internal_error"


class _Deadline:
    """The time left of one attempt, as the timeout of its next network operation."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self, timeout: float | None, expired: type[httpcore.TimeoutException]) -> float:
        remaining = self._end - time.monotonic()
        if remaining <= 0:
            raise expired("attempt deadline passed")
        return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the attempt's deadline (httpcore's
    own timeouts are per operation: a receiver sending a byte at a time never trips them)."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, self._deadline.left(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


# httpcore's socket option shape (setsockopt arguments).
_SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses only, whatever name the URL carries (httpcore
    still sends that name as Host and TLS SNI, and verifies the certificate against it)."""

    def __init__(self, addresses: Sequence[IpAddress], deadline: _Deadline) -> None:
        self._addresses = addresses
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        failure: Exception = httpcore.ConnectError("no address")
        for address in self._addresses:
            try:
                stream = self._inner.connect_tcp(
                    str(address),
                    port,
                    self._deadline.left(timeout, httpcore.ConnectTimeout),
                    local_address,
                    socket_options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("not a network target")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how one attempt goes: the address check and the deadline."""

    allow: Sequence[IpNetwork]
    deadline_s: float
    ssl_context: ssl.SSLContext
    resolver: Resolver | None = None


def send(
    target: Target,
    url: str,
    secret: str,
    body: bytes,
    *,
    delivery_id: str,
    event_id: str,
    kind: str,
    attempt: int,
) -> Outcome:
    """POST one signed delivery, all of it within `target.deadline_s`. The response body
    is never read or kept."""
    start = time.perf_counter()
    deadline = _Deadline(target.deadline_s)
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = _resolve_by(deadline, parts.hostname or "", port, target)
        headers: dict[bytes | str, bytes | str] = {
            "content-type": "application/json",
            "user-agent": f"onetoken-webhooks/{__version__}",
            SIGNATURE_HEADER: header_value(secret, body),
            "onetoken-event-id": event_id,
            "onetoken-event-type": kind,
            "onetoken-delivery-id": delivery_id,
            "onetoken-delivery-attempt": str(attempt),
        }
        per_op = {k: target.deadline_s for k in ("connect", "read", "write", "pool")}
        # A pool per attempt: a connection is never reused for another endpoint's name.
        with httpcore.ConnectionPool(
            ssl_context=target.ssl_context,
            network_backend=_PinnedBackend(addresses, deadline),
            max_connections=1,
        ) as pool, pool.stream(
            "POST", url, headers=headers, content=body, extensions={"timeout": per_op}
        ) as response:
            status = response.status
    except Exception as exc:
        return Outcome(False, None, _ms(start), _error_class(exc))
    ok = 200 <= status < 300
    return Outcome(ok, status, _ms(start), None if ok else f"http_{status}")


class ResponseTooLarge(Exception):
    """An answer longer than the caller's limit (its rest is never read)."""


def fetch(
    target: Target,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    body: bytes | None = None,
    max_bytes: int = 1 << 20,
) -> tuple[int, bytes]:
    """One request on a tenant's behalf to a URL the tenant chose (an org's identity
    provider, onetoken.sso): the same address check, pinning and deadline as a delivery.
    Returns the status and at most `max_bytes` of the body (ResponseTooLarge beyond);
    raises AddressRefused, httpcore's errors and OSError like `send` sees them."""
    deadline = _Deadline(target.deadline_s)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve_by(deadline, parts.hostname or "", port, target)
    per_op = {k: target.deadline_s for k in ("connect", "read", "write", "pool")}
    sent: dict[bytes | str, bytes | str] = {"user-agent": f"onetoken/{__version__}"}
    sent.update(headers)
    with httpcore.ConnectionPool(
        ssl_context=target.ssl_context,
        network_backend=_PinnedBackend(addresses, deadline),
        max_connections=1,
    ) as pool, pool.stream(
        method, url, headers=sent,
        content=body, extensions={"timeout": per_op},
    ) as response:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_stream():
            size += len(chunk)
            if size > max_bytes:
                raise ResponseTooLarge
            chunks.append(chunk)
        return response.status, b"".join(chunks)


def _resolve_by(deadline: _Deadline, host: str, port: int, target: Target) -> list[IpAddress]:
    """resolve_checked, given up at the deadline: getaddrinfo has no timeout, and a
    tenant's DNS server may answer slowly on purpose. A lookup given up on finishes in
    its own thread and is dropped."""
    found: list[IpAddress] = []
    failed: list[Exception] = []

    def lookup() -> None:
        try:
            found.extend(resolve_checked(host, port, target.allow, target.resolver))
        except Exception as exc:
            failed.append(exc)

    thread = threading.Thread(target=lookup, name="onetoken-webhook-resolve", daemon=True)
    thread.start()
    thread.join(deadline.left(None, httpcore.ConnectTimeout))
    if thread.is_alive():
        raise httpcore.ConnectTimeout("name resolution passed the attempt deadline")
    if failed:
        raise failed[0]
    return found


def _ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


@dataclass(frozen=True, slots=True)
class _Job:
    """What a worker needs for one attempt, read before any network work."""

    delivery_id: str
    url: str
    secret: str
    payload: bytes
    event_id: str
    kind: str
    attempt: int


class WebhookDispatcher:
    def __init__(
        self,
        settings: WebhookSettings,
        secrets: Secrets,
        session_factory: SessionFactory,
        *,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.session_factory = session_factory
        self.target = Target(
            allow=networks(settings.webhook_private_cidrs),
            deadline_s=settings.webhook_timeout_seconds,
            ssl_context=httpx.create_ssl_context(),
            resolver=resolver,
        )
        self._queue: deque[tuple[str, str, dict[str, Scalar]]] = deque()
        self._lock = threading.Lock()
        self._worker = LoopThread("onetoken-webhooks", self._loop)
        self._workers: ThreadPoolExecutor | None = None
        # Endpoint id -> its org, for the attempts running in this process: one per
        # endpoint, at most `_per_org` per org (an org's many slow endpoints cannot take
        # every worker from the other orgs).
        self._busy: dict[str, str] = {}
        self._per_org = max(1, settings.webhook_workers // 2)
        self.events_emitted = 0
        self.events_dropped = 0
        self.attempts_made = 0

    # -- producing ----------------------------------------------------------------------

    def submit(self, org_id: str, kind: str, data: dict[str, Scalar]) -> None:
        """Queue an event (the worker persists it at once); without a running worker the
        event is persisted in the caller's thread."""
        if not self._worker.running:
            self.persist([(org_id, kind, data)])
            return
        with self._lock:
            if len(self._queue) >= _QUEUE_CAP:
                self.events_dropped += 1
                log.error("webhooks.queue_full", extra={"org_id": org_id, "kind": kind})
                return
            self._queue.append((org_id, kind, data))
        self._worker.wake.set()

    def persist(self, events: list[tuple[str, str, dict[str, Scalar]]]) -> list[str]:
        """Write one delivery row per subscribed active endpoint; returns delivery ids."""
        created: list[str] = []
        now = utcnow()
        with self.session_factory() as session:
            for org_id, kind, data in events:
                endpoints = _subscribers(session, org_id, kind)
                if not endpoints:
                    continue
                event_id = new_event_id()
                body = envelope(event_id, kind, org_id, data).decode()
                for ep in endpoints:
                    delivery = _due_delivery(ep, event_id, kind, body, now)
                    session.add(delivery)
                    created.append(delivery.id)
            session.commit()
        self.events_emitted += len(events)
        if created:
            self._worker.wake.set()
        return created

    def test_delivery(self, session: Session, endpoint: WebhookEndpoint) -> WebhookDelivery:
        """A `webhook_test` event for one endpoint, due at once: the workers send it (and
        retry it like any delivery), never the caller's thread. The caller's session is
        committed."""
        from onetoken.webhooks.events import TEST_KIND

        event_id = new_event_id()
        body = envelope(event_id, TEST_KIND, endpoint.org_id, {"endpoint_id": endpoint.id})
        delivery = _due_delivery(endpoint, event_id, TEST_KIND, body.decode(), utcnow())
        session.add(delivery)
        session.commit()
        self._worker.wake.set()
        return delivery

    # -- delivering ---------------------------------------------------------------------

    def hand_out_due(self) -> int:
        """Give due deliveries to idle workers: the oldest due one of each endpoint that
        has no attempt running, oldest first, while workers are idle and the endpoint's
        org is under its share. Returns how many."""
        workers = self._workers
        if workers is None:
            return 0
        busy, full_orgs = self._occupied()
        free = self.settings.webhook_workers - len(busy)
        if free <= 0:
            return 0
        per_org = Counter(busy.values())
        now = utcnow()
        due = (
            WebhookDelivery.status == "pending",
            or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now),
        )
        handed = 0
        with self.session_factory() as session:
            endpoints = select(WebhookDelivery.endpoint_id, WebhookDelivery.org_id).where(*due)
            if busy:
                endpoints = endpoints.where(WebhookDelivery.endpoint_id.not_in(busy))
            if full_orgs:
                endpoints = endpoints.where(WebhookDelivery.org_id.not_in(full_orgs))
            endpoints = endpoints.group_by(
                WebhookDelivery.endpoint_id, WebhookDelivery.org_id
            ).order_by(func.min(WebhookDelivery.next_attempt_at))
            for endpoint_id, org_id in session.execute(endpoints).all():
                if handed >= free:
                    break
                if per_org[org_id] >= self._per_org:
                    continue
                delivery = session.scalars(
                    select(WebhookDelivery)
                    .where(WebhookDelivery.endpoint_id == endpoint_id, *due)
                    .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at)
                    .limit(1)
                ).first()
                if delivery is None or not self._claim(session, delivery, now):
                    continue
                with self._lock:
                    self._busy[endpoint_id] = org_id
                per_org[org_id] += 1
                workers.submit(self._deliver, delivery.id, endpoint_id)
                handed += 1
        return handed

    def _occupied(self) -> tuple[dict[str, str], set[str]]:
        """The endpoints with an attempt running, and the orgs at their share."""
        with self._lock:
            busy = dict(self._busy)
        per_org = Counter(busy.values())
        return busy, {org for org, n in per_org.items() if n >= self._per_org}

    def _claim(self, session: Session, delivery: WebhookDelivery, now: datetime) -> bool:
        lease = now + timedelta(seconds=self.settings.webhook_timeout_seconds + _LEASE_MARGIN_S)
        result = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery.id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == delivery.attempts,
                or_(
                    WebhookDelivery.next_attempt_at.is_(None),
                    WebhookDelivery.next_attempt_at <= now,
                ),
            )
            .values(next_attempt_at=lease)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return getattr(result, "rowcount", 0) == 1

    def _deliver(self, delivery_id: str, endpoint_id: str) -> None:
        """One attempt, on a worker: read what it needs, send with no DB session open,
        record the outcome."""
        try:
            with self.session_factory() as session:
                job = self._prepare(session, delivery_id)
                session.commit()
            if job is None:
                return
            try:
                url = self.secrets.decrypt(job.url)
                secret = self.secrets.decrypt(job.secret)
            except DecryptionError:
                outcome = Outcome(False, None, 0, "secret_unreadable")
            else:
                outcome = send(
                    self.target,
                    url,
                    secret,
                    job.payload,
                    delivery_id=job.delivery_id,
                    event_id=job.event_id,
                    kind=job.kind,
                    attempt=job.attempt,
                )
            with self.session_factory() as session:
                self._record(session, job, outcome)
                session.commit()
        except Exception as exc:
            log.error("webhooks.worker_failed", extra={"exc_type": type(exc).__name__})
        finally:
            with self._lock:
                self._busy.pop(endpoint_id, None)
            self._worker.wake.set()

    def _prepare(self, session: Session, delivery_id: str) -> _Job | None:
        """The attempt to make, or None when the delivery ends here (its endpoint was
        deleted or disabled)."""
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != "pending":
            return None
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None or endpoint.status != "active" or delivery.payload is None:
            reason = "endpoint_deleted" if endpoint is None else "endpoint_disabled"
            error = reason if delivery.payload else "no_payload"
            self._finish(delivery, "failed", utcnow(), error=error)
            return None
        return _Job(
            delivery_id=delivery.id,
            url=endpoint.url_encrypted,
            secret=endpoint.secret_encrypted,
            payload=delivery.payload.encode(),
            event_id=delivery.event_id,
            kind=delivery.kind,
            attempt=delivery.attempts + 1,
        )

    def _record(self, session: Session, job: _Job, outcome: Outcome) -> None:
        with self._lock:
            self.attempts_made += 1
        delivery = session.get(WebhookDelivery, job.delivery_id)
        if delivery is None:
            return
        attempt_no = job.attempt
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                attempt=attempt_no,
                status_code=outcome.status_code,
                latency_ms=outcome.latency_ms,
                error=outcome.error,
                created_at=utcnow(),
            )
        )
        delivery.attempts = attempt_no
        delivery.last_status_code = outcome.status_code
        delivery.last_latency_ms = outcome.latency_ms
        delivery.last_error = outcome.error
        if outcome.ok:
            self._finish(delivery, "delivered", utcnow())
        elif attempt_no >= self.settings.webhook_max_attempts:
            self._finish(delivery, "failed", utcnow(), error=outcome.error)
        else:
            delivery.next_attempt_at = utcnow() + timedelta(
                seconds=backoff_seconds(self.settings, attempt_no)
            )
        log.info(
            "webhooks.attempt",
            extra={
                "org_id": delivery.org_id,
                "kind": delivery.kind,
                "status": outcome.status_code,
                "count": attempt_no,
                "latency_ms": outcome.latency_ms,
                "error_code": outcome.error,
            },
        )

    @staticmethod
    def _finish(
        delivery: WebhookDelivery, status: str, now: datetime, *, error: str | None = None
    ) -> None:
        delivery.status = status
        delivery.finished_at = now
        delivery.next_attempt_at = None
        # Only metadata outlives the delivery.
        delivery.payload = None
        if error is not None:
            delivery.last_error = error

    # -- the threads --------------------------------------------------------------------

    def start(self) -> None:
        if self._worker.started:
            return
        self._workers = ThreadPoolExecutor(
            self.settings.webhook_workers, thread_name_prefix="onetoken-webhook-send"
        )
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._worker.stop(timeout)
        workers, self._workers = self._workers, None
        if workers is not None:
            # Running attempts end by their deadline; nothing else is queued.
            workers.shutdown(wait=True)
        # Events still queued in memory are persisted so the next start delivers them.
        self._flush_queue()

    def _flush_queue(self) -> None:
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        if events:
            self.persist(events)

    def _loop(self) -> None:
        interval = self.settings.webhook_poll_interval_seconds
        wait = 0.0
        stopping, wake = self._worker.stopping, self._worker.wake
        while not stopping.is_set():
            wake.wait(wait)
            wake.clear()
            if stopping.is_set():
                break
            wait = interval
            try:
                self._flush_queue()
                self.hand_out_due()
                due = self.next_due_in()
                if due is not None and self._idle_workers() > 0:
                    # Short backoffs (and other processes' new rows) are picked up on time;
                    # a worker finishing wakes the loop at once.
                    wait = min(interval, max(0.01, due))
            except Exception as exc:
                log.error("webhooks.worker_failed", extra={"exc_type": type(exc).__name__})

    def _idle_workers(self) -> int:
        with self._lock:
            return self.settings.webhook_workers - len(self._busy)

    def next_due_in(self) -> float | None:
        """Seconds until the earliest pending delivery that could be handed out now is due
        (None when there is none): not one of a busy endpoint or of an org at its share,
        whose worker wakes the loop when it finishes."""
        busy, full_orgs = self._occupied()
        q = select(WebhookDelivery.next_attempt_at).where(WebhookDelivery.status == "pending")
        if busy:
            q = q.where(WebhookDelivery.endpoint_id.not_in(busy))
        if full_orgs:
            q = q.where(WebhookDelivery.org_id.not_in(full_orgs))
        with self.session_factory() as session:
            when = session.scalar(q.order_by(WebhookDelivery.next_attempt_at).limit(1))
        if when is None:
            return None
        return max(0.0, (when - utcnow()).total_seconds())


def _subscribers(session: Session, org_id: str, kind: str) -> list[WebhookEndpoint]:
    q = select(WebhookEndpoint).where(WebhookEndpoint.status == "active")
    # Platform-wide events (no org) go to operators' platform endpoints only.
    q = q.where(WebhookEndpoint.platform.is_(True)) if not org_id else q.where(
        WebhookEndpoint.org_id == org_id
    )
    return [ep for ep in session.scalars(q) if kind in (ep.kinds or [])]


def _due_delivery(
    endpoint: WebhookEndpoint, event_id: str, kind: str, body: str, now: datetime
) -> WebhookDelivery:
    """A pending delivery of one event to one endpoint, due `now`."""
    return WebhookDelivery(
        id=new_id("whd"),
        endpoint_id=endpoint.id,
        org_id=endpoint.org_id,
        event_id=event_id,
        kind=kind,
        status="pending",
        attempts=0,
        next_attempt_at=now,
        payload=body,
        created_at=now,
    )


def prepare(kind: str, data: object) -> tuple[str, dict[str, Scalar]]:
    """Normalized kind and metadata-only data."""
    return normalize_kind(kind), clean_data(data if isinstance(data, dict) else {})
