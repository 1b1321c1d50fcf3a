"""Builds the config snapshot the engine accepts (tests/contract/snapshot.json), and
serves it to gateways over the gateway channel (SnapshotSource).

The engine rejects unknown fields, so every object here is built field by field.
Provider credentials are decrypted into the snapshot, which lives only in memory (the
control process's and the gateway's; the channel carries it, nothing writes it to disk).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.billing import budgets as billing_budgets
from onetoken.billing.service import balances
from onetoken.db.base import utcnow
from onetoken.db.session import SessionFactory, current_revision
from onetoken.ingest.marks import application_marks, spent_marks
from onetoken.keys import applications as keys_applications
from onetoken.keys.models import ApiKey
from onetoken.keys.service import snapshot_fields as keys_snapshot_fields
from onetoken.kit.crypto import Secrets
from onetoken.orgs import restriction
from onetoken.orgs.models import Org
from onetoken.orgs.terms import org_pools
from onetoken.providers import snapshot_parts as providers_part
from onetoken.security import blocking

Snapshot = dict[str, Any]


def build_snapshot(
    session: Session,
    secrets: Secrets,
    *,
    version: int,
    spent_marks: Mapping[str, int],
    org_balances: Mapping[str, int] | None = None,
    key_spent_marks: Mapping[str, int] | None = None,
    pool: str | None = None,
    app_spent_marks: Mapping[str, int] | None = None,
) -> Snapshot:
    """`org_balances` and `spent_marks` must be read together (see SnapshotSource).

    The snapshot of the gateways of `pool` (None: the shared gateways) carries only the
    orgs that pool serves, their keys and their own providers; every other active key
    goes in `elsewhere_keys` by hash alone, so those gateways answer it 403
    wrong_gateway_pool instead of calling it invalid (docs/pools.md)."""
    if org_balances is None:
        org_balances = balances(session)
    # An org with a credit limit may spend that far below zero: the engine is given what
    # it may spend down to zero (its available = balance - ...), the ledger stays as is.
    limits = billing_budgets.credit_limits(session)
    pinned = org_pools(session)
    all_keys = session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
    orgs = [
        o for o in session.scalars(select(Org).order_by(Org.id)) if pinned.get(o.id) == pool
    ]
    served = {o.id for o in orgs}
    keys = [k for k in all_keys if k.org_id in served]
    elsewhere = [
        _elsewhere(k, shared=k.org_id not in pinned)
        for k in all_keys
        if k.org_id not in served and k.status == "active"
    ]
    # Providers, deployments, routes and per-org/per-key gateway settings; with pools in
    # use, only the served orgs' private ones.
    cat = providers_part.catalog(session, secrets, orgs=served if pinned or pool else None)
    org_extra = providers_part.org_settings(session)
    key_policy = providers_part.key_policies(session)
    # Restriction of processing: the org's on the org, the account's on its keys (the
    # engine applies the stricter).
    restricted = restriction.restricted_accounts(session)

    snapshot: Snapshot = {
        "version": version,
        "orgs": [
            providers_part.merge_org_settings(
                {
                    "id": o.id,
                    "status": o.status,
                    "balance": billing_budgets.spendable(
                        int(org_balances.get(o.id, 0)), limits.get(o.id, 0)
                    ),
                    "spent_mark": int(spent_marks.get(o.id, 0)),
                    **_restricted(o.restriction == "restricted"),
                },
                org_extra.get(o.id),
            )
            for o in orgs
        ],
        "keys": [
            _with_policy(
                _key(k, providers_part.visible_names(cat, k.org_id), restricted),
                key_policy.get(k.id),
            )
            for k in keys
        ],
        "providers": cat.providers,
        "models": cat.models,
    }
    if apps := keys_applications.snapshot_entries(session, served):
        snapshot["applications"] = apps
    _add_billing(snapshot, session, spent_marks, key_spent_marks or {}, app_spent_marks or {})
    if blocked := blocking.snapshot_entries(session):  # attack interception
        snapshot["blocked_ips"] = blocked
    if elsewhere:
        snapshot["elsewhere_keys"] = elsewhere
    if cat.routes:
        snapshot["routes"] = cat.routes
    if cat.routing is not None:
        snapshot["routing"] = cat.routing
    return snapshot


def _add_billing(
    snapshot: Snapshot,
    session: Session,
    org_marks: Mapping[str, int],
    key_marks: Mapping[str, int],
    app_marks: Mapping[str, int],
) -> None:
    """Price factors, budgets and the spend windows they are enforced on (billing)."""
    extra = billing_budgets.snapshot_fields(
        session, org_marks=org_marks, key_marks=key_marks, app_marks=app_marks
    )
    for org in snapshot["orgs"]:
        if (fields := extra.orgs.get(org["id"])) is not None:
            billing_budgets.merge_limits(org, fields)
    for key in snapshot["keys"]:
        if (fields := extra.keys.get(key["key_id"])) is not None:
            billing_budgets.merge_limits(key, fields)
    for app in snapshot.get("applications", ()):
        if (fields := extra.applications.get(app["id"])) is not None:
            billing_budgets.merge_limits(app, fields)


def _with_policy(entry: dict[str, Any], policy: dict[str, Any] | None) -> dict[str, Any]:
    if policy is not None:
        entry["policy"] = policy
    return entry


def _restricted(on: bool) -> dict[str, Any]:
    # Absent unless on, like the snapshot's other optional fields.
    return {"restrict_client": True} if on else {}


def _elsewhere(k: ApiKey, *, shared: bool) -> dict[str, Any]:
    # The hash and its secret version only: nothing of the other org (not even its id).
    entry: dict[str, Any] = {"hash": k.hash}
    if k.secret_version != 1:
        entry["secret_version"] = k.secret_version
    if shared:
        entry["shared"] = True
    return entry


def _key(k: ApiKey, org_models: set[str], restricted: set[str]) -> dict[str, Any]:
    # Restricting every key to the names its org can reach (the platform catalog and the
    # org's own private models and aliases) keeps one org's keys off another org's
    # providers and prices, also on an engine that does not filter by models[].org_id.
    if k.allowed_models is None:
        allowed = sorted(org_models)
    else:
        allowed = [m for m in k.allowed_models if m in org_models]
    account_id = k.owner_id or k.created_by
    return {
        "hash": k.hash,
        "key_id": k.id,
        "display": k.display,
        "org_id": k.org_id,
        "account_id": account_id,
        **_restricted(account_id in restricted),
        # The engine knows active and revoked; a disabled key is refused the same way.
        "status": "active" if k.status == "active" else "revoked",
        "expires_at": int(k.expires_at.timestamp()) if k.expires_at else None,
        "allowed_models": allowed,
        # secret_version, not_before, allowed_ips, limits (onetoken.keys).
        **keys_snapshot_fields(k),
    }


def snapshot_json(snapshot: Snapshot) -> bytes:
    return orjson.dumps(snapshot)


# -- serving gateways -----------------------------------------------------------------------

# (org marks, key marks) ingested from one engine instance; onetoken.ingest.marks.spent_marks.
MarksReader = Callable[[Session, str], tuple[dict[str, int], dict[str, int]]]
# What a served snapshot was built from: config revision, budget day and month, pool.
_Built = tuple[int, int, int, str | None]
# Gateways whose last snapshot is remembered (one per instance that polled lately).
_REMEMBERED_INSTANCES = 64


class SnapshotSource:
    """Snapshots for the gateway channel: `GET /internal/gateway/snapshot?instance=`.

    A snapshot is rebuilt when the config revision or the UTC day/month of the budget
    windows changed since that instance's last one, else the gateway's ETag gets a 304.
    A poll may wait for a change (long poll): `changed()` (AppState.config_changed, after
    every change committed through the API) answers waiting gateways at once and waits
    (at most `confirm_s`) until each gateway that polls is serving the change, confirmed
    by its next poll naming the new ETag: an API call that returned has taken effect, as
    when the engine ran in this process. Changes committed by other processes (the CLI)
    are seen within `recheck_s`.
    Balances and that instance's spent marks are read under `mark_lock` (the ingestor's),
    so the engine's available = balance - (spent - spent_mark) - reserved never counts an
    ingested cost twice or misses one; ingestion alone moves both and changes nothing the
    engine computes, so it does not make a snapshot stale.
    """

    def __init__(
        self,
        secrets: Secrets,
        session_factory: SessionFactory,
        mark_lock: AbstractContextManager[Any] | None = None,
        *,
        marks: MarksReader | None = None,
        recheck_s: float = 0.5,
        confirm_s: float = 2.0,
    ) -> None:
        self.secrets = secrets
        self.session_factory = session_factory
        self.mark_lock: AbstractContextManager[Any] = mark_lock or threading.Lock()
        self._marks = marks or spent_marks
        self.recheck_s = recheck_s
        self.confirm_s = confirm_s
        # Bumped by changed(); waiting polls wake up on it.
        self._generation = 0
        self._closed = False
        self._wake = threading.Condition()
        # instance -> (revision its engine confirmed serving, when it last polled).
        self._confirmed: dict[str, tuple[int, float]] = {}
        # Versions rise across restarts of the control process too (the engine ignores a
        # version not above the one it serves): they start at the wall clock's milliseconds.
        self._version = 0
        self._lock = threading.Lock()
        # instance -> ((revision, day, month, pool), etag of the snapshot built for it).
        self._served: OrderedDict[str, tuple[_Built, str]] = OrderedDict()

    def changed(self) -> None:
        """A change was committed: answer the waiting polls now, then wait until the
        gateways that poll confirm serving it (bounded by `confirm_s`)."""
        with self.session_factory() as session:
            revision = current_revision(session)
        with self._wake:
            self._generation += 1
            self._wake.notify_all()
            self._wake.wait_for(partial(self._all_confirmed, revision), timeout=self.confirm_s)

    def _all_confirmed(self, revision: int) -> bool:
        # A gateway that stopped polling (stopped, killed) is not waited for: a polling one
        # asks at least every recheck_s while it waits.
        active_since = time.monotonic() - max(5 * self.recheck_s, 2.0)
        return self._closed or all(
            confirmed >= revision
            for confirmed, polled in self._confirmed.values()
            if polled >= active_since
        )

    def _polled(self, instance_id: str, confirmed: int | None) -> None:
        with self._wake:
            before = self._confirmed.get(instance_id, (-1, 0.0))[0]
            self._confirmed[instance_id] = (
                before if confirmed is None else max(before, confirmed),
                time.monotonic(),
            )
            while len(self._confirmed) > _REMEMBERED_INSTANCES:
                del self._confirmed[next(iter(self._confirmed))]
            self._wake.notify_all()

    def close(self) -> None:
        """The control process is stopping: waiting polls answer now, new ones never wait
        (a long poll would hold up the control API's shutdown)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()

    def poll(
        self,
        instance_id: str,
        if_none_match: str | None,
        wait_s: float = 0.0,
        pool: str | None = None,
    ) -> tuple[str, bytes | None]:
        """As `get`, but while `if_none_match` is current wait up to `wait_s` for a change."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._wake:
                generation = self._generation
            etag, body = self.get(instance_id, if_none_match, pool)
            remaining = deadline - time.monotonic()
            if body is not None or remaining <= 0:
                return etag, body
            with self._wake:
                if self._closed:
                    return etag, body
                self._wake.wait_for(
                    partial(self._woken, generation), timeout=min(remaining, self.recheck_s)
                )

    def _woken(self, generation: int) -> bool:
        return self._closed or self._generation != generation

    def get(
        self, instance_id: str, if_none_match: str | None, pool: str | None = None
    ) -> tuple[str, bytes | None]:
        """(ETag, snapshot JSON) or, when `if_none_match` is still current, (ETag, None).
        `pool`: the gateway pool the instance serves (None: the shared gateways)."""
        with self._lock:
            with self.session_factory() as session:
                revision = current_revision(session)
            window = billing_budgets.Window.at(utcnow())
            key = (revision, window.day, window.month, pool)
            last = self._served.get(instance_id)
            # Naming the ETag it was given says the engine serves that snapshot.
            current = last is not None and last[1] == if_none_match
            self._polled(instance_id, last[0][0] if last is not None and current else None)
            if last is not None and current and last[0] == key:
                self._served.move_to_end(instance_id)
                return last[1], None
            self._version = max(self._version + 1, time.time_ns() // 1_000_000)
            with self.mark_lock, self.session_factory() as session:
                # Read again inside the transaction that reads the data: a change committed
                # since is in this snapshot, and its revision is the one remembered.
                key = (current_revision(session), window.day, window.month, pool)
                org_marks, key_marks = self._marks(session, instance_id)
                snap = build_snapshot(
                    session,
                    self.secrets,
                    version=self._version,
                    spent_marks=org_marks,
                    org_balances=balances(session),
                    key_spent_marks=key_marks,
                    pool=pool,
                    app_spent_marks=application_marks(session, instance_id),
                )
            etag = f'"{self._version}"'
            self._served[instance_id] = (key, etag)
            self._served.move_to_end(instance_id)
            while len(self._served) > _REMEMBERED_INSTANCES:
                self._served.popitem(last=False)
            return etag, snapshot_json(snap)
