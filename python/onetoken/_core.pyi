"""Typed surface of the Rust extension `onetoken._core` (built from rust/py).

The hot path lives entirely in Rust. Python hands configuration in (rarely) and reads
record batches back from the engine's journal files (read_journal); nothing crosses this
boundary per request.
"""

from typing import Final, TypedDict

__version__: Final[str]

class OnetokenError(Exception):
    """Base class of every error raised by the extension."""

class ConfigError(OnetokenError):
    """Engine configuration or snapshot JSON was rejected (unknown field, bad value)."""

class BindError(OnetokenError):
    """The listener could not bind its address (in use, permission, bad address)."""

class TlsError(OnetokenError):
    """The certificate or private key could not be loaded."""

class EngineStateError(OnetokenError):
    """The call does not fit the engine's state (start twice, snapshot before start...)."""

class DroppedEntry(TypedDict):
    """One snapshot entry the engine leaves out: ids and fixed codes, never a value."""

    kind: str
    """org, guard, key, provider, model, route, alias or blocked_ip."""
    id: str
    """Org id, key id, provider id, model name, route name, alias, or blocked_ips index."""
    field: str
    """The field at fault, as named in the snapshot document."""
    reason: str
    """Reason code (docs/snapshot.md)."""

class Engine:
    """The gateway: a hyper server on a tokio runtime that Rust owns.

    `config_json` is the engine configuration (tests/contract/engine_config.json);
    unknown fields are rejected with ConfigError naming the field.
    """

    def __init__(self, config_json: bytes) -> None: ...
    def start(self) -> str:
        """Take the spool dir's locks, bind synchronously (BindError at once on failure,
        also when another gateway holds <spool_dir>/gateway.lock), serve in the background,
        return the bound address as "host:port". Every record is appended to the journal
        in spool_dir before the last byte of its response reaches the client."""
    def load_snapshot(self, snapshot_json: bytes) -> int:
        """Compile and atomically swap in a config snapshot (tests/contract/snapshot.json).
        Returns the version now serving. An entry that breaks the engine's rules is left
        out and listed by snapshot_dropped(); the rest serves. Raises ConfigError only on a
        document that does not parse (the previous snapshot keeps serving). A snapshot
        whose version is not newer than the current one is ignored and the current version
        is returned."""
    def snapshot_dropped(self) -> list[DroppedEntry]:
        """The entries the serving snapshot left out (empty when every entry compiled)."""
    def set_control_status(self, reachable: bool) -> None:
        """Report whether the last snapshot poll reached the control plane. True also
        confirms the serving snapshot as current (a 304 says so as much as a new snapshot);
        False lets its age grow. The engine serves on its last good snapshot either way;
        /healthz ("control": "ok" | "unreachable", "snapshot_age_seconds") and /metrics
        (onetoken_control_reachable, onetoken_snapshot_age_seconds) report it."""
    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_seconds` (by
        default the config's `shutdown_grace_ms`), then
        cancel the rest (each still leaves its record in the journal), then release the
        spool dir's locks: the instance is no longer live, so its segments are complete.
        Idempotent."""
    def metrics_text(self) -> str:
        """Prometheus exposition text, the same as GET /metrics."""
    def org_spend(self) -> dict[str, tuple[int, int]]:
        """org_id -> (settled cost since engine start, currently reserved), nano-units."""
    def key_spend(self) -> dict[str, tuple[int, int]]:
        """key_id -> (settled cost since engine start, currently reserved), nano-units: the
        counter that keys[].usage.spent_mark refers to."""
    def application_spend(self) -> dict[str, tuple[int, int]]:
        """application_id -> (settled cost since engine start, currently reserved),
        nano-units: the counter that applications[].usage.spent_mark refers to."""
    def stats(self) -> dict[str, int]:
        """Counters: records_total, in_flight, snapshot_version, journal_segments (segment
        files this instance opened), journal_errors (records lost: the append failed)."""
    @property
    def address(self) -> str | None: ...
    @property
    def metrics_address(self) -> str | None:
        """The metrics listener's bound "host:port" while running; None without
        metrics_listen."""
    @property
    def running(self) -> bool: ...
    @property
    def instance_id(self) -> str:
        """Unique per Engine object; names its journal files
        (<spool_dir>/journal-<instance_id>-<segment>.jsonl and journal-<instance_id>.lock)."""

class MockUpstream:
    """The bundled fake model provider (OpenAI-compatible), on its own runtime."""

    def __init__(
        self,
        listen: str,
        *,
        chunks: int | None = None,
        delay_ms: int | None = None,
        latency_ms: int | None = None,
    ) -> None: ...
    def start(self) -> str:
        """Bind synchronously and serve; returns "host:port"."""
    def stop(self) -> None: ...
    def request_count(self) -> int:
        """Requests received so far (for tests that assert call counts)."""

def hash_key(secret: bytes, key: str) -> str:
    """HMAC-SHA256 of the key under the secret, lowercase hex (the gateway's lookup hash)."""

def validate_snapshot(snapshot_json: bytes) -> list[DroppedEntry]:
    """The entries the engine would leave out of this snapshot document, under the same
    rules as Engine.load_snapshot, without an engine. Raises ConfigError only on a document
    that does not parse."""

def address_is_public(ip: str) -> bool:
    """Whether the address is public under the engine's upstream address rule (the one
    rule for every outgoing connection a tenant can configure). ValueError when `ip` is not
    an address."""

def count_tokens(text: str) -> int:
    """Tokens in `text` under the gateway's tokenizer (o200k_base)."""

def serve_mock_upstream(
    listen: str,
    *,
    chunks: int | None = None,
    delay_ms: int | None = None,
    latency_ms: int | None = None,
) -> None:
    """Run the fake provider in the foreground until SIGINT/SIGTERM (the CLI command).
    The keyword arguments set server-wide defaults that each request's `mock` overrides."""

class JournalBatch:
    """One read of a journal segment (`read_journal_batch`)."""

    @property
    def native(self) -> bytes:
        """The records as one call_log block in ClickHouse's Native format, columns as
        `call_log_native_columns()`; empty when `rows` is 0."""
    @property
    def rows(self) -> int: ...
    @property
    def next_offset(self) -> int:
        """Where the next read of the segment resumes."""
    @property
    def bad_lines(self) -> int:
        """Lines consumed that were not records (never echoed)."""
    @property
    def min_ts(self) -> int: ...
    @property
    def max_ts(self) -> int: ...
    @property
    def usage(self) -> list[tuple[str, str, str, int, int, int, int, str]]:
        """(org_id, key_id, model_requested, UTC day, calls, cost, first ts, application_id)
        of the calls with cost > 0 and an org, one per distinct (org, key, model, day,
        application); application_id is empty for a key in no application."""
    @property
    def calls(self) -> list[tuple[str, int, str, str, int]]:
        """(key_id, status, error_code, provider, calls) of every call."""
    @property
    def owners(self) -> dict[str, tuple[str, str]]:
        """key_id -> (org_id, account_id) of its first call."""
    @property
    def failures(
        self,
    ) -> list[tuple[str, str, str, str, int, str, str, int, tuple[str, str, str]]]:
        """(org_id, account_id, key_id, source_ip, status, error_code, provider, calls,
        (request_id, path, user_agent) of the first such call) of the calls with status >=
        400 or an error code, in order of first appearance."""
    @property
    def sources(self) -> list[tuple[str, list[str]]]:
        """(key_id, its distinct source addresses), both non-empty."""

def read_journal_batch(
    path: str, offset: int, max_records: int, complete: bool, *, until: int | None = None
) -> JournalBatch:
    """Read whole record lines of the journal segment at `path` from byte `offset`, at
    most `max_records` and none past byte `until` (a retry reads the range it read
    before). A trailing line without a newline is left for a later read unless
    `complete` (the segment never grows again), which consumes it as bad. OSError when the
    file cannot be read (FileNotFoundError when it is gone)."""

def engine_config_defaults() -> str:
    """The engine config's defaults, every field but the key-hash secret, as a JSON
    object: the one place they are declared."""

def routing_defaults() -> str:
    """The engine's routing defaults (what it applies when a snapshot has no `routing`)
    as a JSON object."""

def call_log_native_columns() -> list[tuple[str, str]]:
    """call_log's (column, ClickHouse type) pairs, in the order `JournalBatch.native`
    encodes them."""

def call_log_column_docs() -> list[tuple[str, str]]:
    """call_log's (column, description) pairs in table order: the doc comment of each
    column in the engine's declaration, its lines joined by single spaces."""

def journal_instance_live(lock_path: str) -> bool:
    """Whether the engine instance of `<spool_dir>/journal-<instance>.lock` is alive: it
    holds an exclusive flock on the file for its life. False when the file is missing."""
