#!/usr/bin/env python3
"""Many gateways behind one nginx: one, two and three `onetoken gateway` processes, with
Redis sharing their limits and money, and without.

    python bench/scale.py [--duration 10] [--quick] [--database-url URL]

Per row: the release mock upstream, a private redis-server (unix socket), PostgreSQL when
--database-url or ONETOKEN_TEST_POSTGRES_URL names a server (a database of its own per
row, dropped afterwards; else SQLite in the data dir), `onetoken control`, N
`onetoken gateway` processes and nginx in front (round robin, keep-alive upstream), then
wrk (bench/chat.lua, 32 connections) through nginx. The org has rpm, tpm and concurrency
limits set far above what the machine serves and a priced model, so with Redis every
request goes through the leases (rates, slots and money).

Without Redis, gateways cannot share a data dir (the engine refuses: each would keep
limits and money of its own), so the Redis-off rows with more than one gateway run them on
data dirs of their own against the same control process. Nothing ingests those journals:
their records are counted as journal lines, and limits and money there are per gateway.

Each row checks its own output before it counts: no non-2xx, every 2xx stored (call_log
through the control API, or journal lines), and `onetoken billing reconcile` exit 0 where
the ledger sees the calls. Last, with three gateways, one key with rpm 60 hammered through
nginx: admitted against the GCRA bound, Redis off and on.

Writes the "Many gateways" section of bench/RESULTS.md (the rest stays as it is) and the
raw numbers to bench/out/scale-*.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as common
from run import (
    HOST,
    NGINX_CONF,
    OUT_DIR,
    WORKLOADS,
    BenchError,
    Control,
    Service,
    Services,
    Target,
    fmt,
    free_port,
    log,
    run_cmd,
    run_wrk,
    wait_ready,
    wait_serves,
)

GATEWAY_COUNTS = (1, 2, 3)
SECTION = "## Many gateways"
# Far above what two cores serve, so no request is refused, yet set: with Redis each
# request takes rate units, a concurrency slot and money from the gateway's leases.
ORG_LIMITS = {"rpm": 1_000_000_000, "tpm": 1_000_000_000, "concurrency": 100_000}
LIMIT_RPM = 60
LIMIT_GATEWAYS = 3
# rust/gateway's shared-state defaults (docs/scale-out.md): a rate unit is spent at most
# lease_ttl + one refill interval after the global bucket let it out.
LEASE_TTL_S = 3.0
REFILL_S = 0.1
STORE_TIMEOUT_S = 90.0


# ---------------------------------------------------------------- a deployment


@dataclass
class Cluster:
    tag: str
    gateways: int
    redis: bool
    data_dir: Path
    env: dict[str, str]
    control: Service
    gateway_svcs: list[Service]
    # Journal dirs nobody ingests (Redis off, several gateways): counted line by line.
    spools: list[Path]
    gateway_urls: list[str]
    target: Target
    ctl: Control
    database: str
    python: str
    nginx: Service | None = None
    redis_svc: Service | None = None
    drop_db: list[str] = field(default_factory=list)

    @property
    def ingested(self) -> bool:
        """Whether the control process ingests every gateway's journal."""
        return not self.spools

    def onetoken_pids(self) -> dict[str, list[int]]:
        return {
            "control": [self.control.proc.pid],
            "gateways": [g.proc.pid for g in self.gateway_svcs],
        }


def start_redis(services: Services, workdir: Path) -> tuple[Service, str]:
    sock = workdir / "redis.sock"
    argv = ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "600"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
    svc = services.start("redis", argv)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if not svc.alive() or time.monotonic() > deadline:
            raise BenchError(f"redis-server did not start:\n{svc.tail()}")
        time.sleep(0.05)
    return svc, f"unix://{sock}"


