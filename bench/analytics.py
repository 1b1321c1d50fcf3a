"""Dashboard queries on call_log and on its per-minute rollup, at 100 million rows in chDB.

Fills an embedded chDB, migrated as the service migrates it (so the materialized view
call_stats_1m_mv fills the rollup as rows arrive), with synthetic call metadata generated
inside ClickHouse by INSERT ... SELECT FROM numbers(): about 1000 orgs with a skewed share
of the traffic (the largest has about a tenth), 20 models on 10 providers (a few models
take most calls), 30 days up to now, some errors (429, 500, 400, 502), streams,
rate-limited calls and guard flags, log-normal latencies.

Then runs each query raw (call_log FINAL, as docs/pools.md says reads of call_log go) and
through the rollup (call_stats_1m, no FINAL: sums and quantile-state merges):

- cost by model by day over the 30 days;
- p99 latency by provider over the last 7 days;
- one org's last hour (the largest org): calls, errors, cost and p99 per minute.

Each query runs --runs times (default 5); the median wall time is reported, with the rows
and bytes the query read (system.query_log) and the disk size of both tables. Before
printing, the run checks itself: call_log holds --rows rows, the rollup's calls add up to
them, the rollup's cost sum equals the raw one, and the rollup's quantiles are within 5%
of the raw ones. A failed check exits 1 and writes nothing.

    make bench-analytics                          # 100M rows, then writes bench/RESULTS.md
    python bench/analytics.py --rows 2000000      # a smaller run (a few seconds)
    python bench/analytics.py --keep              # keep the data dir afterwards

The data dir is under /work/bench-data (several GB at 100M rows) and is deleted at the
end unless --keep. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chdb
import clickhouse_connect
from clickhouse_connect.driver.client import Client

from onetoken.analytics import clickhouse as ch
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import git_sha, loadavg, machine_info

BENCH = Path(__file__).resolve().parent
SECTION = "## Analytics: call_log and the per-minute rollup"
DEFAULT_DATA = Path("/work/bench-data")
DAYS = 30
ORGS = 1000
MODELS = 20
PROVIDERS = 10
QUANTILE_TOLERANCE = 0.05
# query_log is off in chDB unless its configuration names it; rows and bytes read come
# from there.
CONFIG = """<clickhouse><query_log><database>system</database><table>query_log</table>
<flush_interval_milliseconds>1000</flush_interval_milliseconds></query_log></clickhouse>"""

# One row per number: every shape a deterministic function of the number's hashes (u1..u3
# uniform in [0, 1)), but the latency's log-normal noise. The rows come in passes of
# --pass-rows, each running evenly over the whole window (the next pass between the
# previous one's rows), so that every size measured on the way has the 30 days' shape.
GENERATE = """
INSERT INTO onetoken.call_log ({columns})
WITH
    cityHash64(number) AS h,
    cityHash64(number, 7) AS g,
    (h % 1000003) / 1000003 AS u1,
    (bitShiftRight(h, 21) % 1000003) / 1000003 AS u2,
    (bitShiftRight(h, 42) % 1000003) / 1000003 AS u3,
    toUInt32(floor({orgs} * pow(u1, 3))) AS org_n,
    toUInt32(floor({models} * pow(u2, 2))) AS model_n,
    g % 10000 AS p,
    multiIf(p < 150, 429, p < 230, 500, p < 280, 400, p < 300, 502, 200) AS st,
    toUInt32(50 + bitShiftRight(g, 16) % 3000) AS prompt,
    toUInt32(if(st = 200, bitShiftRight(g, 28) % 800, 0)) AS completion,
    bitShiftRight(g, 40) % 100 < 40 AS is_stream,
    toUInt32(least(exp(12.4 + model_n / 20 + 0.6 * randNormal(0, 1)), 4000000000)) AS latency
