"""What ingestion hands to the ledger and to the batch observers for one journal batch.

The engine's reader (`_core.read_journal_batch`) builds it in Rust while it parses the
lines: the call_log block goes to ClickHouse as is, and Python only sees these groups, a
few dozen per batch whatever its size, instead of every record's columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from onetoken import _core


class UsageGroup(NamedTuple):
    """Charged calls (cost > 0, known org) of one org, key, requested model, UTC day and
    application."""

    org_id: str
    key_id: str
    model: str
    day: int  # days since the Unix epoch, UTC
    calls: int
    cost: int  # nano-units
    first_ts: int  # earliest ts of the group, microseconds
    application_id: str = ""  # empty: the key was in no application


class CallGroup(NamedTuple):
    """Calls per key, status, error code and provider (rates, error rates, provider health)."""

    key_id: str
    status: int
    error_code: str
    provider: str
    calls: int


class FailureGroup(NamedTuple):
    """Failed calls (status >= 400 or an error code) sharing every dimension, source
    address included (auth floods, key risks, refused budgets)."""

    org_id: str
    account_id: str
    key_id: str
    source_ip: str
    status: int
    error_code: str
    provider: str
    calls: int
    # The group's first record (a key-risk event names one request it stands for).
    first_request_id: str
    first_path: str
    first_user_agent: str


@dataclass(frozen=True, slots=True)
class Batch:
    rows: int
    min_ts: int
    max_ts: int
    usage: list[UsageGroup]
    calls: list[CallGroup]
    # key id -> (org id, account id) of its first record.
    owners: dict[str, tuple[str, str]]
    # In order of each group's first record.
    failures: list[FailureGroup]
    # (key id, its distinct source addresses), both non-empty.
    sources: list[tuple[str, list[str]]]


def from_journal(read: _core.JournalBatch) -> Batch:
    return Batch(
        rows=read.rows,
        min_ts=read.min_ts,
        max_ts=read.max_ts,
        usage=[UsageGroup._make(g) for g in read.usage],
        calls=[CallGroup._make(g) for g in read.calls],
        owners=read.owners,
        failures=[FailureGroup(*g[:8], *g[8]) for g in read.failures],
        sources=read.sources,
    )