@contextlib.contextmanager
def database(url: str, tag: str) -> Iterator[str]:
    """A fresh PostgreSQL database on the server `url` names, dropped afterwards; "" (the
    data dir's SQLite) when no server was given."""
    if not url:
        yield ""
        return
    import psycopg

    name = f"onetoken_scale_{tag.replace('-', '_')}_{secrets.token_hex(3)}"
    admin = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_cluster(
    services: Services,
    workdir: Path,
    upstream: str,
    python: str,
    n: int,
    redis_url: str,
    database_url: str,
) -> Cluster:
    tag = f"{n}gw-redis-{'on' if redis_url else 'off'}"
    data_dir = workdir / tag / "data"
    data_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONETOKEN_")}
    env.update(
        {
            "ONETOKEN_DATA_DIR": str(data_dir),
            "ONETOKEN_CONTROL_LISTEN": f"{HOST}:{free_port()}",
            "ONETOKEN_DEMO_UPSTREAM": upstream,
            "ONETOKEN_LOG_LEVEL": "WARNING",
            # `serve --demo` lets platform providers reach loopback by itself; `control`
            # does not, and the mock listens there.
            "ONETOKEN_UPSTREAM_PRIVATE_CIDRS": "127.0.0.0/8",
        }
    )
    if database_url:
        env["ONETOKEN_DATABASE_URL"] = database_url
    if redis_url:
        env["ONETOKEN_REDIS_URL"] = redis_url
    cli = [python, "-m", "onetoken.cli"]
    boot = json.loads(run_cmd([*cli, "bootstrap", "--json"], 300, env=env).strip().splitlines()[-1])
    # `serve --demo` once: the demo provider (at the mock) and its priced models.
    setup_gw = f"{HOST}:{free_port()}"
    setup = services.start(
        f"{tag}-setup", [*cli, "serve", "--demo"], {**env, "ONETOKEN_GATEWAY_LISTEN": setup_gw}
    )
    wait_ready(setup, f"http://{setup_gw}/healthz", 180)
    setup.stop()
    services.started.remove(setup)
    # Gateways on other data dirs derive the channel token from the same secret.
    env["ONETOKEN_SECRET_KEY"] = (data_dir / "secret.key").read_text().strip()
    control_url = f"http://{env['ONETOKEN_CONTROL_LISTEN']}"
    control = services.start(f"{tag}-control", [*cli, "control"], env)
    wait_ready(control, f"{control_url}/api/openapi.json", 180)
    target = Target(
        tag,
        "",
        "demo-chat",
        control.proc.pid,
        api_key=str(boot["api_key"]),
        control_url=control_url,
        admin_email=str(boot["admin_email"]),
        admin_password=str(boot["admin_password"]),
        org_id=str(boot["org_id"]),
    )
    ctl = Control(target)
    # Enough for tens of millions of demo-chat calls, and below 2^53 nano-units, the most
    # the Redis money lease counts exactly (docs/scale-out.md: past it nothing is granted).
    ctl.call(
        "POST",
        "/billing/credits",
        {"amount": "1000000", "kind": "adjustment", "idempotency_key": "bench-top-up"},
    )
    ctl.call("PUT", f"/orgs/{target.org_id}/limits", ORG_LIMITS)

    gateways: list[Service] = []
    spools: list[Path] = []
    urls: list[str] = []
    for i in range(n):
        listen = f"{HOST}:{free_port()}"
        gw_env = {**env, "ONETOKEN_CONTROL_URL": control_url, "ONETOKEN_GATEWAY_LISTEN": listen}
        if not redis_url and n > 1:
            own = workdir / tag / f"gateway-{i}"
            own.mkdir()
            gw_env["ONETOKEN_DATA_DIR"] = str(own)
            spools.append(own / "spool")
        svc = services.start(f"{tag}-gateway-{i}", [*cli, "gateway"], gw_env)
        wait_ready(svc, f"http://{listen}/healthz", 120)
        gateways.append(svc)
        urls.append(listen)
        # Each gateway serves the key and the model (limits included) before the row.
        target.base_url = f"http://{listen}"
        wait_serves(target, 60)

    nginx = start_nginx(services, workdir / tag, urls)
    target.base_url = f"http://{nginx[1]}"
    wait_serves(target, 30)
    return Cluster(
        tag,
        n,
        bool(redis_url),
        data_dir,
        env,
        control,
        gateways,
        spools,
        urls,
        target,
        ctl,
        "PostgreSQL" if database_url else "SQLite",
        python,
        nginx=nginx[0],
    )


