"""Metering throughput end to end: engine journal files through the Ingestor into
call_log (ClickHouse) and the ledger, with every record checked.

Writer processes play engine instances: each holds its instance's journal lock and appends
records in the journal line format (records.rs write_line: the contract columns, in order,
one JSON object per line), rotating segments as the engine does, at --rate records/s in
total. The control process's Ingestor tails the journals meanwhile. The clock runs from the
first record written until both cursors (ledger and call_log) have passed the last one;
with --backlog the journals are written first and the clock times ingestion alone.

Then it counts what was stored: distinct and total request ids in call_log (FINAL), and
the ledger's summed calls and cost against what was written. Any record missing or
doubled fails the run (exit 1) and no target is claimed.

    python bench/pipeline.py                       # embedded chDB in a temp dir
    python bench/pipeline.py --dsn http://default:@127.0.0.1:8123/onetoken
"""

from __future__ import annotations

import argparse
import cProfile
import fcntl
import multiprocessing
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr
from sqlalchemy import func, select

from onetoken.analytics import queries
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.sink import CallLogSink
from onetoken.billing import service as billing
from onetoken.billing.models import LedgerEntry
from onetoken.control import build_state
from onetoken.ingest.ingestor import Ingestor
from onetoken.ingest.journal import lock_name, segment_name
from onetoken.orgs import service as orgs
from onetoken.settings import Settings

TARGET = 200_000
PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/models", "other"]
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet", "text-embedding-3-small", ""]
ORGS = 97
KEYS_PER_ORG = 4


def cost_of(i: int) -> int:
    # Every 40th call is refused (cost 0), as rate-limited calls are.
    return 0 if i % 40 == 0 else (i % 10_000) * 1_250 + 1


def record(i: int, ts: int, org_ids: list[str]) -> dict[str, Any]:
    return {
        "ts": ts,
        "request_id": f"req_{i:016x}",
        "org_id": org_ids[i % len(org_ids)],
        "account_id": f"acc_{i % 1013:05d}",
        # A few keys per org, as deployments have (the ledger groups by org, key, model).
        "key_id": f"key_{i % ORGS:03d}_{(i // ORGS) % KEYS_PER_ORG}",
        "path": PATHS[i % 4],
        "model_requested": MODELS[i % 5],
        "model_served": MODELS[i % 5],
        "provider": "openai" if i % 3 else "anthropic",
        "prompt_tokens": i % 4096,
        "completion_tokens": i % 777,
        "cached_tokens": i % 128,
        "usage_source": "upstream" if i % 50 else "estimated",
        "cost": cost_of(i),
        "status": 200 if i % 40 else 429,
        "error_code": "" if i % 40 else "rate_limited",
        "latency_us": 200 + i % 90_000,
        "ttfb_us": 100 + i % 30_000,
        "streamed": i & 1,
        "source_ip": f"10.{i % 256}.{(i >> 8) % 256}.{(i >> 16) % 256}",
        "user_agent": "OpenAI/Python 1.40.0" if i % 2 else "locust/2.29",
        "rate_limit": "pass" if i % 40 else "limited",
        "attempts": 1 + (i % 17 == 0),
        "guard_flags": "",
    }


