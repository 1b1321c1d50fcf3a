"""Account cancellation: keys revoked, personal data anonymized, billing records kept.

What happens (docs/retention.md):

On the request, in one transaction of the control DB:

1. the account's API keys (owned or created by it) are revoked and the gateway gets a
   snapshot without them;
2. the account's identifiers (email, mobile, login name, display name) and key ids are
   read, and kept encrypted in `account_erasures.pending_encrypted` (the queue of
   ClickHouse erasures) until step 4 is done;
3. the account keeps its id (a pseudonymous id: nothing links it to a person any more) so
   orders, invoices, the ledger and call records still add up; its login name becomes
   `erased-<hash>`, email, mobile, name, password, second factor and invitations are
   cleared, sessions and sign-in sources deleted, the addresses its acceptances of the
   terms of service came from cleared (the acceptances stay); in its org's tickets, what
   it submitted is erased (tickets.service.erase_account: the content of tickets it
   opened, its own messages and attachments elsewhere; the files are deleted after the
   commit). SQLite is written with secure_delete and its WAL checkpointed, so the old
   values do not linger in free pages.

Then, in the erasure worker, for a batch of queued accounts at a time:

4. records still queued in the engine are pumped into the ledger and ClickHouse (so none
   with the accounts' addresses arrives afterwards), then one mutation per table rewrites
   the batch: in call_log rows of the accounts or their keys, source_ip and user_agent are
   emptied; in security_log rows where one of them is the actor or the subject, likewise,
   and their names are replaced in `detail` (email and mobile number in every row that
   holds them). The values are passed as data in work tables, never in the mutation's
   text, which ClickHouse keeps; the parts the mutations replaced are deleted at once.
   On a cluster the mutations go to the local tables ON CLUSTER, and the work tables are
   filled on every server.

Under a legal hold on the account's org (rights.holds), step 1 only, and the account is
disabled: steps 2 to 4 wait (state `held`) until the hold ends, and so does step 4 of
erasures the hold found queued.

Ledger entries, orders and call costs are never changed: `onetoken billing reconcile`
balances before and after."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, or_, select, text, update
from sqlalchemy.orm import Session

from onetoken.analytics.clickhouse import call_log_tables, ttl_target
from onetoken.analytics.columns import SECURITY_LOG_TABLE
from onetoken.db.base import utcnow
from onetoken.db.session import SessionFactory, bump_revision
from onetoken.keys.models import ApiKey
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Conflict, NotFound
from onetoken.kit.worker import LoopThread
from onetoken.mail.models import MailMessage
from onetoken.orgs.models import (
    Account,
    AdminSession,
    PasswordReset,
    SsoIdentity,
    TermsAcceptance,
)
from onetoken.rights import holds
from onetoken.rights.models import AccountErasure
from onetoken.security.models import LoginSource, LoginThrottle
from onetoken.tickets import service as tickets_service
from onetoken.tickets.store import open_store

if TYPE_CHECKING:
    from onetoken.ingest.ingestor import Ingestor
    from onetoken.state import AppState

log = logging.getLogger("onetoken.rights")

ERASED = "[erased]"
# Runs a callable against the open ClickHouse client (the ingestor sink's `read`).
ClientRunner = Callable[[Callable[[Any], Any]], Any]


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

# Accounts per batch: one pair of mutations (call_log, security_log) rewrites them all.
ERASURE_BATCH = 200
# Work tables of a batch. What is erased (ids, email, names, ...) is inserted here as data
# and the mutations read it through subqueries, so the commands ClickHouse keeps after a
# mutation (system.mutations, mutation_*.txt beside the table, and on a cluster the
# mutation log in Keeper) name none of it. Memory engine: never on disk, emptied after
# every batch; a mutation that a crash left unfinished finds them empty after the restart
# and changes nothing. On a cluster they exist on every server and are filled on every
# server: each replica of each shard runs the mutations itself, on its own rows.
ERASURE_SUBJECTS = "onetoken.erasure_subjects"
ERASURE_NEEDLES = "onetoken.erasure_needles"
_WORK_TABLES = {
    ERASURE_SUBJECTS: ("id",),
    ERASURE_NEEDLES: ("scope", "needle"),
}
# How long replaced parts stay on disk, set on both tables by migration 006; lowered for
# the few seconds after a batch, so the rows as they were before leave the disk at once.
OUTDATED_PARTS_LIFETIME_S = 60
OUTDATED_PARTS_WAIT_S = 120.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where a table's rows are rewritten: the table itself on a single node; on a cluster
    (analytics.cluster) the local tables under its Distributed table, on every server
    (a Distributed table takes no mutation)."""

    table: str
    cluster: str | None

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER {self.cluster}" if self.cluster else ""


