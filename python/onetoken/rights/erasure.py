"""Account cancellation: keys revoked, personal data anonymized, billing records kept.

What happens, in order (docs/retention.md):

1. the account's API keys (owned or created by it) are revoked and the gateway gets a
   snapshot without them; records still queued in the engine are pumped into the ledger
   and ClickHouse, so nothing with the account's addresses arrives after step 3;
2. the account's identifiers (email, mobile, login name, display name) are read, in
   memory only, together with the source addresses its calls and security events came
   from;
3. ClickHouse is rewritten with mutations (`ALTER TABLE ... UPDATE`, waited for with
   mutations_sync): in call_log rows of the account or its keys, source_ip and
   user_agent are emptied; in security_log rows where the account or one of its keys is
   the actor or the subject, likewise, and the identifiers are replaced in `detail`
   (email and mobile number in every row that holds them);
4. the control DB: the account keeps its id (a pseudonymous id: nothing links it to a
   person any more) so orders, invoices, the ledger and call records still add up; its
   login name becomes `erased-<hash>`, email, mobile, name, password, second factor and
   invitations are cleared, sessions and sign-in sources deleted. SQLite is written with
   secure_delete and its WAL checkpointed, so the old values do not linger in free pages.

When ClickHouse cannot be reached, step 4 still happens and what step 3 needs is kept
encrypted in `account_erasures.pending_encrypted` until the retention worker finishes it.
Ledger entries, orders and call costs are never changed: `onetoken billing reconcile`
balances before and after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, or_, select, text
from sqlalchemy.orm import Session

from onetoken.db.models import Account, AdminSession, ApiKey, utcnow
from onetoken.db.session import SessionFactory, bump_revision
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Conflict, NotFound
from onetoken.rights.models import AccountErasure
from onetoken.security.models import LoginSource, LoginThrottle

if TYPE_CHECKING:
    from onetoken.deps import AppState

log = logging.getLogger("onetoken.rights")

ERASED = "[erased]"
# Runs a callable against the open ClickHouse client (the supervisor sink's `read`).
ClientRunner = Callable[[Callable[[Any], Any]], Any]


class ErasureUnavailable(Exception):
    """ClickHouse could not be anonymized now (it is retried later)."""


@dataclass
class Identifiers:
    """What must disappear from ClickHouse; lives in memory (or encrypted) only."""

    account_id: str
    org_id: str
    key_ids: list[str]
    global_needles: list[str] = field(default_factory=list)  # email, mobile
    account_needles: list[str] = field(default_factory=list)  # login name, display name

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> Identifiers:
        return cls(**json.loads(raw))


def pseudonym(account_id: str) -> str:
    return "erased-" + hashlib.sha256(account_id.encode()).hexdigest()[:16]


def _variants(values: Sequence[str | None]) -> list[str]:
    """Each value as written raw and as JSON escapes it (detail is a JSON object)."""
    out: list[str] = []
    for v in values:
        if not v or len(v) < 2:
            continue
        for form in (v, json.dumps(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1]):
            if form not in out:
                out.append(form)
    # Longest first, so a value containing another is replaced whole.
    return sorted(out, key=len, reverse=True)


# -- ClickHouse ------------------------------------------------------------------------------


def _attributed(prefix: str) -> str:
    return (
        f"({prefix}actor_id = {{account:String}} OR {prefix}subject_id = {{account:String}}"
        f" OR has({{keys:Array(String)}}, {prefix}actor_id)"
        f" OR has({{keys:Array(String)}}, {prefix}subject_id))"
    )


def anonymize_clickhouse(client: Any, ids: Identifiers) -> None:
    """The mutations of step 3; synchronous (mutations_sync = 2)."""
    params: dict[str, Any] = {"account": ids.account_id, "keys": ids.key_ids}
    client.command(
        "ALTER TABLE onetoken.call_log UPDATE source_ip = '', user_agent = '' "
        "WHERE account_id = {account:String} OR has({keys:Array(String)}, key_id) "
        "SETTINGS mutations_sync = 2",
        parameters=params,
    )
    attributed = _attributed("")
    detail = "detail"
    conditions = [attributed]
    for i, needle in enumerate(_variants(ids.account_needles)):
        params[f"a{i}"] = needle
        detail = f"replaceAll({detail}, {{a{i}:String}}, {{erased:String}})"
    detail = f"if({attributed}, {detail}, detail)"
    for i, needle in enumerate(_variants(ids.global_needles)):
        params[f"g{i}"] = needle
        detail = f"replaceAll({detail}, {{g{i}:String}}, {{erased:String}})"
        conditions.append(f"position(detail, {{g{i}:String}}) > 0")
    params["erased"] = ERASED
    client.command(
        "ALTER TABLE onetoken.security_log UPDATE "
        f"source_ip = if({attributed}, '', source_ip), "
        f"user_agent = if({attributed}, '', user_agent), "
        f"detail = {detail} "
        f"WHERE {' OR '.join(conditions)} "
        "SETTINGS mutations_sync = 2",
        parameters=params,
    )


# -- the control DB ---------------------------------------------------------------------------


def _secure_delete(session: Session) -> None:
    if session.get_bind().dialect.name == "sqlite":
        session.connection().exec_driver_sql("PRAGMA secure_delete = ON")


def checkpoint(session_factory: SessionFactory) -> None:
    """Fold SQLite's WAL into the main file and truncate it, so rows as they were before
    the erasure do not stay readable in the log file."""
    with session_factory() as session:
        if session.get_bind().dialect.name != "sqlite":
            return
        for _ in range(20):
            busy = session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)")).first()
            if busy is None or not busy[0]:
                return
            session.rollback()
            time.sleep(0.05)
        log.warning("rights.checkpoint_busy")


def _account_keys(session: Session, account: Account) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(
                ApiKey.org_id == account.org_id,
                # Keys it owns; keys it created for someone else stay theirs.
                or_(
                    ApiKey.owner_id == account.id,
                    and_(ApiKey.owner_id.is_(None), ApiKey.created_by == account.id),
                ),
            )
        )
    )


def revoke_keys(session: Session, account: Account) -> list[str]:
    """Step 1 (the caller commits and pushes a snapshot)."""
    now = utcnow()
    ids = []
    for key in _account_keys(session, account):
        ids.append(key.id)
        if key.status != "revoked":
            key.status = "revoked"
            key.revoked_at = now
            key.updated_at = now
    bump_revision(session)
    return ids


def anonymize_account(session: Session, account: Account) -> None:
    """Step 4 (the caller commits)."""
    _secure_delete(session)
    now = utcnow()
    account.login_name = pseudonym(account.id)
    account.email = None
    account.mobile = None
    account.display_name = ""
    account.password_hash = None
    account.totp_secret_encrypted = None
    account.totp_last_step = None
    account.invite_token_hash = None
    account.invite_expires_at = None
    account.last_login_at = None
    account.status = "disabled"
    account.updated_at = now
    for key in _account_keys(session, account):
        # Key names are free text people often personalize ("Ann's laptop").
        key.name = "erased"
    session.execute(delete(AdminSession).where(AdminSession.account_id == account.id))
    session.execute(delete(LoginSource).where(LoginSource.account_id == account.id))
    session.execute(
        delete(LoginThrottle).where(
            LoginThrottle.scope == "account", LoginThrottle.subject == account.id
        )
    )


@dataclass(frozen=True, slots=True)
class ErasureResult:
    account_id: str
    state: str
    keys_revoked: int


def identifiers(account: Account, key_ids: list[str]) -> Identifiers:
    return Identifiers(
        account_id=account.id,
        org_id=account.org_id,
        key_ids=key_ids,
        global_needles=[v for v in (account.email, account.mobile) if v],
        account_needles=[v for v in (account.login_name, account.display_name) if v],
    )


def cancel_account(state: AppState, account_id: str, *, requested_by: str) -> ErasureResult:
    """Cancel and anonymize one account (steps 1-4). Raises NotFound / Conflict."""
    with state.session_factory() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFound("Account not found.")
        if session.get(AccountErasure, account_id) is not None:
            raise Conflict("This account has already been cancelled.", code="already_cancelled")
        key_ids = revoke_keys(session, account)
        session.commit()
        ids = identifiers(account, key_ids)
    state.config_changed()
    runner = _runner(state)
    done = False
    if runner is not None:
        try:
            _drain_pipeline(state)
            runner(lambda client: anonymize_clickhouse(client, ids))
            done = True
        except Exception as exc:
            log.warning("rights.clickhouse_deferred", extra={"exc_type": type(exc).__name__})
    with state.session_factory() as session:
        account = session.get(Account, account_id)
        assert account is not None
        anonymize_account(session, account)
        session.add(
            AccountErasure(
                account_id=account.id,
                org_id=account.org_id,
                requested_by=requested_by,
                state="done" if done else "control_done",
                completed_at=utcnow() if done else None,
                pending_encrypted=None if done else state.secrets.encrypt(ids.to_json()),
            )
        )
        session.commit()
    checkpoint(state.session_factory)
    log.info("rights.account_cancelled", extra={"org_id": ids.org_id, "account_id": account_id})
    return ErasureResult(account_id, "done" if done else "control_done", len(key_ids))


def complete_pending(
    session_factory: SessionFactory, secrets: Secrets, runner: ClientRunner
) -> int:
    """Finish the ClickHouse part of erasures that had to wait; returns how many."""
    finished = 0
    with session_factory() as session:
        pending = list(
            session.scalars(select(AccountErasure).where(AccountErasure.state == "control_done"))
        )
        for row in pending:
            if row.pending_encrypted is None:
                continue
            ids = Identifiers.from_json(secrets.decrypt(row.pending_encrypted))
            runner(lambda client, ids=ids: anonymize_clickhouse(client, ids))  # type: ignore[misc]
            _secure_delete(session)
            row.state = "done"
            row.completed_at = utcnow()
            row.pending_encrypted = None
            session.commit()
            finished += 1
    if finished:
        checkpoint(session_factory)
    return finished


def _runner(state: AppState) -> ClientRunner | None:
    runtime = state.runtime
    if runtime is None:
        return None
    sink = runtime.sink
    read = getattr(sink, "read", None)
    return read if callable(read) else None


def _drain_pipeline(state: AppState, timeout_s: float = 30.0) -> None:
    """Let the record pump land what the engine still queues (and any spool) in
    ClickHouse, so no record with the account's addresses arrives after the mutations.

    The pump thread does the draining (a second drainer would acknowledge the engine's
    journal out of order): wait until the queue is empty and no batch was written for two
    flush intervals."""
    runtime: Any = state.runtime
    if runtime is None or runtime.engine is None:
        return
    interval = state.settings.flush_interval_ms / 1000
    deadline = time.monotonic() + timeout_s
    last = runtime.rows_pumped
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = time.monotonic()
        if runtime.rows_pumped != last:
            last, stable_since = runtime.rows_pumped, now
        elif (
            runtime.engine.stats().get("queue_depth", 0) == 0
            and now - stable_since >= 2 * interval + 0.05
        ):
            break
        time.sleep(interval / 2)
    replay = getattr(runtime, "_ingest_replayed", None)
    runtime.sink.replay_spool(replay)
    for hook in list(getattr(runtime, "flush_hooks", [])):
        try:
            hook()
        except Exception as exc:
            log.warning("rights.flush_hook_failed", extra={"exc_type": type(exc).__name__})
