"""Retention periods per record kind (docs/retention.md), enforced in two places:

- ClickHouse: table TTLs, rewritten at every start from the settings
  (`analytics.clickhouse.ensure_ttls`): call_log after ONETOKEN_CALL_LOG_TTL_DAYS,
  security_log after ONETOKEN_SECURITY_LOG_TTL_DAYS, and its login records (`auth.*`)
  after ONETOKEN_LOGIN_RECORDS_TTL_DAYS (the TTL's period depends on the kind);
- the control DB: a purge every ONETOKEN_RETENTION_PURGE_INTERVAL_SECONDS removes the
  webhook delivery log after ONETOKEN_DELIVERY_LOG_TTL_DAYS, sign-in sources after the
  login-records period, expired sessions, forgiven login-failure counters and expired
  source blocks, tickets (with their messages and attachment files)
  ONETOKEN_TICKET_RETENTION_DAYS after they closed, and resolved incidents (with their
  handling history) ONETOKEN_SECURITY_LOG_TTL_DAYS after they were resolved.

Neither touches the records of an org under a legal hold (rights.holds): the purge skips
them, and the TTLs skip its rows through the table of holds they read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import and_, delete, or_, select

from onetoken.db.base import utcnow
from onetoken.db.session import SessionFactory
from onetoken.incidents import service as incidents_service
from onetoken.mail import outbox
from onetoken.orgs import reset
from onetoken.orgs.models import Account, AdminSession
from onetoken.rights import erasure, holds
from onetoken.security import blocking
from onetoken.security.models import LoginSource, LoginThrottle
from onetoken.tickets import service as tickets_service
from onetoken.tickets.store import open_store
from onetoken.webhooks import service as webhooks_service

log = logging.getLogger("onetoken.retention")



class RetentionSettings(Protocol):
    security_log_ttl_days: int
    login_records_ttl_days: int
    delivery_log_ttl_days: int
    login_failure_window_seconds: int
    login_lockout_max_seconds: int
    retention_purge_interval_seconds: float
    ticket_retention_days: int

    @property
    def ticket_store_dir(self) -> Path: ...


@dataclass
class PurgeResult:
    deliveries: int = 0
    login_sources: int = 0
    sessions: int = 0
    throttles: int = 0
    blocks: int = 0
    tickets: int = 0
    incidents: int = 0
    mail: int = 0
    password_resets: int = 0


def purge(session_factory: SessionFactory, settings: RetentionSettings) -> PurgeResult:
    """One pass of the control-DB purge (committed)."""
    now = utcnow()
    out = PurgeResult()
    with session_factory() as session:
        held = holds.held_org_ids(session)
        out.deliveries = webhooks_service.purge_log(
            session, now - timedelta(days=settings.delivery_log_ttl_days), keep_orgs=held
        )
        login_cutoff = now - timedelta(days=settings.login_records_ttl_days)
        held_accounts = select(Account.id).where(Account.org_id.in_(held))
        out.login_sources = _rowcount(
            session.execute(
                delete(LoginSource).where(
                    LoginSource.last_seen < login_cutoff,
                    LoginSource.account_id.not_in(held_accounts),
                )
            )
        )
        out.sessions = _rowcount(
            session.execute(delete(AdminSession).where(AdminSession.expires_at < now))
        )
        # Failures older than this are forgiven by the login guard anyway.
        forgiven = now - timedelta(
            seconds=max(settings.login_failure_window_seconds, settings.login_lockout_max_seconds)
        )
        out.throttles = _rowcount(
            session.execute(
                delete(LoginThrottle).where(
                    and_(
                        or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until < now),
                        or_(
                            LoginThrottle.last_failure_at.is_(None),
                            LoginThrottle.last_failure_at < forgiven,
                        ),
                    )
                )
            )
        )
        out.blocks = blocking.purge_expired(session)
        # Sent mail is kept as long as webhook deliveries: both are a record of what was
        # sent where.
        out.mail = outbox.purge(session, now - timedelta(days=settings.delivery_log_ttl_days))
        out.password_resets = reset.purge_expired(session, now)
        # Ticket content goes for good: SQLite overwrites the freed pages.
        if session.get_bind().dialect.name == "sqlite":
            session.connection().exec_driver_sql("PRAGMA secure_delete = ON")
        removed = tickets_service.purge_closed(
            session, now - timedelta(days=settings.ticket_retention_days), keep_orgs=held
        )
        out.tickets = removed.tickets
        # The handling record lives as long as the log it is about.
        out.incidents = incidents_service.purge_resolved(
            session, now - timedelta(days=settings.security_log_ttl_days), keep_orgs=held
        )
        session.commit()
    # Files after the commit: a rolled-back purge must not lose a kept ticket's files.
    tickets_service.delete_files(open_store(settings.ticket_store_dir), removed.storage_keys)
    if removed.tickets:
        erasure.checkpoint(session_factory)
    if any(vars(out).values()):
        log.info("retention.purged", extra={"rows": sum(vars(out).values())})
    return out


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


class RetentionWorker:
    """Runs `purge` at start and then every interval, in a daemon thread."""

    def __init__(self, session_factory: SessionFactory, settings: RetentionSettings) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="onetoken-retention", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=timeout)

    def _loop(self) -> None:
        while True:
            try:
                purge(self.session_factory, self.settings)
                self.runs += 1
            except Exception as exc:
                log.error("retention.purge_failed", extra={"exc_type": type(exc).__name__})
            if self._stop.wait(self.settings.retention_purge_interval_seconds):
                return