def target(client: Any, table: str) -> Target:
    found = ttl_target(client, table)
    if found is None or not found.on_cluster:
        return Target(table, None)
    return Target(found.table, found.on_cluster.removeprefix(" ON CLUSTER "))


_SUBJECTS = f"(SELECT id FROM {ERASURE_SUBJECTS})"  # noqa: S608 (constants only)
_ATTRIBUTED = f"(actor_id IN {_SUBJECTS} OR subject_id IN {_SUBJECTS})"


def _needles(scope: str) -> str:
    # Longest first, so a value containing another is replaced whole.
    select = "SELECT arrayReverseSort(n -> length(n), groupArray(needle)) FROM"
    return f"({select} {ERASURE_NEEDLES} WHERE scope = '{scope}')"


def _replaced(needles: str, value: str) -> str:
    return f"arrayFold((acc, n) -> replaceAll(acc, n, '{ERASED}'), {needles}, {value})"


# Each replica of a Replicated table runs a mutation itself, so ClickHouse refuses one
# that reads another table unless told that every replica reads the same: the work tables
# filled on every server make it so. A table that is not Replicated ignores the setting.
# The other way to satisfy that check, running the subqueries once on the initiator, would
# write their results (the erased values) into the mutation's text, so it is turned off
# whatever the user's profile says.
_MUTATION_SETTINGS = (
    "SETTINGS mutations_sync = 2, allow_nondeterministic_mutations = 1, "
    "mutations_execute_subqueries_on_initiator = 0"
)


def call_log_mutation(table: Target) -> str:
    return (
        f"ALTER TABLE {table.table}{table.on_cluster} UPDATE source_ip = '', user_agent = '' "
        f"WHERE account_id IN {_SUBJECTS} OR key_id IN {_SUBJECTS} {_MUTATION_SETTINGS}"
    )


def security_log_mutation(table: Target) -> str:
    """In rows where an erased account or key is the actor or the subject: no address, no
    User-Agent, and its login and display names replaced in `detail`; email addresses and
    mobile numbers are replaced in every row that holds them."""
    detail = _replaced(
        _needles("global"), f"if({_ATTRIBUTED}, {_replaced(_needles('account'), 'detail')}, detail)"
    )
    return (
        f"ALTER TABLE {table.table}{table.on_cluster} UPDATE "
        f"source_ip = if({_ATTRIBUTED}, '', source_ip), "
        f"user_agent = if({_ATTRIBUTED}, '', user_agent), "
        f"detail = {detail} "
        f"WHERE {_ATTRIBUTED} OR arrayExists(n -> position(detail, n) > 0, {_needles('global')}) "
        f"{_MUTATION_SETTINGS}"
    )


def anonymize_clickhouse(client: Any, batch: Sequence[Identifiers]) -> None:
    """The mutations of step 4 for a batch of accounts; synchronous (mutations_sync = 2:
    on a cluster, once every replica has run them)."""
    # Every call_log: an account's calls may be in its org's pool database too.
    call_logs = [target(client, table) for table in call_log_tables(client)]
    security_log = target(client, SECURITY_LOG_TABLE)
    cluster = next((t.cluster for t in (*call_logs, security_log) if t.cluster), None)
    for table, columns in _WORK_TABLES.items():
        definition = ", ".join(f"{c} String" for c in columns)
        client.command(
            f"CREATE TABLE IF NOT EXISTS {table}{Target(table, cluster).on_cluster} "
            f"({definition}, copy UInt32) ENGINE = Memory"
        )
    subjects = sorted({i for ids in batch for i in (ids.account_id, *ids.key_ids)})
    needles = sorted(
        {("account", n) for ids in batch for n in _variants(ids.account_needles)}
        | {("global", n) for ids in batch for n in _variants(ids.global_needles)}
    )
    try:
        _empty_work_tables(client, cluster)
        _fill(client, ERASURE_SUBJECTS, [(i,) for i in subjects], cluster)
        if needles:
            _fill(client, ERASURE_NEEDLES, needles, cluster)
        for call_log in call_logs:
            client.command(call_log_mutation(call_log))
        client.command(security_log_mutation(security_log))
    finally:
        _empty_work_tables(client, cluster)


