"""Journal files for tests, in the engine's line format (records.rs write_line: one JSON
object per line, contract columns in order), and an engine instance's liveness lock."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.ingest.journal import lock_name, segment_name


def record(
    request_id: str,
    *,
    org_id: str = "",
    cost: int = 0,
    ts_us: int | None = None,
    key_id: str = "key_a",
    model: str = "m",
) -> dict[str, Any]:
    return {
        "ts": ts_us if ts_us is not None else time.time_ns() // 1000,
        "request_id": request_id,
        "org_id": org_id,
        "account_id": "acc",
        "key_id": key_id,
        "path": "/v1/chat/completions",
        "model_requested": model,
        "model_served": model,
        "provider": "p",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 0,
        "usage_source": "upstream",
        "cost": cost,
        "status": 200,
        "error_code": "",
        "latency_us": 100,
        "ttfb_us": 50,
        "streamed": 0,
        "source_ip": "127.0.0.1",
        "user_agent": "t",
        "rate_limit": "pass",
        "attempts": 1,
        "guard_flags": "",
        "application_id": "",
        "images": 0,
        "audio_ms": 0,
        "characters": 0,
        "search_units": 0,
    }


def line(row: dict[str, Any]) -> bytes:
    return orjson.dumps({name: row[name] for name in CALL_LOG_COLUMNS}) + b"\n"


def append(
    spool: Path, instance: str, segment: int, rows: list[dict[str, Any]], raw: bytes = b""
) -> Path:
    """Append records (then `raw` bytes as they are) to a segment, creating it 0600."""
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = spool / segment_name(instance, segment)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"".join(line(r) for r in rows) + raw)
    finally:
        os.close(fd)
    return path


@contextmanager
def live(spool: Path, instance: str) -> Iterator[None]:
    """Hold the instance's lock as its engine does while it runs."""
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(spool / lock_name(instance), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def dead(spool: Path, instance: str) -> None:
    """The lock file an engine leaves behind when it dies."""
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    (spool / lock_name(instance)).touch(mode=0o600)


class AcceptingSink:
    """A call_log that takes every block: both cursors pass, so an Ingestor collects
    dead journals (tests of what happens after ingestion, not of ClickHouse)."""

    def available(self) -> bool:
        return True

    def insert(
        self, block: bytes, rows: int, dedup_token: str, database: str = "onetoken"
    ) -> bool:
        return True

    def close(self) -> None:
        pass
