"""Login protection: lockouts with exponential backoff per account and per source IP, and
abnormal sign-in detection (new network or User-Agent family, impossible attempt rates).

Counters live in the control DB, so every process of a deployment shares them and they
survive restarts. The impossible-rate detector is per process (it needs sub-second
timestamps, not durability).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.base import utcnow
from onetoken.kit.errors import OnetokenError
from onetoken.security.log import SecurityEvent, record
from onetoken.security.models import LoginSource, LoginThrottle
from onetoken.security.net import network_of, ua_family

SCOPE_ACCOUNT = "account"
SCOPE_IP = "ip"


class GuardSettings(Protocol):
    login_max_failures_account: int
    login_max_failures_ip: int
    login_lockout_base_seconds: int
    login_lockout_max_seconds: int
    login_failure_window_seconds: int
    login_burst_max_attempts: int
    login_burst_window_seconds: float


class LoginLocked(OnetokenError):
    status_code = 429
    type = "rate_limit_error"
    code = "login_locked"

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many failed sign-in attempts. Try again later.")
        self.headers = {"Retry-After": str(max(1, retry_after))}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One sign-in attempt: which throttle subject, from where. Never the identifier typed."""

    subject: str  # account id, or a keyed hash of an unknown identifier
    account_id: str  # "" when no such account
    org_id: str
    source_ip: str
    user_agent: str
    #: The network and User-Agent family compared between sign-ins, when the caller
    #: worked them out from clear values it may not pass on (restriction of processing,
    #: onetoken.security.restriction); None: from source_ip and user_agent.
    network: str | None = None
    family: str | None = None
    #: The key of the per-address counters (lockout, burst); None: source_ip. Callers
    #: pass the address's token for every account, so one address is one counter whether
    #: the accounts it tries restricted processing or not.
    address_key: str | None = None

    @property
    def address(self) -> str:
        return self.source_ip if self.address_key is None else self.address_key


def lockout_seconds(settings: GuardSettings, failures: int, threshold: int) -> int:
    """0 below the threshold; base at it, doubling with every further failure, capped."""
    if failures < threshold:
        return 0
    exponent = min(failures - threshold, 30)
    return int(min(settings.login_lockout_max_seconds,
                   settings.login_lockout_base_seconds * 2**exponent))