def _fill(client: Any, table: str, rows: Sequence[tuple[str, ...]], cluster: str | None) -> None:
    """Rows into a work table: inserted as data here; on a cluster then copied to every
    server (each one its own shard of clusterAllReplicas, routed by the copy number), in
    the foreground so that none is still on its way when the mutation runs. As many
    copies as the weights of all servers add up to, so that every slot of the routing is
    hit whatever the weights; a server given more than one copy (this one among them)
    matches the same rows."""
    columns = _WORK_TABLES[table]
    client.insert(table, [list(r) for r in rows], column_names=list(columns))
    if cluster is None:
        return
    copies = int(client.command(
        "SELECT sum(shard_weight) FROM system.clusters WHERE cluster = {c:String}",
        parameters={"c": cluster},
    ))
    database, name = table.split(".")
    listed = ", ".join(columns)
    client.command(
        f"INSERT INTO FUNCTION clusterAllReplicas('{cluster}', {database}, {name}, copy) "  # noqa: S608
        f"SELECT {listed}, n FROM {table} ARRAY JOIN range({copies}) AS n "
        "SETTINGS distributed_foreground_insert = 1"
    )


def _empty_work_tables(client: Any, cluster: str | None) -> None:
    for table in _WORK_TABLES:
        client.command(f"TRUNCATE TABLE {table}{Target(table, cluster).on_cluster}")


# For the few seconds of a batch: replaced parts are deletable at once, and ClickHouse's
# cleanup of them runs every second (by default every 30 to 300 s).
_PROMPT_CLEANUP = (
    "old_parts_lifetime = 1, cleanup_delay_period = 1, cleanup_delay_period_random_add = 0, "
    "max_cleanup_delay_period = 1"
)
_USUAL_CLEANUP = f"old_parts_lifetime = {OUTDATED_PARTS_LIFETIME_S}"
_CLEANUP_DEFAULTS = (
    "cleanup_delay_period, cleanup_delay_period_random_add, max_cleanup_delay_period"
)


@contextlib.contextmanager
def replaced_parts_deleted(
    runner: ClientRunner, timeout_s: float = OUTDATED_PARTS_WAIT_S
) -> Iterator[None]:
    """Around the mutations: the parts they replace (which still hold the erased values)
    leave the disk within seconds rather than OUTDATED_PARTS_LIFETIME_S later; on exit,
    wait until none is left (on a cluster, on no server). The wait is a loop of short
    queries, so the record pump keeps writing meanwhile."""
    tables: list[Target] = runner(
        lambda c: [*(target(c, t) for t in call_log_tables(c)), target(c, SECURITY_LOG_TABLE)]
    )
    cluster = next((t.cluster for t in tables if t.cluster), None)
    parts = f"clusterAllReplicas('{cluster}', system.parts)" if cluster else "system.parts"
    names = [t.table.split(".") for t in tables]

    def alter(clause: str) -> None:
        for table in tables:
            runner(lambda c, t=table: c.command(f"ALTER TABLE {t.table}{t.on_cluster} {clause}"))  # type: ignore[misc]

    def outdated(client: Any) -> int:
        return int(client.query(
            f"SELECT count() FROM {parts} WHERE NOT active "  # noqa: S608 (names from system.tables)
            "AND (database, table) IN {names:Array(Tuple(String, String))}",
            parameters={"names": [tuple(n) for n in names]},
        ).result_rows[0][0])

    def clean_now(client: Any) -> None:
        for table in tables:
            # Wakes the cleanup task, which would otherwise sleep out its old period first.
            client.command(f"SYSTEM START CLEANUP{table.on_cluster} {table.table}")

    # Before the mutations: the deadline of a part is fixed when it is replaced.
    alter(f"MODIFY SETTING {_PROMPT_CLEANUP}")
    try:
        yield
        with contextlib.suppress(Exception):  # a server may refuse SYSTEM: then it is slower
            runner(clean_now)
        deadline = time.monotonic() + timeout_s
        while runner(outdated):
            if time.monotonic() > deadline:
                log.warning("rights.replaced_parts_remain")
                return
            time.sleep(0.2)
    finally:
        alter(f"MODIFY SETTING {_USUAL_CLEANUP}")
        alter(f"RESET SETTING {_CLEANUP_DEFAULTS}")


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
    # Mail to the address, queued or sent, goes with it (its reset tokens too).
    if account.email:
        session.execute(delete(MailMessage).where(MailMessage.to_address == account.email))
    session.execute(delete(PasswordReset).where(PasswordReset.account_id == account.id))
    # The identity provider's subject names the person too; signing in through the
    # provider again makes a new account (docs/sso.md).
    session.execute(delete(SsoIdentity).where(SsoIdentity.account_id == account.id))
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
    # The acceptances of the terms stay (which org's account accepted which version, and
    # when), under the pseudonymous id; the address they came from goes.
    session.execute(
        update(TermsAcceptance)
        .where(TermsAcceptance.account_id == account.id)
        .values(source_ip="")
    )
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
    """Cancel and anonymize one account: steps 1 to 3 now, step 4 queued for the erasure
    worker (which batches it with other cancellations). Under a legal hold on its org
    (rights.holds), step 1 only: the account is disabled and signed out, and the rest
    waits, in state `held`, until the hold ends. Raises NotFound / Conflict."""
    with state.session_factory() as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFound("Account not found.")
        if session.get(AccountErasure, account_id) is not None:
            raise Conflict("This account has already been cancelled.", code="already_cancelled")
        key_ids = revoke_keys(session, account)
        org_id = account.org_id
        if holds.is_held(session, org_id):
            account.status = "disabled"
            account.updated_at = utcnow()
            session.execute(delete(AdminSession).where(AdminSession.account_id == account.id))
            session.add(AccountErasure(account_id=account.id, org_id=org_id,
                                       requested_by=requested_by, state="held"))
            session.commit()
            state.config_changed()
            log.info("rights.account_cancelled", extra={"org_id": org_id, "account_id": account_id})
            return ErasureResult(account_id, "held", len(key_ids))
        pending = _anonymize(session, state.secrets, account, key_ids)
        session.add(
            AccountErasure(
                account_id=account.id,
                org_id=org_id,
                requested_by=requested_by,
                state="control_done",
                pending_encrypted=pending.encrypted,
            )
        )
        session.commit()
    tickets_service.delete_files(open_store(state.settings.ticket_store_dir), pending.storage_keys)
    state.config_changed()
    checkpoint(state.session_factory)
    if _worker is not None:
        _worker.notify()
    log.info("rights.account_cancelled", extra={"org_id": org_id, "account_id": account_id})
    return ErasureResult(account_id, "control_done", len(key_ids))


