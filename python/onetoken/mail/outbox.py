"""The outbox and its one worker: a message is a row committed with the change that
caused it, and the worker sends it later, so no request waits on an SMTP server. Failed
attempts are retried with backoff up to ONETOKEN_MAIL_MAX_ATTEMPTS; a message is claimed
with a conditional update, so two processes sharing a control DB never both send it.

The log names messages by id and kind only: never an address, a subject or a body."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.db.session import SessionFactory
from onetoken.kit.crypto import Secrets
from onetoken.kit.worker import LoopThread
from onetoken.mail.models import MailMessage
from onetoken.mail.smtp import SmtpSender, SmtpSettings

log = logging.getLogger("onetoken.mail")

_BATCH = 20
# How long a claimed message is hidden from another process beyond its attempt's timeout.
_LEASE_MARGIN_S = 60.0
_QUEUE_CAP = 10_000


class MailSettings(SmtpSettings, Protocol):
    alert_cooldown_seconds: float
    mail_max_attempts: int
    mail_backoff_base_seconds: float
    mail_poll_interval_seconds: float


def enqueue(
    session: Session,
    secrets: Secrets,
    *,
    kind: str,
    to_address: str,
    subject: str,
    body: str,
    org_id: str | None = None,
) -> MailMessage:
    """Add a message to the outbox; it is sent once the caller's transaction commits."""
    message = MailMessage(
        id=new_id("mail"),
        kind=kind,
        org_id=org_id,
        to_address=to_address,
        subject=subject,
        body_encrypted=secrets.encrypt(body),
        status="pending",
        attempts=0,
        next_attempt_at=utcnow(),
        created_at=utcnow(),
    )
    session.add(message)
    session.flush()
    return message


def backoff_seconds(settings: MailSettings, attempts: int) -> float:
    """Delay before attempt `attempts + 1`: base * 2^(attempts-1), at most a day."""
    return float(min(86_400.0, settings.mail_backoff_base_seconds * 2 ** max(0, attempts - 1)))


class MailWorker:
    """Sends due outbox messages from one thread. `later` takes work that needs the
    control DB but arrives where a request is being answered (security alerts): it runs
    on this thread, before the next round of sending."""

    def __init__(
        self,
        settings: MailSettings,
        secrets: Secrets,
        session_factory: SessionFactory,
        sender: SmtpSender,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.session_factory = session_factory
        self.sender = sender
        self._thread = LoopThread("onetoken-mail", self._loop)
        self._jobs: deque[Callable[[Session], None]] = deque()
        self._jobs_lock = threading.Lock()
        self._last_alert: dict[tuple[str, str], float] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._thread.stop(timeout)

    def wake(self) -> None:
        self._thread.wake.set()

    def later(self, job: Callable[[Session], None]) -> None:
        """Run `job(session)` on the worker's thread and commit; never blocks the caller."""
        with self._jobs_lock:
            if len(self._jobs) >= _QUEUE_CAP:
                log.warning("mail.jobs_dropped")
                return
            self._jobs.append(job)
        self.wake()

    def first_alert(self, org_id: str, kind: str) -> bool:
        """True unless this org had an alert of this kind within ONETOKEN_ALERT_COOLDOWN_
        SECONDS: a burst of events (an attack, a leaked key used from many addresses)
        makes one message per recipient, not one per event."""
        now = time.monotonic()
        with self._jobs_lock:
            last = self._last_alert.get((org_id, kind))
            if last is not None and now - last < self.settings.alert_cooldown_seconds:
                return False
            self._last_alert[(org_id, kind)] = now
            return True

    def _loop(self) -> None:
        thread = self._thread
        while not thread.stopping.is_set():
            thread.wake.clear()
            try:
                self._run_jobs()
                more = self.send_due()
            except Exception as exc:
                log.error("mail.round_failed", extra={"exc_type": type(exc).__name__})
                more = False
            if not more:
                thread.wake.wait(self.settings.mail_poll_interval_seconds)

    def _run_jobs(self) -> None:
        while True:
            with self._jobs_lock:
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            with self.session_factory() as session:
                try:
                    job(session)
                    session.commit()
                except Exception as exc:
                    session.rollback()
                    log.error("mail.job_failed", extra={"exc_type": type(exc).__name__})

    def send_due(self) -> bool:
        """One round: attempt up to a batch of due messages. True when more may be due."""
        now = utcnow()
        with self.session_factory() as session:
            due = session.execute(
                select(MailMessage.id, MailMessage.attempts)
                .where(MailMessage.status == "pending", MailMessage.next_attempt_at <= now)
                .order_by(MailMessage.next_attempt_at)
                .limit(_BATCH)
            ).all()
        for message_id, attempts in due:
            self._attempt(message_id, attempts)
        return len(due) == _BATCH

    def _attempt(self, message_id: str, attempts: int) -> None:
        lease = timedelta(seconds=self.settings.mail_timeout_seconds + _LEASE_MARGIN_S)
        with self.session_factory() as session:
            claimed = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                update(MailMessage)
                .where(
                    MailMessage.id == message_id,
                    MailMessage.status == "pending",
                    MailMessage.attempts == attempts,
                )
                .values(attempts=attempts + 1, next_attempt_at=utcnow() + lease)
            ).rowcount
            session.commit()
            if not claimed:
                return
            message = session.get(MailMessage, message_id)
            assert message is not None
            error: str | None = None
            try:
                body = self.secrets.decrypt(message.body_encrypted)
                self.sender.send(message.to_address, message.subject, body)
            except Exception as exc:
                error = type(exc).__name__
            now = utcnow()
            if error is None:
                message.status, message.sent_at, message.body_encrypted = "sent", now, ""
                message.last_error = None
                log.info("mail.sent", extra={"mail_id": message.id, "kind": message.kind})
            elif message.attempts >= self.settings.mail_max_attempts:
                message.status, message.body_encrypted, message.last_error = "failed", "", error
                log.error("mail.gave_up",
                          extra={"mail_id": message.id, "kind": message.kind, "exc_type": error})
            else:
                message.last_error = error
                message.next_attempt_at = now + timedelta(
                    seconds=backoff_seconds(self.settings, message.attempts)
                )
                log.warning("mail.retry",
                            extra={"mail_id": message.id, "kind": message.kind, "exc_type": error})
            session.commit()


def purge(session: Session, before: datetime) -> int:
    """Forget messages sent or given up before `before` (who was sent what, when)."""
    result = session.execute(
        delete(MailMessage).where(
            MailMessage.status != "pending",
            MailMessage.created_at < before,
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)
