"""Billing work the control process runs in the background: prices that come due and
packages that lapse (each bumps the config revision, so gateways get a fresh snapshot; a
new UTC day or month does so by itself, see SnapshotSource), and the low-balance /
quota-exhausted webhook events raised by ingested usage."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING

from onetoken.billing import budgets, packages, prices
from onetoken.db.base import utcnow
from onetoken.db.session import SessionFactory

if TYPE_CHECKING:
    from onetoken.ingest.batch import Batch

log = logging.getLogger("onetoken.billing")

# Upkeep and event checks each run at most this often (they are queries, not per batch).
INTERVAL_S = 1.0


class BillingUpkeep:
    def __init__(self, session_factory: SessionFactory, *, interval_s: float = INTERVAL_S) -> None:
        self._sf = session_factory
        self._interval = interval_s
        self._next_tick = 0.0
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._orgs: set[str] = set()
        self._keys: set[str] = set()
        self._apps: set[str] = set()
        self._refused: set[tuple[str, str]] = set()

    def tick(self, now: datetime | None = None) -> bool:
        """Apply due prices and lapse packages (at most every `interval_s`); True when it
        changed something (committed with a new config revision)."""
        mono = time.monotonic()
        if mono < self._next_tick:
            return False
        self._next_tick = mono + self._interval
        at = now or utcnow()
        with self._sf() as session:
            changed = prices.apply_due(session, at)
            lapsed = packages.expire_due(session, at)
            session.commit()
        if changed or lapsed:
            log.info("billing.upkeep", extra={"count": changed + len(lapsed)})
        return bool(changed or lapsed)

    def observe(self, batch: Batch) -> None:
        """Note which orgs, keys and applications spent (or were refused for a budget) in an
        ingested batch; every INTERVAL_S, check them for webhook events."""
        with self._lock:
            for u in batch.usage:
                self._orgs.add(u.org_id)
                if u.key_id:
                    self._keys.add(u.key_id)
                if u.application_id:
                    self._apps.add(u.application_id)
            for f in batch.failures:
                if f.error_code == "budget_exceeded" and f.org_id:
                    self._refused.add((f.org_id, f.key_id))
        self.check_events()

    def check_events(self, *, force: bool = False) -> int:
        mono = time.monotonic()
        if not force and mono < self._next_check:
            return 0
        self._next_check = mono + self._interval
        with self._lock:
            orgs, keys, apps, refused = self._orgs, self._keys, self._apps, self._refused
            self._orgs, self._keys, self._apps, self._refused = set(), set(), set(), set()
        if not (orgs or keys or apps or refused):
            return 0
        try:
            with self._sf() as session:
                events = budgets.check_events(
                    session, orgs, keys, refused=refused, app_ids=apps
                )
                session.commit()
        except Exception as exc:
            log.warning("billing.events_failed", extra={"exc_type": type(exc).__name__})
            return 0
        budgets.emit_all(events)
        return len(events)