def start_nginx(services: Services, workdir: Path, upstreams: list[str]) -> tuple[Service, str]:
    """bench/run.py's nginx (keep-alive upstream pool, buffering off), round robin over
    every gateway: NGINX_CONF's one `server {upstream};` line becomes one per gateway."""
    prefix = workdir / "nginx"
    prefix.mkdir()
    prefix.chmod(0o755)  # workers drop to an unprivileged user when started as root
    listen = f"{HOST}:{free_port()}"
    servers = ";\n    server ".join(upstreams)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, upstream=servers, listen=listen))
    svc = services.start(
        f"{workdir.name}-nginx", ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
    )
    wait_ready(svc, f"http://{listen}/healthz", 15, ok=(200, 404))
    return svc, listen


# ---------------------------------------------------------------- what was stored


def journal_lines(c: Cluster) -> Iterator[bytes]:
    for spool in c.spools:
        for path in sorted(spool.glob("*.jsonl")):
            with path.open("rb") as f:
                yield from f


def stored_calls(c: Cluster) -> int:
    """Records of the org so far: call_log rows (control API) when the control process
    ingests every journal, else journal lines in the gateways' own spool dirs."""
    if c.ingested:
        stats = c.ctl.call("GET", "/billing/call-stats?group_by=model")
        return sum(int(r["calls"]) for r in stats["data"])
    return sum(1 for line in journal_lines(c) if line.endswith(b"\n"))


def served_for_key(c: Cluster, key_id: str) -> int:
    """Records of one key's answered (status < 400) requests."""
    if c.ingested:
        stats = c.ctl.call("GET", "/billing/call-stats?group_by=key")
        return sum(
            int(r["calls"]) - int(r["errors"]) for r in stats["data"] if r["group"] == key_id
        )
    served = 0
    for line in journal_lines(c):
        if line.endswith(b"\n") and key_id.encode() in line:
            rec = json.loads(line)
            served += rec.get("key_id") == key_id and int(rec.get("status", 0)) < 400
    return served


def wait_count(count: Callable[[], int], at_least: int, at_most: int) -> int:
    """What `count` gives once it reached `at_least` and held still for two seconds, or
    went past `at_most`, or the time ran out. Records land in batches (the engine's journal
    flush, then the ingestion's pass), so one unchanged reading is not enough."""
    deadline = time.monotonic() + STORE_TIMEOUT_S
    last, still = -1, 0
    while time.monotonic() < deadline:
        n = count()
        if n > at_most:
            return n
        still = still + 1 if n == last else 0
        if n >= at_least and still >= 2:
            return n
        last = n
        time.sleep(1.0)
    return count()


def reconcile(c: Cluster) -> int:
    """`onetoken billing reconcile` exit code, once ledger and call_log have both caught
    up (they are ingested by separate cursors): retried while it finds a difference."""
    argv = [c.python, "-m", "onetoken.cli", "billing", "reconcile", "--json"]
    deadline = time.monotonic() + 60
    code = -1
    while time.monotonic() < deadline:
        res = subprocess.run(  # noqa: S603 - argv built here
            argv, env=c.env, capture_output=True, text=True, timeout=120, check=False
        )
        code = res.returncode
        if code == 0:
            return 0
        time.sleep(1.0)
    return code


# ---------------------------------------------------------------- measurements


def cpu_of(pids: list[int]) -> float:
    return sum(common.cpu_seconds(p) for p in pids)


