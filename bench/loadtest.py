#!/usr/bin/env python3
"""`make locust`: bench/locustfile.py against a deployment, with tenants made for it, its
reports in one directory, and a summary that checks the run before giving a figure.

    python bench/loadtest.py [--users 20] [--duration 1m] [--shape steady|ramp|spike|soak]
                             [--host URL --control-url URL] [--tenants 4] [--out DIR]

Without --host: a throwaway deployment on 127.0.0.1 (the bundled mock upstream and
`onetoken serve --demo` in a temp data dir), stopped at the end. With --host: that
gateway, with the keys in ONETOKEN_API_KEYS, or else with tenants made through the control
API at --control-url (or ONETOKEN_CONTROL_URL) as the operator named by
ONETOKEN_ADMIN_LOGIN and ONETOKEN_ADMIN_PASSWORD.

The run is valid only when locust exits 0, no row of its stats has a failure, every
sampled response passed the OpenAI SDK's types, TTFT and GAP rows are there, the HTML
report was written, and each tenant org's stored call records lie between the requests
its key got an answer for and those it sent (a number measured over work the gateway
refused or did not record is not a result). Exit 1 otherwise. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tenants as tenancy  # bench/tenants.py, beside this script

BENCH = Path(__file__).resolve().parent
LOCUSTFILE = BENCH / "locustfile.py"
# How long a shape runs when --duration is not given: a soak is meant to be long.
DEFAULT_DURATION = {"steady": "1m", "ramp": "2m", "spike": "2m", "soak": "30m"}
# Locust lets users finish the request they are in for this long after the end.
STOP_TIMEOUT_S = 10
STORED_WAIT_S = 60.0
READY_WAIT_S = 180.0
# Rows the locustfile reports for a stream beside the request itself.
STREAM_ROWS = ("TTFT", "GAP", "STREAM")


class RunError(Exception):
    """The run could not be set up; reported as one line."""


def log(msg: str) -> None:
    print(f"[locust {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- a throwaway deployment


@dataclass
class Local:
    """The mock upstream and `onetoken serve --demo`, each in a process group of its own
    (so stopping one stops its children), in a temp dir removed at the end."""

    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603 - argv built here from fixed parts
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self.procs.clear()


def wait_for(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes],
             tail: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunError(f"{what}: the process exited ({proc.returncode}):\n{tail()}")
        with contextlib.suppress(httpx.HTTPError, OSError, ValueError, KeyError):
            found = check()
            if found:
                return found
        time.sleep(0.2)
    raise RunError(f"{what}: not ready after {timeout:.0f} s:\n{tail()}")


def start_local(local: Local, mock_delay_ms: int) -> dict[str, str]:
    """The mock and a demo deployment on loopback ports chosen by the kernel; returns the
    gateway and control URLs and the operator's credentials."""
    py = sys.executable
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ONETOKEN_")}
    mock = local.spawn(
        "mock",
        [py, "-m", "onetoken.cli", "mock-upstream", "--listen", "127.0.0.1:0",
         "--delay-ms", str(mock_delay_ms)],
        base_env,
    )

    def mock_addr() -> str | None:
        for line in local.tail("mock").splitlines():
            if "listening on http://" in line:
                return line.rsplit("http://", 1)[1].strip()
        return None

    upstream = wait_for("mock upstream", mock_addr, 60, mock, lambda: local.tail("mock"))
    data_dir = local.workdir / "data"
    env = {
        **base_env,
        "ONETOKEN_DATA_DIR": str(data_dir),
        "ONETOKEN_GATEWAY_LISTEN": "127.0.0.1:0",
        "ONETOKEN_CONTROL_LISTEN": "127.0.0.1:0",
        "ONETOKEN_METRICS_LISTEN": "127.0.0.1:0",
        "ONETOKEN_DEMO_UPSTREAM": upstream,
        "ONETOKEN_LOG_LEVEL": "WARNING",
    }
    boot = subprocess.run(  # noqa: S603 - fixed argv
        [py, "-m", "onetoken.cli", "bootstrap", "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    if boot.returncode != 0:
        raise RunError(f"onetoken bootstrap failed: {boot.stderr[-2000:]}")
    creds = json.loads(boot.stdout.strip().splitlines()[-1])
    serve = local.spawn("serve", [py, "-m", "onetoken.cli", "serve", "--demo"], env)

    def endpoints() -> dict[str, str] | None:
        announced = json.loads((data_dir / "control.json").read_text())
        if announced.get("pid") != serve.pid or not announced.get("gateway"):
            return None
        gateway, control = announced["gateway"], announced["url"]
        ok = (
            httpx.get(f"{gateway}/healthz", timeout=2).status_code == 200
            and httpx.get(f"{control}/api/openapi.json", timeout=5).status_code == 200
        )
        return {"gateway": gateway, "control": control} if ok else None

    found = wait_for("onetoken serve", endpoints, READY_WAIT_S, serve,
                     lambda: local.tail("serve"))
    return {**found, "login": creds["admin_email"], "password": creds["admin_password"]}


# ---------------------------------------------------------------- checking the output


def read_stats(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def row(stats: list[dict[str, str]], kind: str, name: str) -> dict[str, str] | None:
    return next((r for r in stats if r["Type"] == kind and r["Name"] == name), None)


def check_run(
    out: Path, locust_code: int, validate_every: int, stored: list[dict[str, Any]] | None
) -> list[str]:
    """Every reason the run is not a result (empty: it is one)."""
    problems = []
    if locust_code != 0:
        problems.append(f"locust exited {locust_code}")
    stats_path = out / "locust_stats.csv"
    if not stats_path.exists():
        return [*problems, "no locust_stats.csv"]
    stats = read_stats(stats_path)
    for r in stats:
        if int(r["Failure Count"]):
            label = f"{r['Type']} {r['Name']}".strip()
            problems.append(f"{label}: {r['Failure Count']} failures")
    requests = sum(int(r["Request Count"]) for r in stats if r["Type"] in ("GET", "POST"))
    if requests == 0:
        problems.append("no request was made")
    for kind in STREAM_ROWS:
        entry = row(stats, kind, "chat stream")
        if entry is None or int(entry["Request Count"]) == 0:
            problems.append(f"no {kind} entry: no stream was read to [DONE]")
    html = out / "report.html"
    if not html.exists() or html.stat().st_size == 0:
        problems.append("no HTML report")
    counts_path = out / "counts.json"
    if not counts_path.exists():
        return [*problems, "the locustfile wrote no counts.json"]
    counts = json.loads(counts_path.read_text())
    for kind, n in counts["invalid"].items():
        problems.append(f"{kind}: {n} sampled responses failed the OpenAI SDK's types")
    if validate_every > 0 and requests and not counts["validated"]:
        problems.append("no response was sampled and validated")
    for s in stored or []:
        if not s["answered"] <= s["stored"] <= s["sent"]:
            problems.append(
                f"{s['tenant']}: {s['stored']} calls stored, expected between "
                f"{s['answered']} answered and {s['sent']} sent"
            )
    return problems


def wait_stored(
    control: tenancy.Control, tenants: list[tenancy.Tenant], probes: list[int],
    counts: dict[str, Any],
) -> list[dict[str, Any]]:
    """Per tenant: the calls its org stored, beside the requests its key got an answer for
    and those it sent (the readiness probes included). Records reach the call log a moment
    after their responses: wait until each org has at least its answered count."""
    rows = []
    deadline = time.monotonic() + STORED_WAIT_S
    for i, t in enumerate(tenants):
        answered = probes[i] + counts["answered_per_key"][i]
        sent = probes[i] + counts["sent_per_key"][i]
        stored = tenancy.stored_calls(control, t)
        while stored < answered and time.monotonic() < deadline:
            time.sleep(0.5)
            stored = tenancy.stored_calls(control, t)
        rows.append({"tenant": t.name, "org_id": t.org_id, "answered": answered,
                     "sent": sent, "stored": stored})
    return rows


def figures(out: Path) -> dict[str, Any]:
    stats = read_stats(out / "locust_stats.csv")
    counts = json.loads((out / "counts.json").read_text())
    calls = [r for r in stats if r["Type"] in ("GET", "POST")]

    def pct(kind: str, name: str) -> dict[str, Any]:
        r = row(stats, kind, name)
        if r is None:
            return {}
        return {"count": int(r["Request Count"]),
                **{f"p{q}_ms": float(r[f"{q}%"]) for q in (50, 95, 99) if r[f"{q}%"] != "N/A"}}

    return {
        "requests": sum(int(r["Request Count"]) for r in calls),
        # locust's own rate: over the time the users ran.
        "requests_per_s": round(sum(float(r["Requests/s"]) for r in calls), 1),
        "chat": pct("POST", "chat"),
        "chat_stream_headers": pct("POST", "chat stream"),
        "stream_whole": pct("STREAM", "chat stream"),
        "embeddings": pct("POST", "embeddings"),
        "ttft_us": counts["ttft_us"],
        "gap_us": counts["gap_us"],
        "validated": sum(counts["validated"].values()),
        "unknown_key_blocked": counts["unknown_key_blocked"],
        "unknown_key_paced": counts["unknown_key_paced"],
    }


def print_summary(summary: dict[str, Any]) -> None:
    if summary["problems"]:
        print("INVALID run: no figure is given for it.")
        for p in summary["problems"]:
            print(f"  - {p}")
        print(f"reports: {summary['out']}")
        return
    f = summary["figures"]
    spread = (f"{len(summary['tenants'])} tenants" if summary["tenants"]
              else f"{summary['keys']} keys given")
    print(f"shape {summary['shape']}, {summary['users']} users, {summary['duration']}, "
          f"{spread}: {f['requests']} requests, "
          f"{f['requests_per_s']} req/s, 0 failures")
    for name in ("chat", "chat_stream_headers", "stream_whole", "embeddings"):
        p = f[name]
        if p:
            print(f"  {name:<20} p50 {p.get('p50_ms')} ms, p95 {p.get('p95_ms')} ms, "
                  f"p99 {p.get('p99_ms')} ms ({p['count']})")
    for name in ("ttft_us", "gap_us"):
        p = f[name]
        if p:
            print(f"  {name:<20} p50 {p['p50']} µs, p95 {p['p95']} µs, p99 {p['p99']} µs, "
                  f"max {p['max']} µs ({p['count']})")
    print(f"  {f['validated']} sampled responses valid (OpenAI SDK types)")
    if summary["stored"] is None:
        print("  stored calls: not checked (keys from ONETOKEN_API_KEYS, no tenant sessions)")
    else:
        stored = sum(s["stored"] for s in summary["stored"])
        answered = sum(s["answered"] for s in summary["stored"])
        print(f"  {stored} calls stored in call_log across the tenant orgs, for {answered} "
              "answered requests with their keys (readiness probes included)")
    if f["unknown_key_blocked"]:
        print(f"  note: {f['unknown_key_blocked']} unknown-key requests were answered 403 "
              "ip_blocked: this address was blocked by the 401-flood detector")
    print(f"reports: {summary['out']}")


# ---------------------------------------------------------------- the run


def run_locust(args: argparse.Namespace, out: Path, host: str, keys: list[str]) -> int:
    env = {**os.environ, "ONETOKEN_API_KEYS": ",".join(keys)}
    if args.wait:
        env["ONETOKEN_WAIT"] = args.wait
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", host,
        "-u", str(args.users), "-r", str(args.spawn_rate or args.users),
        "-t", args.duration, "--shape", args.shape,
        "--stop-timeout", str(STOP_TIMEOUT_S),
        "--csv", str(out / "locust"), "--html", str(out / "report.html"),
        "--logfile", str(out / "locust.log"),
        "--counts-json", str(out / "counts.json"),
        "--validate-every", str(args.validate_every), "--only-summary",
        "--unknown-keys-per-minute", str(args.unknown_keys_per_minute),
    ]
    log(f"locust: {args.shape}, {args.users} users, {args.duration} against {host}")
    limit = parse_seconds(args.duration) + STOP_TIMEOUT_S + 120
    try:
        return subprocess.run(argv, env=env, timeout=limit, check=False).returncode  # noqa: S603
    except subprocess.TimeoutExpired:
        raise RunError(f"locust did not end within {limit} s") from None


def parse_seconds(span: str) -> int:
    """locust's -t syntax: 90, 90s, 2m, 1h30m."""
    total, num = 0, ""
    for ch in span.strip():
        if ch.isdigit():
            num += ch
        elif ch in "hms" and num:
            total += int(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
        else:
            raise RunError(f"--duration {span!r}: use 90, 90s, 2m or 1h30m")
    return total + (int(num) if num else 0)


@contextlib.contextmanager
def stop_on_signals(local: Local | None) -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        if local is not None:
            local.stop()
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20, help="peak simulated users")
    parser.add_argument("--spawn-rate", type=float, default=0,
                        help="users started per second (default: all in the first second)")
    parser.add_argument("--duration", default="",
                        help="run time, locust's syntax (default: 1m; ramp and spike 2m, "
                        "soak 30m)")
    parser.add_argument("--shape", choices=tuple(DEFAULT_DURATION), default="steady")
    parser.add_argument("--host", default="", help="gateway origin (default: a throwaway "
                        "local deployment)")
    parser.add_argument("--control-url", default=os.environ.get("ONETOKEN_CONTROL_URL", ""),
                        help="control API origin of --host's deployment")
    parser.add_argument("--tenants", type=int, default=4, help="orgs made, one key each")
    parser.add_argument("--out", default="", help="report directory (default "
                        "bench/out/locust-<time>)")
    parser.add_argument("--wait", default="", help='"MIN,MAX" seconds between a user\'s '
                        "requests (default the locustfile's 0.1,1)")
    parser.add_argument("--validate-every", type=int, default=10,
                        help="check one response in N of each kind against the OpenAI SDK")
    parser.add_argument("--unknown-keys-per-minute", type=float, default=50)
    parser.add_argument("--mock-delay-ms", type=int, default=2,
                        help="the local mock's pause before each stream chunk")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be at least 1")
    args.duration = args.duration or DEFAULT_DURATION[args.shape]
    if parse_seconds(args.duration) < 1:
        parser.error("--duration must be at least one second")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else BENCH / "out" / f"locust-{stamp}"
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="onetoken-locust-") as tmp:
        local = None if args.host else Local(Path(tmp))
        control: tenancy.Control | None = None
        made: list[tenancy.Tenant] = []
        try:
            with stop_on_signals(local):
                host, control_url = args.host, args.control_url
                login = os.environ.get("ONETOKEN_ADMIN_LOGIN", "")
                password = os.environ.get("ONETOKEN_ADMIN_PASSWORD", "")
                given = [] if local else [
                    k.strip() for k in os.environ.get("ONETOKEN_API_KEYS", "").split(",")
                    if k.strip()
                ]
                if local is not None:
                    log("starting a local deployment (mock upstream, onetoken serve --demo)")
                    found = start_local(local, args.mock_delay_ms)
                    host, control_url = found["gateway"], found["control"]
                    login, password = found["login"], found["password"]
                probes: list[int] = []
                if not given:
                    if not (control_url and login and password):
                        raise RunError(
                            "with --host, set ONETOKEN_API_KEYS, or --control-url (or "
                            "ONETOKEN_CONTROL_URL) with ONETOKEN_ADMIN_LOGIN and "
                            "ONETOKEN_ADMIN_PASSWORD to make tenants"
                        )
                    control = tenancy.Control(control_url)
                    token = control.login(login, password)
                    made = tenancy.create_tenants(control, token, args.tenants,
                                                  tenancy.run_prefix())
                    log(f"{len(made)} tenants: " + ", ".join(t.name for t in made))
                    probes = tenancy.wait_served(host, made)
                keys = given or [t.key for t in made]
                code = run_locust(args, out, host, keys)
                log(f"locust exited {code}")
                stored = None
                if made and control is not None and (out / "counts.json").exists():
                    counts = json.loads((out / "counts.json").read_text())
                    stored = wait_stored(control, made, probes, counts)
                    log("stored calls counted")
                problems = check_run(out, code, args.validate_every, stored)
                summary: dict[str, Any] = {
                    "shape": args.shape, "users": args.users, "duration": args.duration,
                    "host": host, "out": str(out), "problems": problems, "keys": len(keys),
                    "stored": stored,
                    "tenants": [{"name": t.name, "org_id": t.org_id} for t in made],
                    "figures": None if problems else figures(out),
                }
                (out / "summary.json").write_text(json.dumps(summary, indent=2))
                print_summary(summary)
                return 1 if problems else 0
        except (RunError, tenancy.TenantError) as exc:
            log(f"error: {exc}")
            return 1
        finally:
            if made and control is not None:
                with contextlib.suppress(tenancy.TenantError):
                    tenancy.revoke(control, made)
            if control is not None:
                control.close()
            if local is not None:
                local.stop()


if __name__ == "__main__":
    sys.exit(main())
