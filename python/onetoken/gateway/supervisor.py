"""Owns the Rust engine: start/stop, snapshot pushes, and the record pump.

Money flow: the engine counts `spent` per org in memory; the pump writes each record's
cost to the ledger (idempotent by request id) and adds it to `ingested_cost[org]`. A
snapshot carries balance = SUM(ledger) and spent_mark = ingested_cost read under one lock,
so the engine's available = balance - (spent - spent_mark) - reserved never counts a
cost twice or misses one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import orjson

from onetoken.billing import service as billing
from onetoken.billing.upkeep import BillingUpkeep
from onetoken.db.session import SessionFactory, current_revision
from onetoken.gateway.snapshot import build_snapshot, snapshot_json
from onetoken.kit.crypto import Secrets
from onetoken.kit.files import private_dir
from onetoken.security.net import networks
from onetoken.settings import Settings

log = logging.getLogger("onetoken.gateway")

Batch = dict[str, list[Any]]

# How often the pump checks the queue depth between flush intervals.
_DEPTH_POLL_S = 0.02
# How often spool/overflow files are looked for while running.
_REPLAY_INTERVAL_S = 5.0


class EngineLike(Protocol):
    def start(self) -> str: ...
    def load_snapshot(self, snapshot_json: bytes) -> int: ...
    def drain_records(self, max_records: int) -> dict[str, list[Any]] | None: ...
    def stop(self, grace_seconds: float) -> None: ...
    def stats(self) -> dict[str, int]: ...
    @property
    def instance_id(self) -> str: ...


class SinkLike(Protocol):
    def write(self, batch: Batch) -> None: ...
    def replay_spool(self, on_batch: Callable[[Batch], None] | None = None) -> int: ...
    def close(self) -> None: ...


def _cidrs(spec: str) -> list[str]:
    """A CIDR-list setting as the engine takes it: one normalised network per entry."""
    return [str(n) for n in networks(spec)]


def engine_config(settings: Settings, secrets: Secrets) -> dict[str, Any]:
    """The engine configuration (tests/contract/engine_config.json)."""
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = {"cert_path": str(settings.tls_cert), "key_path": str(settings.tls_key)}
    config: dict[str, Any] = {
        "listen": settings.gateway_listen,
        "key_hash_secret_hex": secrets.key_hash.hex(),
        "tls": tls,
        "worker_threads": settings.worker_threads,
        "spool_dir": str(settings.spool_dir.resolve()),
        "max_body_bytes": settings.max_body_bytes,
        "shutdown_grace_ms": int(settings.shutdown_grace_seconds * 1000),
        "upstream_private_cidrs": _cidrs(settings.upstream_private_cidrs),
        "trusted_proxies": _cidrs(settings.gateway_trusted_proxies),
        "proxy_protocol": settings.gateway_proxy_protocol,
        "metrics_listen": settings.metrics_listen,
        "max_connections": settings.gateway_max_connections,
        "header_read_timeout_ms": settings.gateway_header_read_timeout_ms,
        "idle_timeout_ms": settings.gateway_idle_timeout_ms,
        "max_header_bytes": settings.gateway_max_header_bytes,
        "max_upstream_event_bytes": settings.upstream_max_event_bytes,
        "max_upstream_body_bytes": settings.upstream_max_body_bytes,
        "upstream_deadline_ms": int(settings.upstream_deadline_seconds * 1000),
        "phase_timing": settings.gateway_phase_timing,
    }
    # Optional in docs/snapshot.md; sent only when they differ from the defaults.
    if secrets.key_hash_version != 1:
        config["key_hash_secret_version"] = secrets.key_hash_version
    if secrets.previous_key_hashes:
        config["previous_key_hash_secrets"] = [
            {"version": v, "secret_hex": s.hex()} for v, s in secrets.previous_key_hashes
        ]
    return config


def _default_engine_factory(config_json: bytes) -> EngineLike:
    from onetoken import _core

    return _core.Engine(config_json)


def _default_sink(settings: Settings) -> SinkLike:
    from onetoken.analytics.sink import CallLogSink

    return CallLogSink(settings)


_ID_FIELD = {"org": "org_id", "guard": "org_id", "key": "key_id", "provider": "provider_id"}


def _log_dropped(engine: EngineLike, version: int) -> None:
    """Entries the engine left out of the snapshot it now serves (the rest serves):
    kind, reason code and the id when it is one the log may carry; names are left out."""
    report = getattr(engine, "snapshot_dropped", None)
    for entry in report() if report is not None else []:
        extra = {"kind": entry["kind"], "error_code": entry["reason"], "version": version}
        if (field := _ID_FIELD.get(entry["kind"])) is not None:
            extra[field] = entry["id"]
        log.warning("snapshot.entry_dropped", extra=extra)


class GatewaySupervisor:
    def __init__(
        self,
        settings: Settings,
        secrets: Secrets,
        session_factory: SessionFactory,
        *,
        engine_factory: Callable[[bytes], EngineLike] | None = None,
        sink: SinkLike | None = None,
    ) -> None:
        self.settings = settings
        self.secrets = secrets
        self.session_factory = session_factory
        self._engine_factory = engine_factory or _default_engine_factory
        self._sink = sink
        self.engine: EngineLike | None = None
        self.address: str | None = None
        # Guards (ledger commit, ingested_cost update) against snapshot reads.
        self._mark_lock = threading.Lock()
        # Serializes pushes so versions rise in the order the data was read.
        self._push_lock = threading.Lock()
        self._ingested: dict[str, int] = defaultdict(int)
        # Same as _ingested, per API key (keys[].usage.spent_mark for per-key budgets).
        self._ingested_keys: dict[str, int] = defaultdict(int)
        self._billing = BillingUpkeep(session_factory)
        self._version = 0
        self._seen_revision = -1
        self._engine_start_us = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self.rows_pumped = 0
        # Called on every flush cycle and once more at stop (e.g. the security log writer).
        self.flush_hooks: list[Callable[[], None]] = []
        # See every drained batch after the ledger took it (metadata-only detectors).
        self.batch_observers: list[Callable[[Batch], None]] = []

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def sink(self) -> SinkLike:
        if self._sink is None:
            self._sink = _default_sink(self.settings)
        return self._sink

    def start(self) -> str:
        """Replay spooled records, start the engine, push the first snapshot, start the
        pump and the config watcher. Raises the engine's BindError/ConfigError at once."""
        self.settings.ensure_dirs()
        self._connect_sink()
        replayed = self.sink.replay_spool(self._ingest_replayed)
        if replayed:
            log.info("pump.spool_replayed", extra={"replayed": replayed})
        engine = self._engine_factory(orjson.dumps(engine_config(self.settings, self.secrets)))
        # From now on this engine's journal is live: replay only other (dead) instances'.
        sink: Any = self.sink
        if hasattr(sink, "live_instance"):
            sink.live_instance = engine.instance_id
        self._engine_start_us = time.time_ns() // 1000
        self.address = engine.start()
        self.engine = engine
        self.push_snapshot()
        for name, target in (
            ("onetoken-pump", self._pump_loop),
            ("onetoken-watch", self._watch_loop),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "gateway.started",
            extra={"address": self.address, "instance_id": engine.instance_id},
        )
        return self.address

    def _connect_sink(self) -> None:
        """Open ClickHouse before serving. A configuration problem (bad DSN, chDB path
        held by another process, failed migration) stops startup with its message; a
        server that is merely unreachable is not fatal: records spool until it is back."""
        connect = getattr(self.sink, "connect", None)
        if not callable(connect):
            return
        from onetoken.analytics.clickhouse import (
            ChdbLockedError,
            ChdbPathConflictError,
            ClickHouseUnavailableError,
        )

        try:
            connect()
        except (ChdbLockedError, ChdbPathConflictError):
            raise
        except ClickHouseUnavailableError as exc:
            if self.settings.clickhouse_dsn.startswith("chdb"):
                raise
            log.warning("analytics.unavailable_spooling", extra={"exc_type": type(exc).__name__})

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop the engine (in-flight requests get `grace_seconds`), then drain every
        record into the ledger and ClickHouse. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        engine = self.engine
        if engine is not None:
            log.info("gateway.stopping", extra={"grace_seconds": grace})
            # The pump keeps running meanwhile so the queue does not fill up and overflow.
            engine.stop(grace)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()
        if engine is not None:
            while self.pump_once() > 0:
                pass
        self.sink.replay_spool(self._ingest_replayed)
        self._run_flush_hooks()
        self.sink.close()
        log.info("gateway.stopped", extra={"rows": self.rows_pumped})

    # -- snapshots ----------------------------------------------------------------------

    def push_snapshot(self) -> int | None:
        """Build a snapshot from the DB and hand it to the engine; returns the version
        serving, or None when there is no engine or the engine refused the snapshot."""
        engine = self.engine
        if engine is None:
            return None
        with self._push_lock:
            with self._mark_lock, self.session_factory() as session:
                revision = current_revision(session)
                org_balances = billing.balances(session)
                marks = dict(self._ingested)
                snap = build_snapshot(
                    session,
                    self.secrets,
                    version=self._version + 1,
                    spent_marks=marks,
                    org_balances=org_balances,
                    key_spent_marks=dict(self._ingested_keys),
                )
                self._billing.pushed()
            self._version += 1
            try:
                served = engine.load_snapshot(snapshot_json(snap))
            except Exception as exc:
                # The previous snapshot keeps serving; the message may name config values,
                # so only the class is logged.
                log.error(
                    "snapshot.rejected",
                    extra={"exc_type": type(exc).__name__, "version": self._version},
                )
                self._seen_revision = revision
                return None
            self._seen_revision = revision
            log.debug("snapshot.pushed", extra={"version": served, "revision": revision})
            _log_dropped(engine, served)
            return served

    def _watch_loop(self) -> None:
        interval = self.settings.config_watch_interval_ms / 1000
        while not self._stop.wait(interval):
            try:
                with self.session_factory() as session:
                    revision = current_revision(session)
                # Due prices, lapsed packages (both bump the revision) and a new UTC day
                # or month for budgets.
                stale = self._billing.tick()
                if stale:
                    with self.session_factory() as session:
                        revision = current_revision(session)
                if stale or revision != self._seen_revision:
                    self.push_snapshot()
            except Exception as exc:
                log.warning("snapshot.watch_failed", extra={"exc_type": type(exc).__name__})

    # -- record pump --------------------------------------------------------------------

    def pump_once(self) -> int:
        """Drain one batch: ledger, then ingested_cost, then ClickHouse. Returns rows."""
        engine = self.engine
        if engine is None:
            return 0
        batch = engine.drain_records(self.settings.flush_max_rows)
        if not batch:
            return 0
        rows = len(batch.get("request_id", ()))
        if rows == 0:
            return 0
        try:
            self._ingest(batch, current_instance=True)
        except Exception as exc:
            # The ledger must see every cost: park the batch where replay finds it; replay
            # writes the ledger first and ClickHouse after.
            log.error("pump.ledger_failed", extra={"exc_type": type(exc).__name__, "rows": rows})
            self._park(batch)
        else:
            self.sink.write(batch)
        # Stored (ledger and ClickHouse, or a spool file): the engine may drop the journal
        # segments that held these records.
        ack = getattr(engine, "ack_records", None)
        if callable(ack):
            ack(rows)
        self._billing.observe(batch)
        for observe in self.batch_observers:
            try:
                observe(batch)
            except Exception as exc:
                log.error("pump.observer_failed", extra={"exc_type": type(exc).__name__})
        self.rows_pumped += rows
        return rows

    def _run_flush_hooks(self) -> None:
        for hook in self.flush_hooks:
            try:
                hook()
            except Exception as exc:
                log.error("pump.flush_hook_failed", extra={"exc_type": type(exc).__name__})

    def _pump_loop(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        next_flush = time.monotonic() + interval
        next_replay = time.monotonic() + _REPLAY_INTERVAL_S
        while not self._stop.wait(_DEPTH_POLL_S):
            try:
                now = time.monotonic()
                due = now >= next_flush
                if not due and self.engine is not None:
                    due = self.engine.stats().get("queue_depth", 0) >= self.settings.flush_max_rows
                if due:
                    while self.pump_once() >= self.settings.flush_max_rows:
                        pass
                    self._run_flush_hooks()
                    next_flush = time.monotonic() + interval
                if now >= next_replay:
                    self.sink.replay_spool(self._ingest_replayed)
                    next_replay = time.monotonic() + _REPLAY_INTERVAL_S
            except Exception as exc:
                log.error("pump.failed", extra={"exc_type": type(exc).__name__})

    def _ingest_replayed(self, batch: Batch) -> None:
        self._ingest(batch, current_instance=None)

    def _ingest(self, batch: Batch, *, current_instance: bool | None) -> None:
        """Write usage entries and move spent_mark for the costs this engine counted.

        `current_instance=None` (replayed files): a record belongs to this engine when it
        started after the engine did; earlier ones were counted by an engine that is gone.
        """
        usages = _usages(batch)
        if not usages:
            return
        with self._mark_lock:
            with self.session_factory() as session:
                inserted = billing.record_usage(session, usages)
                session.commit()
            for u in inserted:
                mine = (
                    current_instance
                    if current_instance is not None
                    else (self._engine_start_us > 0 and u.ts_us >= self._engine_start_us)
                )
                if mine:
                    self._ingested[u.org_id] += u.cost
                    if u.key_id:
                        self._ingested_keys[u.key_id] += u.cost

    def _park(self, batch: Batch) -> None:
        # Same line format and prefix as the engine's overflow files, so the sink's
        # replay picks it up and passes it through the ledger callback first.
        spool = self.settings.spool_dir
        private_dir(spool)
        path = spool / f"overflow-pump-{time.time_ns()}-{os.getpid()}.jsonl"
        names = list(batch)
        payload = b"".join(
            orjson.dumps(dict(zip(names, row, strict=True))) + b"\n"
            for row in zip(*(batch[n] for n in names), strict=True)
        )
        _write_durably(path, payload)

    def ingested_cost(self) -> dict[str, int]:
        with self._mark_lock:
            return dict(self._ingested)

    def ingested_key_cost(self) -> dict[str, int]:
        with self._mark_lock:
            return dict(self._ingested_keys)


def _usages(batch: Batch) -> list[billing.Usage]:
    try:
        costs = batch["cost"]
        orgs = batch["org_id"]
        ids = batch["request_id"]
        ts = batch["ts"]
    except KeyError:
        return []
    n = len(ids)
    keys = batch.get("key_id") or [""] * n
    models = batch.get("model_requested") or [""] * n
    return [
        billing.Usage(
            org_id=o, request_id=r, cost=int(c), ts_us=_ts_us(t), key_id=k or "", model=m or ""
        )
        for o, r, c, t, k, m in zip(orgs, ids, costs, ts, keys, models, strict=False)
        if c and int(c) > 0
    ]


def _ts_us(value: Any) -> int:
    if isinstance(value, int):
        return value
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1_000_000)
    return int(value)


def _write_durably(path: Path, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