@dataclass(frozen=True, slots=True)
class _Anonymized:
    encrypted: str
    storage_keys: list[str]


def _anonymize(
    session: Session, secrets: Secrets, account: Account, key_ids: list[str]
) -> _Anonymized:
    """Steps 2 and 3 in the caller's transaction: what ClickHouse must forget, encrypted,
    and the control DB anonymized (ticket files are the caller's to delete after commit)."""
    ids = identifiers(account, key_ids)
    anonymize_account(session, account)
    erased = tickets_service.erase_account(session, account.org_id, account.id)
    return _Anonymized(secrets.encrypt(ids.to_json()), list(erased.storage_keys))


def resume_held(session_factory: SessionFactory, secrets: Secrets, ticket_store: Path) -> int:
    """Steps 2 and 3 of the cancellations that waited for a legal hold which has ended;
    they join the queue of step 4. Returns how many resumed."""
    resumed = 0
    with session_factory() as session:
        held = holds.held_org_ids(session)
        waiting = list(session.scalars(
            select(AccountErasure).where(
                AccountErasure.state == "held", AccountErasure.org_id.not_in(list(held))
            )
        ))
        files: list[str] = []
        for row in waiting:
            account = session.get(Account, row.account_id)
            if account is None:
                continue
            key_ids = [k.id for k in _account_keys(session, account)]
            pending = _anonymize(session, secrets, account, key_ids)
            row.state = "control_done"
            row.pending_encrypted = pending.encrypted
            files += pending.storage_keys
            resumed += 1
        if resumed:
            # The keys' new names reach ClickHouse's dim_keys through the dimension sync.
            bump_revision(session)
        session.commit()
    if resumed:
        tickets_service.delete_files(open_store(ticket_store), files)
        checkpoint(session_factory)
        log.info("rights.erasures_resumed", extra={"rows": resumed})
    return resumed


