"""Risk detection on call metadata (never content): each ingested batch is looked at
once, after the ledger took it (Ingestor.batch_observers), as the groups the journal
reader builds (calls per key, status, error code and provider; failed calls per source;
each key's source addresses).

What is detected (thresholds in settings, defaults in docs/security.md):

- frequency anomaly: a key's requests in the current bucket far above its own recent
  baseline (EWMA of past buckets, after a warm-up);
- abnormal calls: the same for a key's error responses; a key used from many source
  addresses within a window;
- attack interception: 401 floods from one source address; the source's requests without
  a valid key are blocked (the snapshot's `blocked_ips`, 403 `ip_blocked` in the gateway)
  for a while, its valid keys keep working;
- key risks: use of a revoked or expired key, or from outside its allowed addresses
  (the security_log rows are onetoken.risk.keyrisk's; the detectors add the webhook);
- system alarms: records spooled instead of written (pipeline trouble), records dropped,
  an upstream provider failing repeatedly.

Each detection writes a security_log row and emits a webhook event, at most once per
subject and kind per cooldown. Time comes from the records (`ts`), so detection does not
depend on how late a batch is ingested (a batch is one instant, its latest record's).
Work per batch is a pass over its groups, a few dozen whatever the batch's size.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from onetoken import webhooks
from onetoken.db.session import SessionFactory
from onetoken.ingest.batch import Batch, CallGroup
from onetoken.kit.events import EventBus
from onetoken.kit.net import networks
from onetoken.risk.keyrisk import KEY_RISKS
from onetoken.security import blocking
from onetoken.security.log import Scalar, SecurityEvent, Severity, record

log = logging.getLogger("onetoken.security")


def _tally(
    calls: list[CallGroup], group: Callable[[CallGroup], str], failed: Callable[[CallGroup], bool]
) -> tuple[Counter[str], Counter[str]]:
    """Calls and failed calls per group (a key, a provider); calls with no group are left
    out."""
    totals: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for c in calls:
        name = group(c)
        if not name:
            continue
        totals[name] += c.calls
        if failed(c):
            failures[name] += c.calls
    return totals, failures


# Codes that say the provider itself is failing: down, too slow (a first-byte timeout or the
# whole-response deadline, both upstream_timeout), or answering garbage or without bound.
# upstream_address_refused is not one: the gateway refused the configured base_url's address
# before connecting, a configuration fault the provider's health says nothing about (the
# engine's breaker ignores it too); it is counted in onetoken_errors_total.
UPSTREAM_FAILURE_CODES = frozenset({
    "upstream_unreachable", "upstream_timeout", "upstream_error", "upstream_response_too_large",
})
# Bounded memory under a spray of addresses or keys: state beyond this is forgotten.
_MAX_TRACKED = 100_000


class DetectorSettings(Protocol):
    anomaly_bucket_seconds: float
    anomaly_ewma_alpha: float
    anomaly_warmup_buckets: int
    anomaly_rate_factor: float
    anomaly_min_requests: int
    anomaly_error_factor: float
    anomaly_min_errors: int
    anomaly_ip_window_seconds: float
    anomaly_ip_threshold: int
    attack_401_window_seconds: float
    attack_401_threshold: int
    attack_block_seconds: int
    attack_block_exempt: str
    alert_cooldown_seconds: float
    upstream_alarm_failures: int


@dataclass(slots=True)
class _Series:
    """One key's count in the current bucket and its EWMA baseline of past buckets."""

    bucket: int = -1
    count: int = 0
    baseline: float = 0.0
    seen: int = 0

    def advance(self, bucket: int, alpha: float) -> None:
        if bucket <= self.bucket:
            return
        if self.bucket >= 0:
            closed = float(self.count)
            self.baseline = (
                closed if self.seen == 0 else alpha * closed + (1 - alpha) * self.baseline
            )
            gap = bucket - self.bucket - 1
            if gap > 0:
                # Empty buckets in between count as zeros.
                self.baseline *= (1 - alpha) ** min(gap, 10_000)
            self.seen += 1 + min(gap, 10_000)
        self.bucket = bucket
        self.count = 0


@dataclass(slots=True)
class _KeyState:
    requests: _Series = field(default_factory=_Series)
    errors: _Series = field(default_factory=_Series)
    org_id: str = ""
    account_id: str = ""