SELECT
    fromUnixTimestamp64Micro(toInt64({start_us} + ((number % {per_pass})
        + intDiv(number, {per_pass}) / {passes}) * {step_us}), 'UTC'),
    concat('req_', hex(number)),
    concat('org_', leftPad(toString(org_n), 4, '0')),
    concat('acc_', toString(org_n), '_', toString(toUInt8(u3 * 5))),
    concat('key_', toString(org_n), '_', toString(bitShiftRight(h, 50) % 3)),
    '/v1/chat/completions',
    concat('model-', toString(model_n)),
    concat('model-', toString(model_n)),
    concat('prov_', toString(model_n % {providers})),
    prompt,
    completion,
    toUInt32(if(bitShiftRight(g, 50) % 4 = 0, intDiv(prompt, 2), 0)),
    'upstream',
    toInt64(if(st = 200, prompt * (model_n + 1) * 150 + completion * (model_n + 1) * 600, 0)),
    st,
    multiIf(st = 429, 'rate_limit_exceeded', st = 500, 'upstream_error',
            st = 400, 'invalid_request_error', st = 502, 'upstream_unavailable', ''),
    latency,
    toUInt32(if(is_stream, latency * (0.1 + 0.3 * u3), 0)),
    toUInt8(is_stream),
    IPv4NumToString(toUInt32(167772160 + org_n * 256 + g % 200)),
    'openai-python/1.50.0',
    if(st = 429, 'limited', 'pass'),
    toUInt8(if(st = 502, 2, 1)),
    if(bitShiftRight(h, 56) % 100 = 0, 'phone:1', ''),
    concat('app_', toString(org_n), '_', toString(bitShiftRight(h, 50) % 2)),
    0,
    0,
    0,
    0
FROM numbers({first}, {count})
"""


@dataclass(frozen=True)
class Query:
    name: str
    what: str
    raw: str
    rollup: str


def queries(end_s: int, org: str) -> list[Query]:
    week = end_s - 7 * 86400
    hour = end_s - 3600
    return [
        Query(
            "cost by model by day",
            f"{DAYS} days, every org",
            "SELECT toDate(ts) AS day, model_served, sum(cost) FROM onetoken.call_log FINAL "
            "GROUP BY day, model_served ORDER BY day, model_served",
            "SELECT toDate(minute) AS day, model_served, sum(cost) FROM onetoken.call_stats_1m "
            "GROUP BY day, model_served ORDER BY day, model_served",
        ),
        Query(
            "p99 latency by provider",
            "last 7 days, every org",
            "SELECT provider, quantileTDigest(0.99)(latency_us) FROM onetoken.call_log FINAL "  # noqa: S608 - numbers and an org id read back from the data
            f"WHERE ts >= toDateTime64({week}, 6, 'UTC') GROUP BY provider ORDER BY provider",
            "SELECT provider, quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_us_q)[3] "  # noqa: S608 - numbers and an org id read back from the data
            f"FROM onetoken.call_stats_1m WHERE minute >= toDateTime({week}, 'UTC') "
            "GROUP BY provider ORDER BY provider",
        ),
        Query(
            "one org's last hour",
            f"{org}, the largest org, per minute",
            "SELECT toStartOfMinute(ts) AS m, count(), countIf(status >= 400), sum(cost), "  # noqa: S608 - numbers and an org id read back from the data
            "quantileTDigest(0.99)(latency_us) FROM onetoken.call_log FINAL "
            f"WHERE org_id = '{org}' AND ts >= toDateTime64({hour}, 6, 'UTC') "
            "GROUP BY m ORDER BY m",
            "SELECT minute AS m, sum(calls), sumIf(calls, status >= 400), sum(cost), "  # noqa: S608 - numbers and an org id read back from the data
            "quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_us_q)[3] "
            f"FROM onetoken.call_stats_1m WHERE org_id = '{org}' "
            f"AND minute >= toDateTime({hour}, 'UTC') GROUP BY m ORDER BY m",
        ),
    ]


class CheckFailed(Exception):
    pass


def open_engine(path: Path) -> Client:
    """chDB on `path`, migrated and with its TTLs set as the service does it, with the
    query log on."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.xml").write_text(CONFIG)
    client = clickhouse_connect.get_client(
        interface="chdb",
        path=str(path / "clickhouse"),
        chdb_options={"config-file": str(path / "config.xml")},
    )
    ch.apply_migrations(client)
    ch.ensure_ttls(client, Settings(data_dir=path, call_log_ttl_days=180))
    return client