def writer(
    spool: str,
    instance: str,
    ids: range,
    org_ids: list[str],
    rate: float,
    segment_records: int,
    ready: Any,
    go: Any,
) -> None:
    """One engine instance: lock, then append lines in chunks at `rate` records/s."""
    lock = os.open(os.path.join(spool, lock_name(instance)), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    ready.set()
    go.wait()
    started = time.perf_counter()
    segment, in_segment, fd = 0, 0, -1
    chunk = 1000
    for lo in range(ids.start, ids.stop, chunk):
        hi = min(lo + chunk, ids.stop)
        if fd < 0 or in_segment >= segment_records:
            if fd >= 0:
                os.close(fd)
            segment += 1
            in_segment = 0
            path = os.path.join(spool, segment_name(instance, segment))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        ts = time.time_ns() // 1000
        payload = b"".join(orjson.dumps(record(i, ts, org_ids)) + b"\n" for i in range(lo, hi))
        os.write(fd, payload)
        in_segment += hi - lo
        # Pace to the rate: the engine journals as requests finish, not all at once.
        due = started + (hi - ids.start) / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    if fd >= 0:
        os.close(fd)
    # The instance exits (its lock is released by the OS): its last segment is complete.
    os.close(lock)


def expected_ledger(records: int) -> tuple[int, int]:
    """(charged calls, total cost) of records 0..records-1."""
    costs = [cost_of(i) for i in range(records)]
    return sum(1 for c in costs if c > 0), sum(costs)


def check(
    records: int,
    *,
    distinct: int,
    stored: int,
    ledger_calls: int,
    ledger_cost: int,
    bad_lines: int,
    segments_left: int,
) -> list[str]:
    """Why the run does not count: any record missing or doubled on either side."""
    want_calls, want_cost = expected_ledger(records)
    problems = []
    if distinct != records:
        problems.append(f"call_log holds {distinct} distinct request ids, {records} written")
    if stored != records:
        problems.append(f"call_log reads {stored} rows with FINAL, {records} written")
    if (ledger_calls, ledger_cost) != (want_calls, want_cost):
        problems.append(
            f"ledger: {ledger_calls} calls / {ledger_cost} charged, "
            f"expected {want_calls} / {want_cost}"
        )
    if bad_lines:
        problems.append(f"{bad_lines} bad journal lines")
    if segments_left:
        problems.append(f"{segments_left} journal segment(s) left behind")
    return problems


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 (git from PATH is intended)
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=2, help="writer processes")
    parser.add_argument("--rate", type=float, default=400_000, help="records/s written, total")
    parser.add_argument("--batch", type=int, default=50_000, help="FLUSH_MAX_ROWS")
    parser.add_argument("--segment", type=int, default=200_000, help="records per segment")
    parser.add_argument("--dsn", default="", help="ClickHouse DSN (default: chDB in a temp dir)")
    parser.add_argument(
        "--backlog",
        action="store_true",
        help="write every journal first, then time ingestion alone (catching up after an "
        "outage or a restart): the ingestion's capacity rather than the writers' pace",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="cProfile the ingestion (the Python side) into FILE and print its top entries",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="onetoken-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            clickhouse_dsn=args.dsn,
            secret_key=SecretStr("bench-secret-key-0123456789abcdef0123"),
            flush_max_rows=args.batch,
            flush_interval_ms=50,
        )
        settings.ensure_dirs()
        state = build_state(settings)
        with state.session_factory() as s:
            org_ids = [orgs.create_org(s, f"bench-{n}").id for n in range(ORGS)]
            for org in org_ids:
                billing.credit(s, org, amount=10**17, kind="grant", idempotency_key="bench")
            s.commit()
        client = open_client(settings)
        ingestor = Ingestor(
            settings, state.session_factory, sink=CallLogSink(settings, client=client)
        )

        per = -(-args.records // args.instances)
        ctx = multiprocessing.get_context("fork")
        go = ctx.Event()
        procs, readies = [], []
        for n in range(args.instances):
            ids = range(n * per, min((n + 1) * per, args.records))
            ready = ctx.Event()
            p = ctx.Process(
                target=writer,
                args=(
                    str(settings.spool_dir),
                    f"bench{n:011x}",
                    ids,
                    org_ids,
                    args.rate / args.instances,
                    args.segment,
                    ready,
                    go,
                ),
            )
            p.start()
            procs.append(p)
            readies.append(ready)
        for ready in readies:
            ready.wait()

        go.set()
        if args.backlog:
            for p in procs:
                p.join()
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        cpu_started = time.process_time()
        started = time.perf_counter()
        # Ingest while the writers write, then until both cursors passed everything.
        while any(p.is_alive() for p in procs):
            ingestor.catch_up()
        for p in procs:
            p.join()
        while ingestor.catch_up() > 0 or ingestor.rows_logged < ingestor.rows_ingested:
            pass
        elapsed = time.perf_counter() - started
        # CPU of this process (ingestion: Python and chDB threads), writers excluded.
        cpu = time.process_time() - cpu_started
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        left = sorted(p.name for p in settings.spool_dir.iterdir() if p.suffix == ".jsonl")

        distinct = queries.count_distinct_requests(client)
        stored = queries.count_calls(client)
        raw_rows = int(client.query("SELECT count() FROM onetoken.call_log").result_rows[0][0])
        with state.session_factory() as s:
            calls, charged = s.execute(
                select(
                    func.coalesce(func.sum(LedgerEntry.calls), 0),
                    func.coalesce(func.sum(LedgerEntry.amount), 0),
                ).where(LedgerEntry.kind == "usage")
            ).one()
            entries = s.scalar(
                select(func.count()).select_from(LedgerEntry).where(LedgerEntry.kind == "usage")
            )
        ingestor.stop()
        client.close()
        state.db_engine.dispose()

    problems = check(
        args.records,
        distinct=distinct,
        stored=stored,
        ledger_calls=int(calls),
        ledger_cost=-int(charged),
        bad_lines=ingestor.bad_lines,
        segments_left=len(left),
    )
    want_calls, want_cost = expected_ledger(args.records)
    rate = args.records / elapsed
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mode = "backlog (journals written first)" if args.backlog else f"writers at {args.rate:,.0f}/s"
    print(
        f"{args.records} records from {args.instances} journal(s), {mode}, "
        f"batches of {args.batch}: "
        f"{elapsed:.2f}s, {rate:,.0f} records/s end to end, ingestion {cpu:.2f} CPU-s "
        f"({cpu * 1e6 / args.records:.1f} us/record), max RSS {rss_mb:.0f} MB"
    )
    print(
        f"stored: call_log {distinct} distinct request ids ({stored} rows FINAL, {raw_rows} "
        f"physical); ledger {entries} usage entries, {int(calls)} calls, "
        f"{-int(charged)} nano charged (expected {want_calls} calls, {want_cost})"
    )
    sha = git_sha()
    where = (
        f"{platform.machine()} {platform.python_version()}, git {sha}, "
        + time.strftime("%Y-%m-%d", time.gmtime())
        + f", dsn {'chdb (temp dir)' if not args.dsn else 'server'}"
    )
    if problems:
        for p in problems:
            print(f"FAILED: {p}", file=sys.stderr)
        print(f"records missing or doubled: no figure claimed; {where}")
        return 1
    print(f"target >= {TARGET:,} records/s: {'met' if rate >= TARGET else 'NOT met'}; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