@dataclass(frozen=True, slots=True)
class Detection:
    """What was found, for the security log and the webhook."""

    kind: str  # security_log kind
    severity: Severity
    webhook_kind: str
    org_id: str
    actor_id: str = ""
    subject_id: str = ""
    source_ip: str = ""
    detail: Mapping[str, Scalar] = field(default_factory=dict)
    record: bool = True


class Detectors:
    def __init__(
        self,
        settings: DetectorSettings,
        session_factory: SessionFactory | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s = settings
        self.session_factory = session_factory
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        # key id -> {source ip -> last seen (record time, us)}
        self._sources: dict[str, dict[str, int]] = {}
        # source ip -> deque of (record time us, 401 count)
        self._auth_failures: dict[str, deque[tuple[int, int]]] = {}
        # provider -> deque of (record time us, failures, total)
        self._upstream: dict[str, deque[tuple[int, int, int]]] = {}
        self._alerted: dict[tuple[str, str], float] = {}
        self._exempt = networks(settings.attack_block_exempt)
        self._lock = threading.Lock()
        self._last_spooled: dict[str, int] = {}
        self.detections = 0

    # -- entry points ---------------------------------------------------------------------

    def observe(self, batch: Batch) -> list[Detection]:
        """Look at one drained batch; record and emit what it shows. Never raises."""
        try:
            with self._lock:
                found = self._observe(batch)
        except Exception as exc:
            log.error("detectors.failed", extra={"exc_type": type(exc).__name__})
            return []
        for d in found:
            self._report(d)
        return found

    def check_pipeline(self, stats: Mapping[str, int]) -> list[Detection]:
        """System alarms from ingestion counters (cumulative): call_log batches ClickHouse
        did not take, journal lines ingestion could not read (records lost)."""
        found: list[Detection] = []
        with self._lock:
            alarms: tuple[tuple[str, str, Severity], ...] = (
                ("batches_failed", "system.call_log_delayed", "high"),
                ("records_dropped", "system.records_dropped", "critical"),
            )
            for name, kind, severity in alarms:
                value = int(stats.get(name, 0) or 0)
                before = self._last_spooled.get(name, 0)
                self._last_spooled[name] = value
                if value > before and self._cool(kind, ""):
                    found.append(
                        Detection(
                            kind, severity, "system_alarm", "",
                            detail={"counter": name, "increase": value - before, "total": value},
                        )
                    )
        for d in found:
            self._report(d)
        return found

    # -- the per-batch work -----------------------------------------------------------------

    def _observe(self, batch: Batch) -> list[Detection]:
        if not batch.rows:
            return []
        now_us = batch.max_ts
        found: list[Detection] = []
        found += self._rates(now_us, batch)
        found += self._many_sources(now_us, batch)
        found += self._auth_floods(now_us, batch)
        found += self._key_risks(batch)
        found += self._upstreams(now_us, batch)
        return found

    def _rates(self, now_us: int, batch: Batch) -> list[Detection]:
        bucket_us = max(1, int(self.s.anomaly_bucket_seconds * 1_000_000))
        bucket = now_us // bucket_us
        alpha = self.s.anomaly_ewma_alpha
        requests, errors = _tally(batch.calls, lambda c: c.key_id, lambda c: c.status >= 400)
        if len(self._keys) > _MAX_TRACKED:
            self._keys.clear()
        out: list[Detection] = []
        for key_id, count in requests.items():
            state = self._keys.get(key_id)
            if state is None:
                org_id, account_id = batch.owners.get(key_id, ("", ""))
                state = self._keys[key_id] = _KeyState(org_id=org_id, account_id=account_id)
            for series, added, factor, minimum, kind, hook in (
                (state.requests, count, self.s.anomaly_rate_factor, self.s.anomaly_min_requests,
                 "calls.rate_anomaly", "frequency_anomaly"),
                (state.errors, errors.get(key_id, 0), self.s.anomaly_error_factor,
                 self.s.anomaly_min_errors, "calls.error_anomaly", "abnormal_calls"),
            ):
                series.advance(bucket, alpha)
                series.count += added
                if series.seen < self.s.anomaly_warmup_buckets or series.count < minimum:
                    continue
                base = max(series.baseline, 1.0)
                if series.count >= factor * base and self._cool(kind, key_id):
                    out.append(
                        Detection(
                            kind, "high", hook, state.org_id,
                            actor_id=state.account_id,
                            subject_id=key_id,
                            detail={
                                "count": series.count,
                                "baseline": round(series.baseline, 2),
                                "ratio": round(series.count / base, 1),
                                "bucket_s": self.s.anomaly_bucket_seconds,
                            },
                        )
                    )
        return out

    def _many_sources(self, now_us: int, batch: Batch) -> list[Detection]:
        window_us = int(self.s.anomaly_ip_window_seconds * 1_000_000)
        threshold = self.s.anomaly_ip_threshold
        if len(self._sources) > _MAX_TRACKED:
            self._sources.clear()
        out: list[Detection] = []
        for key_id, ips in batch.sources:
            self._sources.setdefault(key_id, {}).update(dict.fromkeys(ips, now_us))
        for key_id, _ in batch.sources:
            seen = self._sources[key_id]
            if len(seen) >= threshold:
                cutoff = now_us - window_us
                for ip in [ip for ip, t in seen.items() if t < cutoff]:
                    del seen[ip]
                if len(seen) > threshold * 4:
                    # Keep the newest: memory stays bounded under a spray.
                    newest = sorted(seen.items(), key=lambda kv: kv[1])[-threshold * 2 :]
                    seen.clear()
                    seen.update(newest)
            if len(seen) >= threshold and self._cool("calls.many_sources", key_id):
                state = self._keys.get(key_id)
                out.append(
                    Detection(
                        "calls.many_sources", "high", "abnormal_calls",
                        state.org_id if state else "",
                        actor_id=state.account_id if state else "",
                        subject_id=key_id,
                        detail={"sources": len(seen), "window_s": self.s.anomaly_ip_window_seconds},
                    )
                )
        return out

    def _auth_floods(self, now_us: int, batch: Batch) -> list[Detection]:
        failures: Counter[str] = Counter()
        for c in batch.failures:
            if c.status == 401 and c.source_ip:
                failures[c.source_ip] += c.calls
        if not failures:
            return []
        window_us = int(self.s.attack_401_window_seconds * 1_000_000)
        if len(self._auth_failures) > _MAX_TRACKED:
            self._auth_failures.clear()
        out: list[Detection] = []
        for ip, count in failures.items():
            q = self._auth_failures.setdefault(ip, deque())
            q.append((now_us, count))
            while q and q[0][0] < now_us - window_us:
                q.popleft()
            total = sum(c for _, c in q)
            if total < self.s.attack_401_threshold or not self._cool("attack.auth_flood", ip):
                continue
            blocked_until = self._block(ip)
            q.clear()
            out.append(
                Detection(
                    "attack.auth_flood_blocked" if blocked_until else "attack.auth_flood",
                    "critical" if blocked_until else "high",
                    "attack_blocked",
                    "",
                    source_ip=ip,
                    detail={
                        "failures": total,
                        "window_s": self.s.attack_401_window_seconds,
                        "blocked": blocked_until is not None,
                        "block_s": self.s.attack_block_seconds if blocked_until else 0,
                        "blocked_until": blocked_until or 0,
                    },
                )
            )
        return out

    def _key_risks(self, batch: Batch) -> list[Detection]:
        out: list[Detection] = []
        hits: Counter[tuple[str, str, str, str, str]] = Counter()
        for c in batch.failures:
            if c.error_code in KEY_RISKS and c.key_id:
                hits[(c.error_code, c.key_id, c.org_id, c.account_id, c.source_ip)] += c.calls
        for (code, key_id, org_id, account_id, ip), count in hits.items():
            kind, severity = KEY_RISKS[code]
            if not self._cool(kind, f"{key_id}|{ip}"):
                continue
            out.append(
                Detection(
                    kind, severity, "key_risk", org_id,
                    actor_id=account_id,
                    subject_id=key_id,
                    source_ip=ip,
                    detail={"error_code": code, "count": count},
                    # onetoken.risk.keyrisk writes these rows (one per batch and
                    # source); the detectors add the webhook.
                    record=False,
                )
            )
        return out

    def _upstreams(self, now_us: int, batch: Batch) -> list[Detection]:
        totals, failed = _tally(
            batch.calls, lambda c: c.provider, lambda c: c.error_code in UPSTREAM_FAILURE_CODES
        )
        if not totals:
            return []
        window_us = int(self.s.anomaly_bucket_seconds * 1_000_000)
        out: list[Detection] = []
        for provider, total in totals.items():
            q = self._upstream.setdefault(provider, deque())
            q.append((now_us, failed.get(provider, 0), total))
            while q and q[0][0] < now_us - window_us:
                q.popleft()
            fails = sum(f for _, f, _ in q)
            calls_in_window = sum(t for _, _, t in q)
            if (
                fails >= self.s.upstream_alarm_failures
                and fails * 2 >= calls_in_window
                and self._cool("system.upstream_failing", provider)
            ):
                out.append(
                    Detection(
                        "system.upstream_failing", "high", "system_alarm", "",
                        subject_id=provider,
                        detail={"failures": fails, "calls": calls_in_window,
                                "window_s": self.s.anomaly_bucket_seconds},
                    )
                )
        return out

    # -- helpers ----------------------------------------------------------------------------

    def _cool(self, kind: str, subject: str) -> bool:
        """True (and start the cooldown) when (kind, subject) may alert now."""
        now = self._clock()
        key = (kind, subject)
        last = self._alerted.get(key)
        if last is not None and now - last < self.s.alert_cooldown_seconds:
            return False
        if len(self._alerted) > _MAX_TRACKED:
            self._alerted.clear()
        self._alerted[key] = now
        return True

    def _exempt_ip(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return True  # not an address: nothing the gateway could match
        return any(addr in net for net in self._exempt)

    def _block(self, ip: str) -> int | None:
        """Block the source in the control DB and push a snapshot; returns the unix time
        the block ends, None when it cannot or must not be blocked."""
        if self.session_factory is None or self._exempt_ip(ip):
            return None
        try:
            with self.session_factory() as session:
                until = blocking.block(
                    session, ip, self.s.attack_block_seconds, blocking.AUTH_FLOOD
                )
                session.commit()
        except Exception as exc:
            log.error("detectors.block_failed", extra={"exc_type": type(exc).__name__})
            return None
        # The block bumped the config revision: gateways load it at their next poll.
        return int(until.timestamp())

    def _report(self, d: Detection) -> None:
        self.detections += 1
        try:
            if d.record:
                record(
                    SecurityEvent(
                        kind=d.kind,
                        severity=d.severity,
                        org_id=d.org_id,
                        actor_id=d.actor_id,
                        subject_id=d.subject_id,
                        source_ip=d.source_ip,
                        detail=dict(d.detail),
                    )
                )
        except Exception as exc:
            log.error("detectors.record_failed", extra={"exc_type": type(exc).__name__})
        data: dict[str, Any] = {
            "security_kind": d.kind,
            "severity": d.severity,
            **{k: v for k, v in d.detail.items() if not isinstance(v, float)},
            **{k: str(v) for k, v in d.detail.items() if isinstance(v, float)},
        }
        if d.subject_id:
            data["subject_id"] = d.subject_id
        if d.source_ip:
            data["source_ip"] = d.source_ip
        webhooks.emit(d.org_id, d.webhook_kind, data)


def attach(
    events: EventBus, ingestor: Any, settings: DetectorSettings, session_factory: SessionFactory
) -> Detectors:
    """Run the detectors on every batch published on `events` (the ingestor's), and the
    pipeline alarms on every flush cycle. A block bumps the config revision: gateways load
    it at their next snapshot poll."""
    detectors = Detectors(settings, session_factory)
    events.subscribe(Batch, detectors.observe)

    def pipeline() -> None:
        stats: dict[str, int] = {}
        sink_stats = getattr(ingestor.sink, "stats", None)
        if callable(sink_stats):
            stats.update(sink_stats())
        # A journal line that does not parse is a record neither call_log nor the ledger got.
        stats["records_dropped"] = int(getattr(ingestor, "bad_lines", 0))
        detectors.check_pipeline(stats)

    ingestor.flush_hooks.append(pipeline)
    return detectors

