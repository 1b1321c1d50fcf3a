"""Retention periods per record kind (docs/retention.md), enforced in two places:

- ClickHouse: table TTLs, rewritten at every start from the settings
  (`analytics.clickhouse.ensure_ttls`): call_log after ONETOKEN_CALL_LOG_TTL_DAYS,
  security_log after ONETOKEN_SECURITY_LOG_TTL_DAYS, and its login records (`auth.*`)
  after ONETOKEN_LOGIN_RECORDS_TTL_DAYS (a second TTL rule with a WHERE clause);
- the control DB: a purge every ONETOKEN_RETENTION_PURGE_INTERVAL_SECONDS removes the
  webhook delivery log after ONETOKEN_DELIVERY_LOG_TTL_DAYS, sign-in sources after the
  login-records period, expired sessions, forgiven login-failure counters and expired
  source blocks.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import and_, delete, or_

from onetoken.db.base import utcnow
from onetoken.db.session import SessionFactory
from onetoken.orgs.models import AdminSession
from onetoken.security import blocking
from onetoken.security.models import LoginSource, LoginThrottle
from onetoken.webhooks import service as webhooks_service

log = logging.getLogger("onetoken.retention")

SECURITY_LOG_TABLE = "onetoken.security_log"
LOGIN_KINDS_CONDITION = "startsWith(kind, 'auth.')"
_TTL_RULES = re.compile(r"\bTTL\s+(.*?)(?:\s+SETTINGS\s|$)", re.DOTALL)


class RetentionSettings(Protocol):
    security_log_ttl_days: int
    login_records_ttl_days: int
    delivery_log_ttl_days: int
    login_failure_window_seconds: int
    login_lockout_max_seconds: int
    retention_purge_interval_seconds: float


def security_log_ttl(security_days: int, login_days: int) -> str:
    """The TTL clause of security_log: login records may be kept for a shorter (or
    longer) period than the rest."""
    for days in (security_days, login_days):
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise ValueError("retention periods must be positive numbers of days")
    return (
        f"ts + INTERVAL {login_days} DAY DELETE WHERE {LOGIN_KINDS_CONDITION}, "
        f"ts + INTERVAL {security_days} DAY"
    )


def current_ttl(client: Any, table: str) -> str:
    database, name = table.split(".", 1)
    result = client.query(
        "SELECT engine_full FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": database, "t": name},
    )
    if not result.result_rows:
        return ""
    match = _TTL_RULES.search(str(result.result_rows[0][0]))
    return match[1].strip() if match else ""


def ensure_security_log_ttl(client: Any, security_days: int, login_days: int) -> bool:
    """Make security_log's TTL match the settings; True when it had to change."""
    wanted = (
        f"ts + toIntervalDay({login_days}) WHERE {LOGIN_KINDS_CONDITION}, "
        f"ts + toIntervalDay({security_days})"
    )
    if current_ttl(client, SECURITY_LOG_TABLE) == wanted:
        return False
    # Both values are validated ints, so formatting them into DDL is safe.
    client.command(
        f"ALTER TABLE {SECURITY_LOG_TABLE} MODIFY TTL {security_log_ttl(security_days, login_days)}"
    )
    log.info("analytics.ttl_changed", extra={"kind": SECURITY_LOG_TABLE, "count": security_days})
    return True


@dataclass
class PurgeResult:
    deliveries: int = 0
    login_sources: int = 0
    sessions: int = 0
    throttles: int = 0
    blocks: int = 0


def purge(session_factory: SessionFactory, settings: RetentionSettings) -> PurgeResult:
    """One pass of the control-DB purge (committed)."""
    now = utcnow()
    out = PurgeResult()
    with session_factory() as session:
        out.deliveries = webhooks_service.purge_log(
            session, now - timedelta(days=settings.delivery_log_ttl_days)
        )
        login_cutoff = now - timedelta(days=settings.login_records_ttl_days)
        out.login_sources = _rowcount(
            session.execute(delete(LoginSource).where(LoginSource.last_seen < login_cutoff))
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
        session.commit()
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