class LoginGuard:
    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._burst: dict[tuple[str, str], deque[float]] = {}
        self._burst_alerted: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    # -- lockouts -------------------------------------------------------------------------

    def _subjects(self, attempt: Attempt) -> list[tuple[str, str, int]]:
        out = [(SCOPE_ACCOUNT, attempt.subject, self.settings.login_max_failures_account)]
        if attempt.address:
            out.append((SCOPE_IP, attempt.address, self.settings.login_max_failures_ip))
        return out

    def check(self, session: Session, attempt: Attempt) -> None:
        """Raise LoginLocked (and record it) while the account or the source is locked.
        Runs before the password is looked at, so a correct one is refused too."""
        self._watch_rate(attempt)
        now = utcnow()
        for scope, subject, _ in self._subjects(attempt):
            row = session.get(LoginThrottle, (scope, subject))
            if row is not None and row.locked_until is not None and row.locked_until > now:
                retry = int((row.locked_until - now).total_seconds()) + 1
                self._event(attempt, "auth.login_locked", "medium",
                            {"scope": scope, "retry_after_s": retry})
                raise LoginLocked(retry)

    def failure(
        self, session: Session, attempt: Attempt, reason: str, *, kind: str = "auth.login_failed"
    ) -> None:
        """Count a failed attempt (a sign-in, or a step-up of a signed-in account: `kind`
        names its security-log event) against the account and the source; lock on
        threshold. The caller commits."""
        now = utcnow()
        window = timedelta(seconds=self.settings.login_failure_window_seconds)
        self._event(attempt, kind, "low", {"reason": reason})
        for scope, subject, threshold in self._subjects(attempt):
            row = session.get(LoginThrottle, (scope, subject))
            if row is None:
                row = LoginThrottle(scope=scope, subject=subject, failures=0)
                session.add(row)
            if row.last_failure_at is not None and now - row.last_failure_at > max(
                window, timedelta(seconds=self.settings.login_lockout_max_seconds)
            ):
                row.failures = 0  # a quiet period forgives old failures
            row.failures += 1
            row.last_failure_at = now
            seconds = lockout_seconds(self.settings, row.failures, threshold)
            if seconds:
                row.locked_until = now + timedelta(seconds=seconds)
                self._event(
                    attempt,
                    "auth.lockout",
                    "high" if scope == SCOPE_IP else "medium",
                    {"scope": scope, "failures": row.failures, "lock_seconds": seconds},
                )
        session.flush()

    def success(self, session: Session, attempt: Attempt) -> None:
        """Reset the account's counter (not the source's: an attacker holding one valid
        account must not be able to wipe the failures of their address) and look for an
        abnormal sign-in. The caller commits."""
        self.forgive(session, attempt)
        self._detect_new_source(session, attempt)
        session.flush()

    def forgive(self, session: Session, attempt: Attempt) -> None:
        """Reset the account's counter after a proof that held (not the source's)."""
        row = session.get(LoginThrottle, (SCOPE_ACCOUNT, attempt.subject))
        if row is not None:
            session.delete(row)

    # -- abnormal sign-ins ----------------------------------------------------------------

    def _detect_new_source(self, session: Session, attempt: Attempt) -> None:
        now = utcnow()
        seen = {
            (s.kind, s.value): s
            for s in session.scalars(
                select(LoginSource).where(LoginSource.account_id == attempt.account_id)
            )
        }
        network = network_of(attempt.source_ip) if attempt.network is None else attempt.network
        family = ua_family(attempt.user_agent) if attempt.family is None else attempt.family
        current = [("net", network), ("ua", family)]
        first_login = not seen
        for kind, value in current:
            if not value:
                continue
            known = seen.get((kind, value))
            if known is not None:
                known.last_seen = now
                continue
            session.add(LoginSource(account_id=attempt.account_id, kind=kind, value=value,
                                    first_seen=now, last_seen=now))
            if not first_login and any(k == kind for k, _ in seen):
                reason = "new_network" if kind == "net" else "new_user_agent"
                self._event(attempt, "auth.login_abnormal", "medium",
                            {"reason": reason, kind if kind == "net" else "ua_family": value})

    def _watch_rate(self, attempt: Attempt) -> None:
        """More attempts in the burst window than a person can type: record it (once per
        window per subject). Locking stays with the failure counters."""
        now = time.monotonic()
        window = self.settings.login_burst_window_seconds
        for scope, subject in ((SCOPE_ACCOUNT, attempt.subject), (SCOPE_IP, attempt.address)):
            if not subject:
                continue
            key = (scope, subject)
            with self._lock:
                times = self._burst.setdefault(key, deque())
                times.append(now)
                while times and now - times[0] > window:
                    times.popleft()
                count = len(times)
                alerted = self._burst_alerted.get(key, -1e9)
                fire = count >= self.settings.login_burst_max_attempts and now - alerted > window
                if fire:
                    self._burst_alerted[key] = now
                if len(self._burst) > 100_000:  # bounded memory under a spray
                    self._burst.clear()
                    self._burst_alerted.clear()
            if fire:
                self._event(attempt, "auth.login_rate_abnormal", "high",
                            {"scope": scope, "attempts": count, "window_s": window})

    @staticmethod
    def _event(attempt: Attempt, kind: str, severity: str, detail: dict[str, object]) -> None:
        record(
            SecurityEvent(
                kind=kind,
                severity=severity,  # type: ignore[arg-type]
                org_id=attempt.org_id,
                actor_id=attempt.account_id,
                subject_id=attempt.account_id,
                source_ip=attempt.source_ip,
                user_agent=attempt.user_agent,
                detail=detail,  # type: ignore[arg-type]
            )
        )


def locked_until(session: Session, scope: str, subject: str) -> datetime | None:
    row = session.get(LoginThrottle, (scope, subject))
    return row.locked_until if row is not None else None
