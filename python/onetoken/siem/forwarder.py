"""Pushes the security log to every enabled syslog destination, each from its own durable
cursor (docs/siem.md).

One scheduler thread picks the destinations that are due and hands each to a small pool
of workers, one send in flight per destination: a receiver that is down or slow holds one
worker for at most ONETOKEN_SIEM_TIMEOUT_SECONDS per attempt and then waits out its
backoff, while the others keep going; nothing here runs on a request's thread. A
destination is claimed with a lease in the control DB, so with several control processes
one sends for it at a time.

A destination's cursor moves only after the receiver confirmed a batch (syslog.send), so
an event is delivered at least once and in (ts, event_id) order; after a restart or an
outage the next batch starts right after the last confirmed event."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from onetoken.db.base import utcnow
from onetoken.db.session import SessionFactory
from onetoken.kit.metrics import Metric
from onetoken.kit.net import networks
from onetoken.kit.worker import LoopThread
from onetoken.orgs.models import Org
from onetoken.siem import syslog
from onetoken.siem.models import OPERATOR, SiemDestination
from onetoken.siem.stream import Cursor, Runner, read_after

log = logging.getLogger("onetoken.siem")

# Batches one turn of a destination may send before it yields its worker to the others.
_BATCHES_PER_TURN = 20


class SiemSettings(Protocol):
    siem_syslog_address: str | None
    siem_ca_file: Path | None
    siem_client_cert: Path | None
    siem_client_key: Path | None
    siem_private_cidrs: str
    siem_settle_seconds: float
    siem_batch_events: int
    siem_poll_interval_seconds: float
    siem_backoff_max_seconds: float
    siem_timeout_seconds: float
    siem_workers: int


def split_address(value: str) -> tuple[str, int]:
    """host:port or [v6]:port; ValueError when it is neither."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("a syslog address is host:port")
    return host.strip("[]"), int(port)


def backoff_seconds(failures: int, cap: float) -> float:
    """1 s after the first failure, doubling, at most `cap`."""
    return float(min(cap, 2.0 ** max(0, failures - 1)))


def target_of(row: SiemDestination, settings: SiemSettings) -> syslog.Target:
    if row.id == OPERATOR:
        return syslog.Target(
            row.host, row.port,
            ca_file=settings.siem_ca_file,
            client_cert=settings.siem_client_cert,
            client_key=settings.siem_client_key,
            allow=None,
        )
    # A tenant's address: public, or in the operator's allow-list (as webhooks).
    return syslog.Target(row.host, row.port, ca_pem=row.ca_pem,
                         allow=networks(settings.siem_private_cidrs))


def sync_operator(session: Session, settings: SiemSettings) -> None:
    """The operator's destination row follows ONETOKEN_SIEM_SYSLOG_ADDRESS: created with
    its cursor at now (the history before is not pushed), disabled when unset, and its
    cursor kept across restarts and address changes."""
    row = session.get(SiemDestination, OPERATOR)
    address = settings.siem_syslog_address
    if not address:
        if row is not None and row.enabled:
            row.enabled = False
            row.updated_at = utcnow()
        return
    host, port = split_address(address)
    now = utcnow()
    if row is None:
        session.add(SiemDestination(
            id=OPERATOR, org_id=None, host=host, port=port, enabled=True,
            cursor_ts_us=_micros(now), cursor_event_id="", delivered=0, failures=0,
            next_attempt_at=now, created_at=now, updated_at=now,
        ))
        return
    if (row.host, row.port, row.enabled) != (host, port, True):
        row.host, row.port, row.enabled, row.updated_at = host, port, True, now
        row.next_attempt_at = now


def due(session: Session, now: datetime, owner: str) -> list[str]:
    """The destinations to send for now, the longest waiting first: enabled, their
    backoff over, not leased by another process."""
    return list(session.scalars(
        select(SiemDestination.id)
        .outerjoin(Org, Org.id == SiemDestination.org_id)
        .where(
            SiemDestination.enabled.is_(True),
            # A terminated org's events no longer leave (docs/retention.md).
            or_(SiemDestination.org_id.is_(None), Org.status != "terminated"),
            SiemDestination.next_attempt_at <= now,
            or_(SiemDestination.lease_until.is_(None),
                SiemDestination.lease_until < now,
                SiemDestination.lease_owner == owner),
        ).order_by(SiemDestination.next_attempt_at)
    ).all())


def _micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


@dataclass
class _Stats:
    delivered: int = 0
    failures: int = 0
    # When the oldest event not yet confirmed happened; None: caught up.
    pending_since: datetime | None = None