def measure_row(c: Cluster, redis: Service | None, seconds: int, warmup: int) -> dict[str, Any]:
    t = c.target
    w = WORKLOADS[0]  # non-streaming chat, 32 connections
    run_wrk(t, w, warmup)
    groups = c.onetoken_pids()
    # The warm-up's records land after it ends: count from where they stop growing.
    before = wait_count(lambda: stored_calls(c), 0, sys.maxsize)
    cpu0 = {k: cpu_of(v) for k, v in groups.items()}
    redis0 = common.cpu_seconds(redis.proc.pid) if redis else 0.0
    data = run_wrk(t, w, seconds)
    cpu1 = {k: cpu_of(v) for k, v in groups.items()}
    redis1 = common.cpu_seconds(redis.proc.pid) if redis else 0.0
    total = data["requests"] + data["errors"]
    ok = data["requests"] - data["errors"]
    per = {k: (cpu1[k] - cpu0[k]) * 1e6 / total if total else None for k in groups}
    # Requests cut off when wrk stopped may be stored too: at most one per connection.
    stored = wait_count(lambda: stored_calls(c) - before, ok, ok + w.connections)
    problems = []
    if data["errors"]:
        problems.append(f"{data['errors']} errors or non-2xx")
    if not ok <= stored <= ok + w.connections:
        where = "call_log rows" if c.ingested else "journal lines"
        problems.append(f"{stored} {where} for {ok} 2xx")
    code = reconcile(c) if c.ingested else None
    if code not in (0, None):
        problems.append(f"billing reconcile exit {code}")
    row = {
        "gateways": c.gateways,
        "redis": c.redis,
        "database": c.database,
        "records": "call_log" if c.ingested else "journal lines",
        **data,
        "ok": ok,
        "stored": stored,
        "reconcile_exit": code,
        "cpu_us_per_req_onetoken": sum(v or 0.0 for v in per.values()) if total else None,
        "cpu_us_per_req_gateways": per["gateways"],
        "cpu_us_per_req_control": per["control"],
        "cpu_us_per_req_redis": (redis1 - redis0) * 1e6 / total if redis and total else None,
        "valid": not problems,
        "problems": problems,
    }
    return row


def limits_run(c: Cluster, seconds: int) -> dict[str, Any]:
    """One key with rpm LIMIT_RPM, hammered through nginx over every gateway."""
    created = c.ctl.call(
        "POST", "/keys", {"name": f"bench-rpm-{c.tag}", "limits": {"rpm": LIMIT_RPM}}
    )
    key = str(created["key"])
    # Every gateway knows the key before the clock starts (/v1/models takes no rate unit).
    hdrs = {"Authorization": f"Bearer {key}"}
    for url in c.gateway_urls:
        deadline = time.monotonic() + 30
        while common.http_status(f"http://{url}/v1/models", None, hdrs) != 200:
            if time.monotonic() > deadline:
                raise BenchError(f"{c.tag}: gateway {url} does not know the new key")
            time.sleep(0.05)
    t = Target("limits", c.target.base_url, c.target.model, c.target.pid, api_key=key)
    data = run_wrk(t, WORKLOADS[0], seconds)
    elapsed = data["requests"] / data["rps"] if data["rps"] else float(seconds)
    admitted = data["requests"] - data["errors"]
    # The key's records less the one /v1/models probe per gateway that answered 200.
    probes = len(c.gateway_urls)
    recorded = wait_count(
        lambda: served_for_key(c, str(created["id"])) - probes,
        admitted,
        admitted + WORKLOADS[0].connections,
    )
    lim: dict[str, Any] = {
        "gateways": c.gateways,
        "redis": c.redis,
        "rpm": LIMIT_RPM,
        "seconds": elapsed,
        "requests": data["requests"],
        "admitted": admitted,
        "refused": data["errors"],
        # The same from the records: what the gateways journaled as answered.
        "admitted_recorded": recorded,
        "gcra_bound": LIMIT_RPM + LIMIT_RPM * elapsed / 60,
        "lease_bound": LIMIT_RPM + LIMIT_RPM * (elapsed + LEASE_TTL_S + REFILL_S) / 60,
    }
    lim["within_bound"] = max(admitted, recorded) <= lim["lease_bound"]
    return lim


# ---------------------------------------------------------------- report


