"""A reference aggregation of record columns into an ingestion Batch, in plain Python: what
the engine's reader must produce, and synthetic batches for the observers' tests."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson

from onetoken import _core
from onetoken.ingest.batch import Batch, CallGroup, FailureGroup, UsageGroup

DAY_US = 86_400_000_000


def summarize(columns: dict[str, list[Any]]) -> Batch:
    n = len(columns["request_id"])

    def col(name: str, default: Any) -> list[Any]:
        return columns.get(name) or [default] * n

    ts, orgs, accounts = col("ts", 0), col("org_id", ""), col("account_id", "")
    keys, models, costs = col("key_id", ""), col("model_requested", ""), col("cost", 0)
    statuses, codes, ips = col("status", 0), col("error_code", ""), col("source_ip", "")
    providers, paths, agents = col("provider", ""), col("path", ""), col("user_agent", "")
    apps = col("application_id", "")
    ids = columns["request_id"]
    usage: dict[tuple[str, str, str, int, str], list[Any]] = {}
    calls: dict[tuple[str, int, str, str], int] = {}
    owners: dict[str, tuple[str, str]] = {}
    failures: dict[tuple[str, str, str, str, int, str, str], list[Any]] = {}
    sources: dict[str, dict[str, None]] = {}
    for i in range(n):
        call = (keys[i], statuses[i], codes[i], providers[i])
        calls[call] = calls.get(call, 0) + 1
        if keys[i]:
            owners.setdefault(keys[i], (orgs[i], accounts[i]))
            if ips[i]:
                sources.setdefault(keys[i], {})[ips[i]] = None
        if statuses[i] >= 400 or codes[i]:
            dims = (orgs[i], accounts[i], keys[i], ips[i], statuses[i], codes[i], providers[i])
            failures.setdefault(dims, [0, ids[i], paths[i], agents[i]])[0] += 1
        if costs[i] > 0 and orgs[i]:
            group = (orgs[i], keys[i], models[i], ts[i] // DAY_US)
            u = usage.setdefault((*group, apps[i]), [0, 0, ts[i]])
            u[0] += 1
            u[1] += costs[i]
            u[2] = min(u[2], ts[i])
    return Batch(
        rows=n,
        min_ts=min(ts, default=0),
        max_ts=max(ts, default=0),
        usage=sorted(
            (UsageGroup(*k[:4], *v, k[4]) for k, v in usage.items()),
            key=lambda g: (g.first_ts, g.org_id, g.key_id, g.model, g.day, g.application_id),
        ),
        calls=sorted(CallGroup(*k, v) for k, v in calls.items()),
        owners=owners,
        failures=[FailureGroup(*k, *v) for k, v in failures.items()],
        sources=[(k, list(v)) for k, v in sources.items()],
    )


def decode_native(block: bytes) -> dict[str, list[Any]]:
    """The columns of a Native block of call_log's types, for fakes that stand in for
    ClickHouse (the real one reads blocks in test_journal_batch)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        out = shift = 0
        while True:
            b = block[pos]
            pos += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    def string() -> str:
        nonlocal pos
        n = varint()
        pos += n
        return block[pos - n : pos].decode()

    def fixed(size: int, signed: bool) -> int:
        nonlocal pos
        pos += size
        return int.from_bytes(block[pos - size : pos], "little", signed=signed)

    sizes = {"UInt8": 1, "UInt16": 2, "UInt32": 4, "Int64": 8, "DateTime64(6, 'UTC')": 8}
    columns: dict[str, list[Any]] = {}
    ncols, nrows = varint(), varint()
    for _ in range(ncols):
        name, ty = string(), string()
        if ty == "String":
            columns[name] = [string() for _ in range(nrows)]
        elif ty == "LowCardinality(String)":
            fixed(8, False)  # shared-dictionary version
            width = 1 << (fixed(8, False) & 0xFF)
            keys = [string() for _ in range(fixed(8, False))]
            assert fixed(8, False) == nrows
            columns[name] = [keys[fixed(width, False)] for _ in range(nrows)]
        else:
            signed = ty.startswith(("Int", "DateTime"))
            columns[name] = [fixed(sizes[ty], signed) for _ in range(nrows)]
    assert pos == len(block)
    return columns


def encode(columns: dict[str, list[Any]]) -> tuple[bytes, int]:
    """Record columns as the engine's reader would hand them to the sink: written as
    journal lines, read back as one Native block."""
    names = [name for name, _ in _core.call_log_native_columns()]
    n = len(columns["request_id"])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "journal-t-00000000.jsonl"
        path.write_bytes(
            b"".join(
                orjson.dumps({name: columns[name][i] for name in names}) + b"\n" for i in range(n)
            )
        )
        read = _core.read_journal_batch(str(path), 0, n, True)
    assert (read.rows, read.bad_lines) == (n, 0)
    return read.native, n
