"""Turns events into deliveries and delivers them: signed POSTs, retried with
exponential backoff by one background thread, every attempt in the delivery log.

Events are persisted as delivery rows before any attempt, so a restart loses nothing
queued in the DB; a delivery is claimed with a conditional update (a lease), so several
server processes sharing one control DB never send the same attempt twice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from onetoken import __version__
from onetoken.db.models import new_id, utcnow
from onetoken.db.session import SessionFactory
from onetoken.kit.crypto import DecryptionError, Secrets
from onetoken.webhooks.events import Scalar, clean_data, envelope, new_event_id, normalize_kind
from onetoken.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from onetoken.webhooks.service import TargetNotAllowed, check_target
from onetoken.webhooks.signing import SIGNATURE_HEADER, header_value

log = logging.getLogger("onetoken.webhooks")

_BATCH = 50
# How long a claimed delivery is hidden from other workers while its attempt runs.
_LEASE_S = 120.0
_QUEUE_CAP = 10_000


class WebhookSettings(Protocol):
    webhook_max_attempts: int
    webhook_backoff_base_seconds: float
    webhook_backoff_max_seconds: float
    webhook_timeout_seconds: float
    webhook_poll_interval_seconds: float
    webhook_allow_private_targets: bool


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
    if isinstance(exc, TargetNotAllowed):
        return "target_not_allowed"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.HTTPError):
        return "http_error"
    if isinstance(exc, DecryptionError):
        return "secret_unreadable"
    return "internal_error"


def send(
    http: httpx.Client,
    url: str,
    secret: str,
    body: bytes,
    *,
    delivery_id: str,
    event_id: str,
    kind: str,
    attempt: int,
    allow_private: bool,
) -> Outcome:
    """POST one signed delivery. The response body is never read or kept."""
    start = time.perf_counter()
    try:
        check_target(url, allow_private=allow_private)
        headers = {
            "content-type": "application/json",
            "user-agent": f"onetoken-webhooks/{__version__}",
            SIGNATURE_HEADER: header_value(secret, body),
            "onetoken-event-id": event_id,
            "onetoken-event-type": kind,
            "onetoken-delivery-id": delivery_id,
            "onetoken-delivery-attempt": str(attempt),
        }
        with http.stream("POST", url, content=body, headers=headers) as response:
            status = response.status_code
    except Exception as exc:
        return Outcome(False, None, _ms(start), _error_class(exc))
    ok = 200 <= status < 300
    return Outcome(ok, status, _ms(start), None if ok else f"http_{status}")


def _ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


class WebhookDispatcher:
    def __init__(
        self,
        settings: WebhookSettings,
        secrets: Secrets,
        session_factory: SessionFactory,
        *,
        http: httpx.Client | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.session_factory = session_factory
        self._http = http or httpx.Client(
            timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
        )
        self._queue: deque[tuple[str, str, dict[str, Scalar]]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events_emitted = 0
        self.events_dropped = 0
        self.attempts_made = 0
        # Tests and callers may wait for an idle worker.
        self.on_cycle: list[Callable[[], None]] = []

    # -- producing ----------------------------------------------------------------------

    def submit(self, org_id: str, kind: str, data: dict[str, Scalar]) -> None:
        """Queue an event (the worker persists it at once); without a running worker the
        event is persisted in the caller's thread."""
        if self._thread is None or not self._thread.is_alive():
            self.persist([(org_id, kind, data)])
            return
        with self._lock:
            if len(self._queue) >= _QUEUE_CAP:
                self.events_dropped += 1
                log.error("webhooks.queue_full", extra={"org_id": org_id, "kind": kind})
                return
            self._queue.append((org_id, kind, data))
        self._wake.set()

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
                    delivery = WebhookDelivery(
                        id=new_id("whd"),
                        endpoint_id=ep.id,
                        org_id=ep.org_id,
                        event_id=event_id,
                        kind=kind,
                        status="pending",
                        attempts=0,
                        next_attempt_at=now,
                        payload=body,
                        created_at=now,
                    )
                    session.add(delivery)
                    created.append(delivery.id)
            session.commit()
        self.events_emitted += len(events)
        if created:
            self._wake.set()
        return created

    def test_delivery(self, session: Session, endpoint: WebhookEndpoint) -> WebhookDelivery:
        """A `webhook_test` event for one endpoint, attempted at once (and retried later
        like any delivery when that fails). The caller's session is committed."""
        from onetoken.webhooks.events import TEST_KIND

        event_id = new_event_id()
        body = envelope(event_id, TEST_KIND, endpoint.org_id, {"endpoint_id": endpoint.id})
        delivery = WebhookDelivery(
            id=new_id("whd"),
            endpoint_id=endpoint.id,
            org_id=endpoint.org_id,
            event_id=event_id,
            kind=TEST_KIND,
            status="pending",
            attempts=0,
            next_attempt_at=utcnow() + timedelta(seconds=_LEASE_S),
            payload=body.decode(),
            created_at=utcnow(),
        )
        session.add(delivery)
        session.commit()
        self._attempt(session, delivery, endpoint)
        session.commit()
        return delivery

    # -- delivering ---------------------------------------------------------------------

    def run_due(self, limit: int = _BATCH) -> int:
        """Attempt every due delivery (at most `limit`); returns attempts made."""
        made = 0
        now = utcnow()
        with self.session_factory() as session:
            due = list(
                session.scalars(
                    select(WebhookDelivery)
                    .where(
                        WebhookDelivery.status == "pending",
                        or_(
                            WebhookDelivery.next_attempt_at.is_(None),
                            WebhookDelivery.next_attempt_at <= now,
                        ),
                    )
                    .order_by(WebhookDelivery.next_attempt_at)
                    .limit(limit)
                )
            )
            for delivery in due:
                if not self._claim(session, delivery, now):
                    continue
                endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
                self._attempt(session, delivery, endpoint)
                session.commit()
                made += 1
        return made

    def _claim(self, session: Session, delivery: WebhookDelivery, now: datetime) -> bool:
        lease = now + timedelta(seconds=_LEASE_S)
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
        if getattr(result, "rowcount", 0) != 1:
            return False
        session.refresh(delivery)
        return True

    def _attempt(
        self, session: Session, delivery: WebhookDelivery, endpoint: WebhookEndpoint | None
    ) -> None:
        now = utcnow()
        if endpoint is None or endpoint.status != "active" or delivery.payload is None:
            reason = "endpoint_deleted" if endpoint is None else "endpoint_disabled"
            error = reason if delivery.payload else "no_payload"
            self._finish(delivery, "failed", now, error=error)
            return
        attempt_no = delivery.attempts + 1
        try:
            url = self.secrets.decrypt(endpoint.url_encrypted)
            secret = self.secrets.decrypt(endpoint.secret_encrypted)
        except DecryptionError:
            outcome = Outcome(False, None, 0, "secret_unreadable")
        else:
            outcome = send(
                self._http,
                url,
                secret,
                delivery.payload.encode(),
                delivery_id=delivery.id,
                event_id=delivery.event_id,
                kind=delivery.kind,
                attempt=attempt_no,
                allow_private=self.settings.webhook_allow_private_targets,
            )
        self.attempts_made += 1
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

    # -- the worker thread --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="onetoken-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=timeout)
        # Events still queued in memory are persisted so the next start delivers them.
        self._flush_queue()
        self._http.close()

    def _flush_queue(self) -> None:
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        if events:
            self.persist(events)

    def _loop(self) -> None:
        interval = self.settings.webhook_poll_interval_seconds
        wait = 0.0
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                break
            wait = interval
            try:
                self._flush_queue()
                while self.run_due() >= _BATCH:
                    pass
                due = self.next_due_in()
                if due is not None:
                    # Short backoffs (and other processes' new rows) are picked up on time.
                    wait = min(interval, max(0.01, due))
            except Exception as exc:
                log.error("webhooks.worker_failed", extra={"exc_type": type(exc).__name__})
            for hook in self.on_cycle:
                hook()

    def next_due_in(self) -> float | None:
        """Seconds until the earliest pending delivery is due (None when none pending)."""
        with self.session_factory() as session:
            when = session.scalar(
                select(WebhookDelivery.next_attempt_at)
                .where(WebhookDelivery.status == "pending")
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(1)
            )
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


def prepare(kind: str, data: object) -> tuple[str, dict[str, Scalar]]:
    """Normalized kind and metadata-only data."""
    return normalize_kind(kind), clean_data(data if isinstance(data, dict) else {})