def section(meta: dict[str, Any], rows: list[dict[str, Any]], limits: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    out = [
        SECTION,
        "",
        f"Generated by `{meta['command']}` on {meta['date']}; git {meta['git']}; "
        f"{m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}; "
        f"control database {meta['database']}; onetoken extension: {meta['profile']} build; "
        f"load average before / after: {meta['loadavg_start']} / {meta['loadavg_end']}.",
        "",
        f"Non-streaming chat (`bench/chat.lua`), wrk through nginx (round robin, keep-alive "
        f"upstream) over N `onetoken gateway` processes and one `onetoken control`, 32 "
        f"connections, {meta['seconds']} s per row, everything on the same cores. The org "
        "has rpm, tpm and concurrency limits (never reached) and a priced model. CPU µs/req: "
        "the processes' CPU time during the row over the requests served; onetoken = "
        "gateways + control.",
        "",
        "| gateways | Redis | req/s | p50 µs | p99 µs | errors | CPU µs/req onetoken | "
        "gateways | control | redis-server | 2xx | stored | reconcile | valid |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        rec = "exit 0" if r["reconcile_exit"] == 0 else fmt(r["reconcile_exit"])
        if r["reconcile_exit"] is None:
            rec = "n/a"
        stored = f"{r['stored']:,} {'rows' if r['records'] == 'call_log' else 'lines'}"
        out.append(
            f"| {r['gateways']} | {'on' if r['redis'] else 'off'} | {fmt(r['rps'])} | "
            f"{fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['errors'])} | "
            f"{fmt(r['cpu_us_per_req_onetoken'], 1)} | {fmt(r['cpu_us_per_req_gateways'], 1)} | "
            f"{fmt(r['cpu_us_per_req_control'], 1)} | {fmt(r['cpu_us_per_req_redis'], 1)} | "
            f"{fmt(r['ok'])} | {stored} | {rec} | "
            f"{'yes' if r['valid'] else 'INVALID: ' + '; '.join(r['problems'])} |"
        )
    out += [
        "",
        "- stored: call_log rows the control process ingested (counted through the control "
        "API), or, for Redis off with several gateways, journal lines in the gateways' own "
        "spool dirs. It may exceed the 2xx count by the requests cut off when wrk stopped "
        "(at most one per connection). reconcile: `onetoken billing reconcile` (ledger "
        "against call_log) exit code.",
        "- **Redis off with 2 or 3 gateways is not a deployment**: without Redis gateways "
        "cannot share a data dir (the engine refuses it), so each runs on a data dir of its "
        "own against the same control process, which ingests none of their journals: no "
        "call_log, no ledger, no reconcile (and the control's CPU there has no ingestion in "
        "it). Limits and money are per gateway there (a key "
        "gets N times its limit; each gateway reserves against the whole balance). The rows "
        "show what sharing through Redis costs next to that, and the table below why it is "
        "needed.",
        "",
    ]
    if limits:
        out += [
            "### Limits across gateways",
            "",
            f"{LIMIT_GATEWAYS} gateways behind nginx, one new key with rpm {LIMIT_RPM}, wrk "
            "(32 connections) for t seconds. GCRA bound: the most one limiter admits, "
            f"{LIMIT_RPM} + {LIMIT_RPM}·t/60. Documented bound with Redis "
            "(docs/scale-out.md): a rate unit may be spent up to lease_ttl (3 s) plus one "
            "refill interval (0.1 s) after the global bucket let it out, "
            f"{LIMIT_RPM} + {LIMIT_RPM}·(t + 3.1)/60. admitted: 2xx as wrk saw them; "
            "admitted (records): the key's answered requests in call_log or, Redis off, "
            "in the three journals (requests cut off when wrk stopped may count there).",
            "",
            "| Redis | t s | requests | admitted | admitted (records) | refused | GCRA bound | "
            "bound with lease slack | admitted / GCRA bound | within the bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in limits:
            out.append(
                f"| {'on' if r['redis'] else 'off'} | {r['seconds']:.1f} | {fmt(r['requests'])} | "
                f"{fmt(r['admitted'])} | {fmt(r['admitted_recorded'])} | {fmt(r['refused'])} | "
                f"{fmt(r['gcra_bound'], 0)} | "
                f"{fmt(r['lease_bound'], 0)} | {r['admitted'] / r['gcra_bound']:.2f} | "
                f"{'yes' if r['within_bound'] else 'NO'} |"
            )
        out.append("")
    return "\n".join(out)


def write_section(path: Path, text: str) -> None:
    """Replace the "Many gateways" section of the report (up to the next `## ` heading),
    or append it; the rest of the file stays as it is."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.rstrip("\n").split("\n")
    start = next((i for i, ln in enumerate(lines) if ln == SECTION), None)
    if start is None:
        new = [*lines, "", *text.rstrip("\n").split("\n")]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        new = lines[:start] + text.rstrip("\n").split("\n") + (["", *tail] if tail else [])
    path.write_text("\n".join(new) + "\n")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per row (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per row, 1 s warm-up")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("ONETOKEN_TEST_POSTGRES_URL", ""),
        help="PostgreSQL server (postgresql+psycopg://...) for the control database: each "
        "row gets a database of its own there (default ONETOKEN_TEST_POSTGRES_URL, else "
        "SQLite in the data dir)",
    )
    parser.add_argument(
        "--onetoken-python", help="interpreter with onetoken installed (default: this one)"
    )
    parser.add_argument("--output", type=Path, default=common.BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    seconds = 3 if args.quick else max(1, args.duration)
    warmup = 1 if args.quick else 2

    common.ensure_debian_tools()
    if shutil.which("redis-server") is None:
        raise BenchError("redis-server not found (Debian: apt-get install -y redis-server)")
    py = common.onetoken_python(args.onetoken_python)
    if py is None:
        raise BenchError("onetoken (with its extension) is not importable: run `make bench-scale`")
    mock_bin, _ = common.build_rust_tools()
    meta: dict[str, Any] = {
        "command": " ".join(["python bench/scale.py", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": common.machine_info(),
        "git": common.git_sha(),
        "seconds": seconds,
        "database": "PostgreSQL (a database per row)" if args.database_url else "SQLite",
        "profile": common.extension_profile(py),
        "python": platform.python_version(),
        "loadavg_start": common.loadavg(),
    }
    rows: list[dict[str, Any]] = []
    limits: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onetoken-scale-") as tmp:
        workdir = Path(tmp)
        services = Services(workdir)
        with common.terminate_on_signals(services):
            try:
                mock = common.start_mock(services, mock_bin)
                upstream = mock.base_url.removeprefix("http://")
                for redis_on in (False, True):
                    for n in GATEWAY_COUNTS:
                        tag = f"{n}gw-redis-{'on' if redis_on else 'off'}"
                        log(f"{tag}: starting")
                        with database(args.database_url, tag) as db_url:
                            try:
                                redis_svc, redis_url = None, ""
                                if redis_on:
                                    redis_dir = workdir / tag / "redis"
                                    redis_dir.mkdir(parents=True)
                                    redis_svc, redis_url = start_redis(services, redis_dir)
                                c = start_cluster(
                                    services, workdir, upstream, py, n, redis_url, db_url
                                )
                                row = measure_row(c, redis_svc, seconds, warmup)
                                rows.append(row)
                                log(
                                    f"{tag}: {row['rps']:,.0f} req/s, errors {row['errors']}, "
                                    f"onetoken cpu/req "
                                    f"{fmt(row['cpu_us_per_req_onetoken'], 1)} µs, stored "
                                    f"{row['stored']} for {row['ok']}, reconcile "
                                    f"{row['reconcile_exit']}, "
                                    f"{'valid' if row['valid'] else row['problems']}"
                                )
                                if n == LIMIT_GATEWAYS:
                                    lim = limits_run(c, 3 if args.quick else 10)
                                    limits.append(lim)
                                    log(
                                        f"{tag}: rpm {LIMIT_RPM}: {lim['admitted']} admitted "
                                        f"in {lim['seconds']} s (GCRA bound "
                                        f"{lim['gcra_bound']:.0f})"
                                    )
                            finally:
                                # Everything but the mock: the next row starts clean.
                                services.stop_after_first()
            finally:
                services.stop_all()
    meta["loadavg_end"] = common.loadavg()
    write_section(args.output, section(meta, rows, limits))
    OUT_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = OUT_DIR / f"scale-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows, "limits": limits}, indent=2))
    log(f"wrote the '{SECTION[3:]}' section of {args.output} and {out}")
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(1)
