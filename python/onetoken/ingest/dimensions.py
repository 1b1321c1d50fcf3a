"""Names for the ids in the call log: the control DB's orgs, providers, models, keys and
applications, copied into ClickHouse's dimension tables (analytics migrations 007 and
010) so that analytics
queries can show names where call_log holds ids.

Names and display ids only: a key's hash, a provider's credential and base URL, accounts
and their e-mail addresses stay in the control DB. What is copied is the explicit column
list of each table below, nothing else.

The sync compares the control DB with what the dimension tables hold (FINAL) and writes
only the rows that differ: a new or renamed thing gets a fresh row (the newest updated_at
wins under FINAL), a thing gone from the control DB gets a row with deleted = 1 that keeps
its last name, so that older calls still show it. When a row replaced an older one (a
rename, a deletion, a key renamed "erased" by account erasure) the table is merged at once,
so the old name leaves the disk instead of waiting for a background merge. Every control
process may run it: two syncs write the same values, and FINAL keeps one.

DimensionSync runs it in the control process: at start, within POLL_S of any change the
engine must see (the control DB's config revision, which changes of keys, providers and
models and new orgs bump), and every `interval_s` (for what does not bump it, such as an
org's new name).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.analytics.clickhouse import ttl_target
from onetoken.analytics.columns import SHARED_DATABASE
from onetoken.db.session import SessionFactory, current_revision
from onetoken.keys.models import ApiKey, Application
from onetoken.kit.worker import LoopThread
from onetoken.orgs.models import Org
from onetoken.providers.models import Model, Provider

log = logging.getLogger("onetoken.ingest")

ClientRunner = Callable[[Callable[[Any], Any]], Any]

#: Per dimension table: its key columns, then its value columns (deleted and updated_at
#: follow). Only these columns are ever read from the control DB into ClickHouse.
TABLES: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "dim_orgs": (("org_id",), ("name",)),
    "dim_providers": (("provider_id",), ("org_id", "name", "vendor", "region")),
    "dim_models": (("org_id", "model"), ("vendor",)),
    "dim_keys": (("key_id",), ("org_id", "display_id", "name")),
    "dim_applications": (("application_id",), ("org_id", "name")),
}
POLL_S: Final = 2.0
INTERVAL_S: Final = 60.0

#: table -> {key: values}
Dimensions = dict[str, dict[tuple[str, ...], tuple[str, ...]]]


def from_control(session: Session) -> Dimensions:
    """What the dimension tables should hold, from the control DB."""
    models: dict[tuple[str, ...], tuple[str, ...]] = {}
    # Several deployments may serve one upstream model: the last vendor in name order
    # names it (a declared one over none), so that the choice is the same every time.
    for org_id, model, vendor in session.execute(
        select(Model.org_id, Model.upstream_model, Provider.vendor)
        .join(Provider, Provider.id == Model.provider_id)
        .order_by(Model.org_id, Model.upstream_model, Provider.vendor)
    ):
        models[(org_id or "", model)] = (vendor or "",)
    return {
        "dim_orgs": {(i,): (name,) for i, name in session.execute(select(Org.id, Org.name))},
        "dim_providers": {
            (i,): (org_id or "", name, vendor or "", region or "")
            for i, org_id, name, vendor, region in session.execute(
                select(Provider.id, Provider.org_id, Provider.name, Provider.vendor,
                       Provider.region)
            )
        },
        "dim_models": models,
        "dim_keys": {
            (i,): (org_id, display, name)
            for i, org_id, display, name in session.execute(
                select(ApiKey.id, ApiKey.org_id, ApiKey.display, ApiKey.name)
            )
        },
        "dim_applications": {
            (i,): (org_id, name)
            for i, org_id, name in session.execute(
                select(Application.id, Application.org_id, Application.name)
            )
        },
    }


def from_clickhouse(client: Any) -> tuple[Dimensions, Dimensions]:
    """(live, deleted): what the dimension tables hold under FINAL."""
    live: Dimensions = {}
    deleted: Dimensions = {}
    for table, (keys, values) in TABLES.items():
        live[table], deleted[table] = {}, {}
        columns = ", ".join((*keys, *values))
        rows = client.query(
            f"SELECT {columns}, deleted FROM {SHARED_DATABASE}.{table} FINAL"  # noqa: S608
        ).result_rows
        for row in rows:
            target = deleted if row[-1] else live
            target[table][tuple(row[: len(keys)])] = tuple(row[len(keys) : -1])
    return live, deleted


def changes(
    control: Dimensions, live: Dimensions
) -> dict[str, list[tuple[tuple[str, ...], tuple[str, ...], int]]]:
    """Per table, the rows to write: (key, values, deleted). A thing marked deleted that
    is back in the control DB is written live again."""
    out: dict[str, list[tuple[tuple[str, ...], tuple[str, ...], int]]] = {}
    for table in TABLES:
        want, have = control[table], live[table]
        rows = [(k, v, 0) for k, v in want.items() if have.get(k) != v]
        rows += [(k, v, 1) for k, v in have.items() if k not in want]
        if rows:
            out[table] = sorted(rows)
    return out


def write(client: Any, control: Dimensions) -> int:
    """Bring the dimension tables in step with `control`; returns the rows written."""
    live, deleted = from_clickhouse(client)
    written = 0
    now = datetime.now(UTC)
    for table, rows in changes(control, live).items():
        keys, values = TABLES[table]
        client.insert(
            f"{SHARED_DATABASE}.{table}",
            [[*k, *v, gone, now] for k, v, gone in rows],
            column_names=[*keys, *values, "deleted", "updated_at"],
        )
        written += len(rows)
        replaced = any(k in live[table] or k in deleted[table] for k, _, _ in rows)
        target = ttl_target(client, f"{SHARED_DATABASE}.{table}") if replaced else None
        if target is not None:
            # The replaced row holds an old name (maybe one erased on purpose): merge now.
            client.command(f"OPTIMIZE TABLE {target.table}{target.on_cluster} FINAL")
    return written


def sync(session_factory: SessionFactory, run: ClientRunner) -> int:
    """One sync: read the control DB, then write the differences through `run` (the
    ingestion sink's read, which serializes this with the inserts)."""
    with session_factory() as session:
        control = from_control(session)
    return int(run(lambda client: write(client, control)))


class DimensionSync:
    """Runs sync() in a daemon thread of the control process: at start, after each change
    of the config revision (checked every `poll_s`), and every `interval_s`."""

    def __init__(
        self,
        session_factory: SessionFactory,
        run: ClientRunner,
        *,
        poll_s: float = POLL_S,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self._session_factory = session_factory
        self._run = run
        self.poll_s = poll_s
        self.interval_s = interval_s
        self._worker = LoopThread("onetoken-dimensions", self._loop)
        self.syncs = 0
        self.rows_written = 0
        self.failures = 0

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._worker.stop(timeout)

    def notify(self) -> None:
        """Sync now (the next loop turn) rather than at the next revision check."""
        self._worker.wake.set()

    def _revision(self) -> int:
        with self._session_factory() as session:
            return current_revision(session)

    def _loop(self) -> None:
        stopping, wake = self._worker.stopping, self._worker.wake
        synced_revision: int | None = None
        synced_at = 0.0
        while not stopping.is_set():
            pause = self.poll_s
            try:
                revision = self._revision()
                due = time.monotonic() - synced_at >= self.interval_s
                if wake.is_set() or due or revision != synced_revision:
                    wake.clear()
                    self.rows_written += sync(self._session_factory, self._run)
                    self.syncs += 1
                    synced_revision, synced_at = revision, time.monotonic()
            except Exception as exc:
                # ClickHouse down or the control DB busy: the next turn tries again.
                # Not again at every poll while it lasts: at the next interval, or a wake.
                self.failures += 1
                pause = self.interval_s
                log.warning("ingest.dimensions_failed", extra={"exc_type": type(exc).__name__})
            wake.wait(pause)