def generate(client: Client, first: int, last: int, chunk: int, window: tuple[int, int],
             per_pass: int, passes: int) -> float:
    """Insert rows number first..last-1 in INSERTs of `chunk`; returns the seconds taken."""
    start_us, end_us = window
    started = time.perf_counter()
    for at in range(first, last, chunk):
        count = min(chunk, last - at)
        client.command(
            GENERATE.format(
                columns=", ".join(CALL_LOG_COLUMNS), orgs=ORGS, models=MODELS,
                providers=PROVIDERS, start_us=start_us, per_pass=per_pass, passes=passes,
                step_us=f"{(end_us - start_us) / per_pass:.6f}", first=at, count=count,
            ),
            settings={"max_insert_threads": 2},
        )
        elapsed = time.perf_counter() - started
        rate = (at + count - first) / elapsed
        print(f"  {at + count:>12,} rows  {elapsed:8.1f} s  {rate:>10,.0f} rows/s", flush=True)
    return time.perf_counter() - started


def settle(client: Client, timeout_s: float) -> float:
    """Wait (up to timeout_s) until no merge runs, so that every query meets the parts as
    background merges leave them; returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        running = int(client.command("SELECT count() FROM system.merges"))
        if running == 0:
            break
        time.sleep(2)
    return time.perf_counter() - started


def table_stats(client: Client) -> dict[str, dict[str, int]]:
    rows = client.query(
        "SELECT table, sum(rows), sum(bytes_on_disk), sum(data_uncompressed_bytes), count() "
        "FROM system.parts WHERE database = 'onetoken' AND active "
        "AND table IN ('call_log', 'call_stats_1m') GROUP BY table"
    ).result_rows
    return {
        str(t): {"rows": int(r), "disk": int(d), "raw": int(u), "parts": int(p)}
        for t, r, d, u, p in rows
    }


def timed(client: Client, sql: str, tag: str, runs: int) -> tuple[list[Any], dict[str, Any]]:
    """The result of `sql` and, over `runs` runs, the median and spread of wall time and
    the rows and bytes read (from the query log)."""
    times: list[float] = []
    result: list[Any] = []
    for n in range(runs):
        started = time.perf_counter()
        result = client.query(sql, settings={"log_comment": f"{tag}#{n}"}).result_rows
        times.append(time.perf_counter() - started)
    client.command("SYSTEM FLUSH LOGS")
    logged = client.query(
        "SELECT read_rows, read_bytes, memory_usage FROM system.query_log "
        "WHERE type = 'QueryFinish' AND log_comment = {c:String} "
        "ORDER BY event_time_microseconds DESC LIMIT 1",
        parameters={"c": f"{tag}#{runs - 1}"},
    ).result_rows
    read_rows, read_bytes, memory = logged[0] if logged else (None, None, None)
    return result, {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "read_rows": read_rows,
        "read_bytes": read_bytes,
        "memory": memory,
        "result_rows": len(result),
    }


def close(a: float, b: float) -> bool:
    return abs(a - b) <= QUANTILE_TOLERANCE * max(abs(a), abs(b), 1)


def check(client: Client, rows: int, results: dict[str, dict[str, list[Any]]]) -> list[str]:
    """The run's own checks; returns what was checked, raises CheckFailed."""
    checked: list[str] = []
    stored = int(client.command("SELECT count() FROM onetoken.call_log"))
    distinct = int(client.command("SELECT count() FROM onetoken.call_log FINAL"))
    if stored != rows or distinct != rows:
        raise CheckFailed(f"call_log holds {stored} rows ({distinct} under FINAL), not {rows}")
    checked.append(f"call_log holds {rows:,} rows, each once under FINAL")
    calls = int(client.command("SELECT sum(calls) FROM onetoken.call_stats_1m"))
    if calls != rows:
        raise CheckFailed(f"the rollup counts {calls} calls, call_log holds {rows}")
    checked.append("the rollup's calls add up to the rows")
    raw_cost = int(client.command("SELECT sum(cost) FROM onetoken.call_log FINAL"))
    rolled_cost = int(client.command("SELECT sum(cost) FROM onetoken.call_stats_1m"))
    if raw_cost != rolled_cost:
        raise CheckFailed(f"cost: raw {raw_cost}, rollup {rolled_cost}")
    checked.append(f"cost sums equal ({raw_cost:,} nano-units)")
    by_model_day = results["cost by model by day"]
    if by_model_day["raw"] != by_model_day["rollup"] or not by_model_day["raw"]:
        raise CheckFailed("cost by model by day differs between call_log and the rollup")
    checked.append(f"cost by model by day identical ({len(by_model_day['raw'])} rows)")
    for name, value_columns in (("p99 latency by provider", (1,)),
                                ("one org's last hour", (4,))):
        raw, rolled = results[name]["raw"], results[name]["rollup"]
        if [r[0] for r in raw] != [r[0] for r in rolled] or not raw:
            raise CheckFailed(f"{name}: the groups differ")
        for a, b in zip(raw, rolled, strict=True):
            if list(a[1:min(value_columns)]) != list(b[1:min(value_columns)]):
                raise CheckFailed(f"{name}: counts differ: {a} / {b}")
            for i in value_columns:
                if not close(float(a[i]), float(b[i])):
                    raise CheckFailed(f"{name}: quantile {a[i]} raw, {b[i]} rollup")
        checked.append(f"{name}: counts equal, p99 within {QUANTILE_TOLERANCE:.0%} "
                       f"({len(raw)} groups)")
    return checked


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