def complete_pending(
    session_factory: SessionFactory,
    secrets: Secrets,
    runner: ClientRunner,
    *,
    before_batch: Callable[[], None] | None = None,
    batch_size: int = ERASURE_BATCH,
) -> int:
    """Run the queued ClickHouse part of erasures, `batch_size` accounts per pair of
    mutations, until none is left; returns how many were finished."""
    finished = 0
    while True:
        with session_factory() as session:
            # A hold placed after the control-DB step keeps the org's ClickHouse rows as
            # they are: they wait in the queue until it ends.
            held = holds.held_org_ids(session)
            queued = session.execute(
                select(AccountErasure.account_id, AccountErasure.pending_encrypted)
                .where(
                    AccountErasure.state == "control_done",
                    AccountErasure.pending_encrypted.is_not(None),
                    AccountErasure.org_id.not_in(list(held)),
                )
                .order_by(AccountErasure.requested_at, AccountErasure.account_id)
                .limit(batch_size)
            ).all()
        if not queued:
            break
        batch = [Identifiers.from_json(secrets.decrypt(encrypted or "")) for _, encrypted in queued]
        # No transaction stays open meanwhile: this can take seconds.
        if before_batch is not None:
            before_batch()
        with replaced_parts_deleted(runner):
            runner(lambda client, batch=batch: anonymize_clickhouse(client, batch))  # type: ignore[misc]
        with session_factory() as session:
            _secure_delete(session)
            session.execute(
                update(AccountErasure)
                .where(AccountErasure.account_id.in_([account_id for account_id, _ in queued]))
                .values(state="done", completed_at=utcnow(), pending_encrypted=None)
            )
            session.commit()
        finished += len(queued)
        log.info("rights.erasures_completed", extra={"rows": len(queued)})
    if finished:
        checkpoint(session_factory)
    return finished


class ErasureWorker:
    """Runs the queued ClickHouse anonymization off the request path, in a daemon thread:
    when a cancellation is queued (after a short pause, so cancellations made together
    share a batch), at start (what a stopped server left queued) and every
    `retry_seconds` (what failed, e.g. ClickHouse unreachable)."""

    def __init__(
        self,
        run: Callable[[], int],
        *,
        retry_seconds: float,
        gather_seconds: float = 1.0,
    ) -> None:
        self._run = run
        self.retry_seconds = retry_seconds
        self.gather_seconds = gather_seconds
        self._worker = LoopThread("onetoken-erasure", self._loop)
        self.completed = 0

    def notify(self) -> None:
        self._worker.wake.set()

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._worker.stop(timeout)

    def _loop(self) -> None:
        stopping, wake = self._worker.stopping, self._worker.wake
        while not stopping.is_set():
            try:
                self.completed += self._run()
            except Exception as exc:
                log.warning("rights.pending_failed", extra={"exc_type": type(exc).__name__})
            wake.wait(self.retry_seconds)
            wake.clear()
            if stopping.wait(self.gather_seconds):
                return


_worker: ErasureWorker | None = None


def install(worker: ErasureWorker | None) -> None:
    """The worker that cancellations in this process wake (None: they wait for the next
    start of a server)."""
    global _worker
    _worker = worker


def make_worker(state: AppState, ingestor: Ingestor) -> ErasureWorker:
    """The erasure worker of a serving process, installed; the caller starts it once the
    ingestor has started (older records must land before any mutation)."""

    def run() -> int:
        # Holds first: a hold that ended lets its waiting cancellations go on below, and
        # the TTLs learn of holds placed or lifted while ClickHouse was out of reach.
        holds.sync_clickhouse(state.session_factory, ingestor.sink.read)
        resume_held(state.session_factory, state.secrets, state.settings.ticket_store_dir)
        return complete_pending(
            state.session_factory,
            state.secrets,
            ingestor.sink.read,
            before_batch=lambda: _drain_pipeline(state),
        )

    worker = ErasureWorker(run, retry_seconds=state.settings.retention_purge_interval_seconds)
    install(worker)
    return worker


def _runner(state: AppState) -> ClientRunner | None:
    runtime = state.runtime
    if runtime is None:
        return None
    sink = runtime.sink
    read = getattr(sink, "read", None)
    return read if callable(read) else None


def _drain_pipeline(state: AppState) -> None:
    """Ingest every record the gateways journaled so far into ClickHouse, so no record
    with the account's addresses arrives after the mutations (a record is journaled before
    its response ends, so whole journal lines are all there is)."""
    runtime = state.runtime
    if runtime is None:
        return
    runtime.ingestor.catch_up()
    for hook in list(runtime.ingestor.flush_hooks):
        try:
            hook()
        except Exception as exc:
            log.warning("rights.flush_hook_failed", extra={"exc_type": type(exc).__name__})