class Forwarder:
    def __init__(
        self, settings: SiemSettings, session_factory: SessionFactory, run: Runner,
        *, hostname: str | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.run = run
        self.hostname = hostname or socket.gethostname()
        self.owner = f"{self.hostname[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._thread = LoopThread("onetoken-siem", self._loop)
        self._pool = ThreadPoolExecutor(settings.siem_workers, thread_name_prefix="onetoken-siem")
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._stats: dict[str, _Stats] = {}
        self._lease = timedelta(seconds=settings.siem_timeout_seconds * 3 + 30)

    def start(self) -> None:
        with self.session_factory() as session:
            sync_operator(session, self.settings)
            session.commit()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._thread.stop(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def poke(self) -> None:
        """Look for due destinations now (a destination was saved)."""
        self._thread.wake.set()

    # -- scheduling --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._thread.stopping.is_set():
            try:
                self._schedule()
            except Exception as exc:  # the control DB is away: try again next round
                log.warning("siem.schedule_failed", extra={"exc_type": type(exc).__name__})
            self._thread.wake.wait(self.settings.siem_poll_interval_seconds)
            self._thread.wake.clear()

    def _schedule(self) -> None:
        with self.session_factory() as session:
            ids = due(session, utcnow(), self.owner)
        for dest_id in ids:
            with self._lock:
                if dest_id in self._in_flight:
                    continue
                self._in_flight.add(dest_id)
            try:
                self._pool.submit(self._turn, dest_id)
            except RuntimeError:  # shutting down
                with self._lock:
                    self._in_flight.discard(dest_id)
                return

    # -- one destination's turn ----------------------------------------------------------

    def _turn(self, dest_id: str) -> None:
        try:
            if self._claim(dest_id):
                self._deliver(dest_id)
        except Exception as exc:
            log.warning("siem.turn_failed", extra={"destination": _label(dest_id),
                                                   "exc_type": type(exc).__name__})
        finally:
            with self._lock:
                self._in_flight.discard(dest_id)

    def _claim(self, dest_id: str) -> bool:
        now = utcnow()
        with self.session_factory() as session:
            result = session.execute(
                update(SiemDestination)
                .where(
                    SiemDestination.id == dest_id,
                    SiemDestination.enabled.is_(True),
                    or_(SiemDestination.lease_until.is_(None),
                        SiemDestination.lease_until < now,
                        SiemDestination.lease_owner == self.owner),
                )
                .values(lease_owner=self.owner, lease_until=now + self._lease)
            )
            session.commit()
        return bool(getattr(result, "rowcount", 0))

    def _deliver(self, dest_id: str) -> None:
        settings = self.settings
        stats = self._stats.setdefault(dest_id, _Stats())
        with self.session_factory() as session:
            row = session.get(SiemDestination, dest_id)
            if row is None:
                return
            target = target_of(row, settings)
            cursor = Cursor(row.cursor_ts_us, row.cursor_event_id)
            org_id = row.org_id  # None: the operator's, every org
        error: str | None = None
        sent = 0
        full = False
        for _ in range(_BATCHES_PER_TURN):
            try:
                events = read_after(self.run, cursor, org_id=org_id,
                                    limit=settings.siem_batch_events,
                                    settle_seconds=settings.siem_settle_seconds)
            except Exception as exc:
                error = "read_error"
                log.warning("siem.read_failed", extra={"exc_type": type(exc).__name__})
                break
            if not events:
                stats.pending_since = None
                break
            stats.pending_since = events[0].ts
            try:
                syslog.send(target, syslog.frame(events, self.hostname),
                            timeout=settings.siem_timeout_seconds)
            except syslog.SendFailed as exc:
                error = exc.code
                break
            cursor = events[-1].cursor
            sent += len(events)
            if not self._advance(dest_id, cursor, len(events)):
                # The lease ran out and another process took the destination: it goes on
                # from the cursor it finds; this batch may reach the receiver twice.
                break
            full = len(events) == settings.siem_batch_events
            if not full:
                stats.pending_since = None
                break
        stats.delivered += sent
        self._finish(dest_id, error, again_now=full and error is None)
        if error is not None:
            stats.failures += 1
            log.warning("siem.send_failed", extra={"destination": _label(dest_id),
                                                   "code": error})

    def _advance(self, dest_id: str, cursor: Cursor, count: int) -> bool:
        """Move the cursor and renew the lease; False when the lease is no longer ours."""
        now = utcnow()
        with self.session_factory() as session:
            result = session.execute(
                update(SiemDestination)
                .where(SiemDestination.id == dest_id, SiemDestination.lease_owner == self.owner)
                .values(cursor_ts_us=cursor.ts_us, cursor_event_id=cursor.event_id,
                        delivered=SiemDestination.delivered + count,
                        last_delivered_at=now, failures=0, last_error=None,
                        lease_until=now + self._lease)
            )
            session.commit()
        return bool(getattr(result, "rowcount", 0))

    def _finish(self, dest_id: str, error: str | None, *, again_now: bool) -> None:
        now = utcnow()
        with self.session_factory() as session:
            row = session.get(SiemDestination, dest_id)
            if row is None or row.lease_owner != self.owner:
                return  # removed, or another process's now
            if error is None:
                row.failures = 0
                row.last_error = None
                wait = 0.0 if again_now else self.settings.siem_poll_interval_seconds
            else:
                row.failures += 1
                row.last_error = error
                wait = backoff_seconds(row.failures, self.settings.siem_backoff_max_seconds)
            row.next_attempt_at = now + timedelta(seconds=wait)
            row.lease_owner, row.lease_until = None, None
            session.commit()
        if again_now:
            self.poke()

    # -- metrics -------------------------------------------------------------------------

    def metrics(self) -> list[Metric]:
        """Per destination kind (the operator's, the orgs' together: org ids are not
        labels), what was delivered, failed, and how far behind it is."""
        lag = Metric("onetoken_siem_lag_seconds", "gauge",
                     "Age of the oldest security event not yet confirmed by the SIEM "
                     "receiver (the orgs': the largest); 0 when caught up")
        delivered = Metric("onetoken_siem_delivered_total", "counter",
                           "Security events the SIEM receivers confirmed")
        failures = Metric("onetoken_siem_send_failures_total", "counter",
                          "Failed sends to SIEM receivers (each retried with backoff)")
        now = datetime.now(UTC)
        for kind in ("operator", "org"):
            picked = [s for d, s in list(self._stats.items()) if _label(d) == kind]
            oldest = min((s.pending_since for s in picked if s.pending_since), default=None)
            lag.add((now - oldest).total_seconds() if oldest else 0.0, destination=kind)
            delivered.add(sum(s.delivered for s in picked), destination=kind)
            failures.add(sum(s.failures for s in picked), destination=kind)
        return [lag, delivered, failures]


def _label(dest_id: str) -> str:
    return "operator" if dest_id == OPERATOR else "org"
