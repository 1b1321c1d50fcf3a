"""Metadata pipeline throughput: synthetic call records through CallLogSink into ClickHouse.

DESIGN.md section 7 asks for >= 200k records/s. Batches are built before the clock starts
(the engine builds them in Rust), so the number is the sink's cost: column-oriented insert
with its dedup token, through clickhouse-connect, into onetoken.call_log.

    python bench/pipeline.py                       # embedded chDB in a temp dir
    python bench/pipeline.py --dsn http://default:@127.0.0.1:8123/onetoken
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from onetoken.analytics import queries
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.sink import CallLogSink
from onetoken.settings import Settings

PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/models", "other"]
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet", "text-embedding-3-small", ""]


def synthetic_batch(start: int, n: int, ts0: int) -> dict[str, list[Any]]:
    ids = range(start, start + n)
    return {
        "ts": [ts0 + i * 7 for i in ids],
        "request_id": [f"req_{i:016x}" for i in ids],
        "org_id": [f"org_{i % 97:04d}" for i in ids],
        "account_id": [f"acc_{i % 1013:05d}" for i in ids],
        "key_id": [f"ot-{i % 4099:04x}...{i % 9973:04d}" for i in ids],
        "path": [PATHS[i % 4] for i in ids],
        "model_requested": [MODELS[i % 5] for i in ids],
        "model_served": [MODELS[i % 5] for i in ids],
        "provider": ["openai" if i % 3 else "anthropic" for i in ids],
        "prompt_tokens": [i % 4096 for i in ids],
        "completion_tokens": [i % 777 for i in ids],
        "cached_tokens": [i % 128 for i in ids],
        "usage_source": ["upstream" if i % 50 else "estimated" for i in ids],
        "cost": [(i % 10_000) * 1_250 for i in ids],
        "status": [200 if i % 40 else 429 for i in ids],
        "error_code": ["" if i % 40 else "rate_limited" for i in ids],
        "latency_us": [200 + i % 90_000 for i in ids],
        "ttfb_us": [100 + i % 30_000 for i in ids],
        "streamed": [i & 1 for i in ids],
        "source_ip": [f"10.{i % 256}.{(i >> 8) % 256}.{(i >> 16) % 256}" for i in ids],
        "user_agent": ["OpenAI/Python 1.40.0" if i % 2 else "locust/2.29" for i in ids],
        "rate_limit": ["pass" if i % 40 else "limited" for i in ids],
        "attempts": [1 + (i % 17 == 0) for i in ids],
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=50_000, help="rows per batch (FLUSH_MAX_ROWS)")
    parser.add_argument("--dsn", default="", help="ClickHouse DSN (default: chDB in a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="onetoken-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), clickhouse_dsn=args.dsn)
        client = open_client(settings)
        sink = CallLogSink(settings, client=client)
        ts0 = int(time.time() * 1_000_000) - args.records * 7
        batches = [
            synthetic_batch(start, min(args.batch, args.records - start), ts0)
            for start in range(0, args.records, args.batch)
        ]
        cpu_started = time.process_time()
        started = time.perf_counter()
        for batch in batches:
            sink.write(batch)
        elapsed = time.perf_counter() - started
        # CPU seconds of the whole process (Python and chDB threads): steadier than wall
        # time on a shared machine.
        cpu = time.process_time() - cpu_started
        stored = queries.count_calls(client)
        sink.close()
        client.close()

    rate = args.records / elapsed
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.records} records in {len(batches)} batches of {args.batch}: "
        f"{elapsed:.2f}s, {rate:,.0f} records/s, {cpu:.2f} CPU-s "
        f"(stored {stored}, spooled {sink.rows_spooled}, max RSS {rss_mb:.0f} MB)"
    )
    print(
        f"target >= 200,000 records/s: {'met' if rate >= 200_000 else 'NOT met'}; "
        f"{platform.machine()} {platform.python_version()}, git {git_sha()}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"dsn {'chdb (temp dir)' if not args.dsn else 'server'}"
    )


if __name__ == "__main__":
    main()