@dataclass
class Measured:
    """What one size measured."""

    rows: int
    insert_s: float
    settle_s: float
    load: str
    stats: dict[str, dict[str, int]]
    queries: dict[str, dict[str, dict[str, Any]]]
    described: dict[str, str]
    checked: list[str]


def report(meta: dict[str, Any], sizes: list[Measured], target: int) -> str:
    largest = sizes[-1].rows
    out = [
        SECTION,
        "",
        f"Generated by `python bench/analytics.py --rows {target}` on {meta['date']}"
        + ("." if largest == target else
           f", stopped after {largest:,} rows: the figures below are the largest size "
           "reached."),
        "",
        f"- machine: {meta['machine']}",
        f"- git: {meta['git']}; chDB {meta['chdb']} (engine {meta['engine']})",
        f"- data: synthetic call_log rows over {DAYS} days up to the run (about {ORGS} orgs, "
        f"skewed: the largest has about a tenth of the calls; {MODELS} models on "
        f"{PROVIDERS} providers; 2.9% errors, 40% streamed), generated in ClickHouse with "
        "INSERT ... SELECT FROM numbers() into the migrated schema, so the materialized view "
        f"filled the rollup as rows arrived; in passes of {meta['per_pass']:,} rows, each "
        "over the whole window, so that every size has the 30 days' shape.",
        f"- method: at each size, each query {meta['runs']} times in a row on one chDB "
        "engine, median wall time (min-max in brackets); rows and bytes read and peak "
        "memory from system.query_log of the last run. Raw queries read call_log FINAL; "
        "rollup queries sum the rollup's counters and merge its t-digest states. Before "
        "querying, the run waits for background merges to finish (at most "
        f"{meta['settle']:.0f} s). The machine's 2 cores were shared with other work "
        "(load averages below): absolute times are pessimistic, the ratios are the point.",
    ]
    previous = 0
    for m in sizes:
        out += [
            "",
            f"### {m.rows:,} rows",
            "",
            f"Rows {previous:,} to {m.rows:,} inserted in {m.insert_s:,.0f} s "
            f"({(m.rows - previous) / m.insert_s:,.0f} rows/s with the view), then "
            f"{m.settle_s:.0f} s of merges; load average before / after: {m.load}.",
            "",
            "| table | rows | active parts | on disk MiB | uncompressed MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for table in ("call_log", "call_stats_1m"):
            s = m.stats.get(table, {"rows": 0, "parts": 0, "disk": 0, "raw": 0})
            out.append(f"| {table} | {s['rows']:,} | {s['parts']} | {mib(s['disk'])} | "
                       f"{mib(s['raw'])} |")
        previous = m.rows
        out += [
            "",
            "| query | scope | read from | median s | rows read | MiB read | "
            "peak memory MiB | speed-up |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, by_source in m.queries.items():
            raw_s = by_source["raw"]["median_s"]
            for source, label in (("raw", "call_log FINAL"), ("rollup", "call_stats_1m")):
                q = by_source[source]
                speed = "" if source == "raw" else f"{raw_s / q['median_s']:,.1f}x"
                out.append(
                    f"| {name} | {m.described[name]} | {label} | {q['median_s']:.3f} "
                    f"({q['min_s']:.3f}-{q['max_s']:.3f}) | {q['read_rows']:,} | "
                    f"{mib(q['read_bytes'])} | {mib(q['memory'])} | {speed} |"
                )
        out += ["", "Checked before printing:", ""]
        out += [f"- {c}" for c in m.checked]
    return "\n".join(out) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of the report (up to the next `## ` heading), or
    append it; the rest of the file stays as it is."""
    lines = path.read_text().rstrip("\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.startswith(SECTION)), None)
    if start is None:
        new = [*lines, "", *text.rstrip("\n").split("\n")]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        new = lines[:start] + text.rstrip("\n").split("\n") + (["", *tail] if tail else [])
    path.write_text("\n".join(new) + "\n")


def measure_size(client: Client, rows: int, end_s: int, runs: int
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], list[str]]:
    (largest,) = client.query(
        "SELECT org_id FROM onetoken.call_stats_1m GROUP BY org_id "
        "ORDER BY sum(calls) DESC LIMIT 1"
    ).result_rows[0]
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    results: dict[str, dict[str, list[Any]]] = {}
    described: dict[str, str] = {}
    for q in queries(end_s, str(largest)):
        measured[q.name], results[q.name] = {}, {}
        described[q.name] = q.what
        for source, sql in (("raw", q.raw), ("rollup", q.rollup)):
            result, m = timed(client, sql, f"bench:{rows}:{q.name}:{source}", runs)
            measured[q.name][source], results[q.name][source] = m, result
            print(f"  {q.name} / {source}: {m}", flush=True)
    return measured, results, described, check(client, rows, results)


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--pass-rows", type=int, default=10_000_000,
                        help="rows per pass over the window (divides --rows)")
    parser.add_argument("--measure-at", default="10000000,30000000,50000000",
                        help="sizes (comma-separated, multiples of --pass-rows) measured "
                        "on the way to --rows; the report is rewritten after each")
    parser.add_argument("--chunk", type=int, default=5_000_000, help="rows per INSERT")
    parser.add_argument("--runs", type=int, default=5, help="runs of each query")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument("--settle", type=float, default=300,
                        help="seconds to wait at most for background merges before querying")
    parser.add_argument("--output", type=Path, default=BENCH / "RESULTS.md",
                        help="report to update (its analytics section)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    per_pass = min(args.pass_rows, args.rows)
    sizes = sorted({int(x) for x in args.measure_at.split(",") if x} | {args.rows})
    sizes = [n for n in sizes if n <= args.rows]
    if args.rows % per_pass or any(n % per_pass for n in sizes):
        parser.error("--rows and --measure-at must be multiples of --pass-rows")

    args.data_root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    data_dir = args.data_root / f"analytics-{stamp}"
    end_s = int(time.time()) // 60 * 60
    window = ((end_s - DAYS * 86400) * 10**6, end_s * 10**6)
    info = machine_info()
    meta: dict[str, Any] = {
        "runs": args.runs, "per_pass": per_pass, "settle": args.settle,
        "machine": f"{info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
                   f"Linux {info['kernel']}",
        "git": git_sha(), "chdb": chdb.__version__,
    }
    print(f"data dir {data_dir}", flush=True)
    client = open_engine(data_dir)
    # The embedded engine takes SIGINT for itself; Ctrl-C or a kill must still end the run
    # through the cleanup below (after the statement running then).
    previous = {s: signal.signal(s, _interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    done: list[Measured] = []
    try:
        meta["engine"] = str(client.command("SELECT version()"))
        generated = 0
        for size in sizes:
            load_before = loadavg()
            print(f"generating rows {generated:,} to {size:,}", flush=True)
            insert_s = generate(client, generated, size, args.chunk, window, per_pass,
                                args.rows // per_pass)
            generated = size
            settle_s = settle(client, args.settle)
            stats = table_stats(client)
            print(f"merges settled after {settle_s:.0f} s: {stats}", flush=True)
            measured, _, described, checked = measure_size(client, size, end_s, args.runs)
            done.append(Measured(size, insert_s, settle_s, f"{load_before} / {loadavg()}",
                                 stats, measured, described, checked))
            meta["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            text = report(meta, done, args.rows)
            print()
            print(text, flush=True)
            if not args.no_write:
                write_section(args.output, text)
                print(f"wrote the analytics section of {args.output}", flush=True)
    except CheckFailed as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        largest = f"{done[-1].rows:,} rows" if done else "none"
        print(f"interrupted; largest size measured: {largest}", file=sys.stderr)
        return 130
    finally:
        client.close()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if args.keep:
        print(f"kept {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
