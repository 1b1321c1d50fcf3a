#!/usr/bin/env python3
"""Side-by-side benchmark of onetoken against its peers, on this machine, over loopback.

    python bench/run.py [--duration 10] [--quick] [--targets direct,nginx,onetoken,litellm]

Targets, all in front of the same release-mode mock upstream (rust/mock-upstream):
  direct    the mock itself (the baseline every other row is compared with)
  nginx     nginx reverse proxy (keep-alive upstream, proxy_buffering off, workers auto)
  onetoken  `python -m onetoken.cli serve --demo` with the demo provider pointed at the mock
  litellm   LiteLLM proxy, one worker, in its own venv (bench/.venv-litellm)

Workloads: the same load tool for every target (wrk for non-streaming chat, the repo's own
onetoken-loadgen for streams, which measures time to first token and gaps between chunks).
Every load is bounded in time and targets only 127.0.0.1. Results go to bench/RESULTS.md and
the raw numbers to bench/out/. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT_DIR = BENCH / "out"
LUA_SCRIPT = BENCH / "chat.lua"
LITELLM_VENV = BENCH / ".venv-litellm"
# Pinned so two runs months apart measure the same peer; bump deliberately.
BENCH_VENV_PACKAGES = ("litellm[proxy]==1.108.7",)
ALL_TARGETS = ("direct", "nginx", "onetoken", "litellm")
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

CHAT_PROMPT = "Say hello in one short sentence."
# The guard's per-KB cost is measured with a longer prompt: clean English words (no digits,
# so nothing looks like a card, ID or phone number), about 4 KB.
LONG_PROMPT_WORDS = (
    "Please summarise the following notes about the quarterly planning meeting where the "
    "team discussed the roadmap, hiring, the office move and the customer feedback survey. "
)
LONG_PROMPT = (LONG_PROMPT_WORDS * (4096 // len(LONG_PROMPT_WORDS) + 1))[:4096].rstrip()
STREAM_CHUNKS = 8
STREAM_DELAY_MS = 2


class BenchError(Exception):
    """A set-up failure, reported as one line."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and /proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A process this script started (in its own session, so its children go with it)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        # The process group is the one created for this child at start: only our processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


class Services:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Service] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        log_path = self.workdir / f"{name}.log"
        out = log_path.open("wb")
        proc = subprocess.Popen(  # noqa: S603 - argv built here from fixed parts
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        out.close()
        svc = Service(name, proc, log_path)
        self.started.append(svc)
        return svc

    def stop_after_first(self) -> None:
        """Stop everything but the first service (the mock every target shares)."""
        for svc in reversed(self.started[1:]):
            svc.stop()
        del self.started[1:]

    def stop_all(self) -> None:
        for svc in reversed(self.started):
            svc.stop()
        self.started.clear()


def proc_tree(root: int) -> list[int]:
    """`root` and all its descendants (nginx workers, uvicorn children...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pid_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one live process.

    Per-thread schedstat counts nanoseconds; /proc/PID/stat counts clock ticks (10 ms),
    too coarse for a few hundred slow requests, so it is only the fallback.
    """
    ns = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        return ns / 1e9
    except (OSError, IndexError, ValueError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def cpu_seconds(root: int) -> float:
    """User + system CPU time of the live process tree."""
    return sum(pid_cpu_seconds(pid) for pid in proc_tree(root))


def pid_rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


def process_role(pid: int) -> str:
    """What a process of a target's tree is: onetoken's `gateway` child and its `control`
    process by their command, anything else by its program name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if "onetoken.cli" in words or any(w.endswith("/onetoken") for w in words):
        if "gateway" in words:
            return "gateway"
        if "serve" in words or "control" in words:
            return "control"
    return Path(words[0]).name if words else "?"


def by_process(root: int) -> dict[str, dict[str, float]]:
    """Per role in the tree: RSS MB and CPU seconds so far (processes of one role summed)."""
    out: dict[str, dict[str, float]] = {}
    for pid in proc_tree(root):
        entry = out.setdefault(process_role(pid), {"rss_mb": 0.0, "cpu_s": 0.0})
        entry["rss_mb"] += pid_rss_mb(pid)
        entry["cpu_s"] += pid_cpu_seconds(pid)
    return out


def rss_mb(root: int) -> float:
    """Resident memory of the tree, summed (shared pages of forked workers count twice)."""
    return sum(pid_rss_mb(pid) for pid in proc_tree(root))


def http_status(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=body, headers=headers or {})  # noqa: S310 - loopback http
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback http
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def wait_ready(svc: Service, url: str, timeout: float, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive():
            raise BenchError(f"{svc.name} exited during start-up:\n{svc.tail()}")
        if http_status(url) in ok:
            return
        time.sleep(0.2)
    raise BenchError(f"{svc.name} not ready at {url} after {timeout:.0f}s:\n{svc.tail()}")


def run_cmd(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    try:
        res = subprocess.run(  # noqa: S603 - argv built here from fixed parts
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


def version_of(argv: list[str]) -> str:
    try:
        res = subprocess.run(  # noqa: S603 - fixed tool names
            argv, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (res.stdout + res.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


# ---------------------------------------------------------------- set-up of tools


def ensure_debian_tools() -> None:
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if not missing:
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise BenchError(
            f"missing {', '.join(missing)}: install them (Debian: apt-get install -y wrk nginx)"
        )
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_cmd([apt, "update", "-q"], timeout=600, env=env)
    run_cmd([apt, "install", "-y", "-q", *missing], timeout=600, env=env)
    still = [t for t in missing if shutil.which(t) is None]
    if still:
        raise BenchError(f"apt-get did not provide {', '.join(still)}")


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def build_rust_tools() -> tuple[Path, Path]:
    cargo = shutil.which("cargo")
    if cargo is None:
        raise BenchError("cargo not found: the mock upstream is built from rust/mock-upstream")
    log("building the mock upstream and the load generator (release)")
    run_cmd(
        [cargo, "build", "--release", "-q", "-p", "onetoken-mock-upstream", "--bins"],
        timeout=1800,
    )
    release = target_dir() / "release"
    return release / "onetoken-mock-upstream", release / "onetoken-loadgen"


def ensure_bench_venv() -> Path:
    """LiteLLM pins many packages, so it lives in a venv of its own."""
    python = LITELLM_VENV / "bin" / "python"
    litellm = LITELLM_VENV / "bin" / "litellm"
    if litellm.exists():
        return litellm
    log(f"creating {LITELLM_VENV.relative_to(ROOT)} with {', '.join(BENCH_VENV_PACKAGES)}")
    run_cmd([sys.executable, "-m", "venv", str(LITELLM_VENV)], timeout=300)
    run_cmd([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], timeout=600)
    run_cmd([str(python), "-m", "pip", "install", "-q", *BENCH_VENV_PACKAGES], timeout=1800)
    if not litellm.exists():
        raise BenchError("pip finished but bench/.venv-litellm/bin/litellm is missing")
    return litellm


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    base_url: str
    model: str
    pid: int
    api_key: str = ""
    version: str = ""
    idle_rss_mb: float = 0.0
    # Idle RSS MB per process role (onetoken: control and gateway).
    idle_rss_by_process: dict[str, float] = field(default_factory=dict)
    note: str = ""
    short_run: bool = False
    # Variant rows (same server, other configuration): the wrk body when not the default
    # small chat, the row the "added" figures subtract, and what the row measures.
    body: str = ""
    baseline: str = "direct"
    what: str = ""
    control_url: str = ""
    admin_email: str = ""
    admin_password: str = ""
    org_id: str = ""


def start_mock(services: Services, mock_bin: Path) -> Target:
    port = free_port()
    svc = services.start("mock", [str(mock_bin), "--listen", f"{HOST}:{port}"])
    wait_ready(svc, f"http://{HOST}:{port}/healthz", 15)
    return Target("direct", f"http://{HOST}:{port}", "mock-gpt", svc.proc.pid, version="mock")


NGINX_CONF = """\
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/client_body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  client_body_buffer_size 1m;
  upstream mock {{
    server {upstream};
    keepalive 128;
  }}
  server {{
    listen {listen} reuseport;
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


def start_nginx(services: Services, workdir: Path, upstream: str) -> Target:
    nginx = shutil.which("nginx")
    if nginx is None:
        raise BenchError("nginx not found")
    prefix = workdir / "nginx"
    prefix.mkdir()
    prefix.chmod(0o755)  # workers drop to an unprivileged user when started as root
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, upstream=upstream, listen=f"{HOST}:{port}"))
    svc = services.start("nginx", [nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"])
    wait_ready(svc, f"http://{HOST}:{port}/healthz", 15)
    return Target(
        "nginx",
        f"http://{HOST}:{port}",
        "mock-gpt",
        svc.proc.pid,
        version=version_of([nginx, "-v"]).replace("nginx version: ", ""),
    )


def onetoken_python(explicit: str | None) -> str | None:
    """The interpreter that can import onetoken (and its extension), or None."""
    default = [sys.executable, str(ROOT / ".venv" / "bin" / "python")]
    candidates = [explicit] if explicit else default
    for py in candidates:
        if py and Path(py).exists():
            res = subprocess.run(  # noqa: S603 - interpreter path checked above
                [py, "-c", "import onetoken.cli, onetoken._core"],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if res.returncode == 0:
                return py
    return None


def start_onetoken(
    services: Services,
    workdir: Path,
    upstream: str,
    python: str,
    *,
    name: str = "onetoken",
    extra_env: dict[str, str] | None = None,
) -> Target:
    data_dir = workdir / f"{name}-data"
    gw_port, ctl_port = free_port(), free_port()
    env = {
        **os.environ,
        "ONETOKEN_DATA_DIR": str(data_dir),
        "ONETOKEN_GATEWAY_LISTEN": f"{HOST}:{gw_port}",
        "ONETOKEN_CONTROL_LISTEN": f"{HOST}:{ctl_port}",
        "ONETOKEN_DEMO_UPSTREAM": upstream,
        "ONETOKEN_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    boot_info: dict[str, Any] = {}
    try:
        boot = run_cmd([python, "-m", "onetoken.cli", "bootstrap", "--json"], 300, env=env)
        boot_info = json.loads(boot.strip().splitlines()[-1])
        api_key = str(boot_info.get("api_key") or "")
    except (BenchError, ValueError, IndexError, AttributeError) as exc:
        # `serve --demo` prints a key of its own; try that before giving up.
        log(f"onetoken: bootstrap --json failed ({str(exc).splitlines()[0][:200]})")
        api_key = ""
    svc = services.start(name, [python, "-m", "onetoken.cli", "serve", "--demo"], env=env)
    base = f"http://{HOST}:{gw_port}"
    wait_ready(svc, f"{base}/healthz", 180)
    body = json.dumps(
        {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()
    url = f"{base}/v1/chat/completions"

    def works(key: str) -> bool:
        hdrs = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return bool(key) and http_status(url, body, hdrs) == 200

    if not works(api_key):
        # Fall back to the demo session key that `serve --demo` prints.
        match = re.search(r"^api_key: (\S+)$", svc.tail(200), re.MULTILINE)
        api_key = match.group(1) if match else ""
        if not works(api_key):
            raise BenchError(f"onetoken does not answer a demo-chat request:\n{svc.tail()}")
    version = version_of([python, "-c", "import onetoken; print(onetoken.__version__)"])
    profile = extension_profile(python)
    note = ""
    if profile != "release":
        note = (
            f"the onetoken extension is a {profile} build: its numbers are not representative "
            "(`make bench` installs a release build first)"
        )
    target = Target(
        name,
        base,
        "demo-chat",
        svc.proc.pid,
        api_key=api_key,
        version=f"{version} ({profile} build)",
        note=note,
        control_url=f"http://{HOST}:{ctl_port}",
        admin_email=str(boot_info.get("admin_email") or ""),
        admin_password=str(boot_info.get("admin_password") or ""),
        org_id=str(boot_info.get("org_id") or ""),
    )
    # The demo credit covers a demo, not millions of requests: without a top-up the later
    # rows would measure 402s.
    Control(target).call(
        "POST",
        "/billing/credits",
        {"amount": "100000000", "kind": "adjustment", "idempotency_key": "bench-top-up"},
    )
    return target


def extension_profile(python: str) -> str:
    """ "release" or "debug": which cargo profile produced the installed onetoken._core
    (maturin copies target/<profile>/lib_core.so into the package), else "unknown"."""
    try:
        installed = Path(
            run_cmd([python, "-c", "import onetoken._core as c; print(c.__file__)"], 60).strip()
        )
        data = installed.read_bytes()
    except (BenchError, OSError):
        return "unknown"
    for profile in ("release", "debug"):
        built = target_dir() / profile / "lib_core.so"
        with contextlib.suppress(OSError):
            if built.stat().st_size == len(data) and built.read_bytes() == data:
                return profile
    return "unknown"


LITELLM_CONFIG = """\
model_list:
  - model_name: mock-gpt
    litellm_params:
      model: openai/mock-gpt
      api_base: http://{upstream}/v1
      api_key: sk-bench-not-checked
litellm_settings:
  telemetry: false
  set_verbose: false
"""


def start_litellm(services: Services, workdir: Path, upstream: str) -> Target:
    litellm = ensure_bench_venv()
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(LITELLM_CONFIG.format(upstream=upstream))
    master_key = f"sk-bench-{secrets.token_hex(16)}"
    env = {
        **os.environ,
        # No outbound fetches: the model cost map ships inside the package.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        # LiteLLM refuses to start without one; requests then authenticate with it, as
        # onetoken's do with their API key.
        "LITELLM_MASTER_KEY": master_key,
    }
    env.pop("DATABASE_URL", None)
    argv = [str(litellm), "--config", str(cfg), "--host", HOST, "--port", str(port)]
    svc = services.start("litellm", [*argv, "--num_workers", "1"], env=env)
    base = f"http://{HOST}:{port}"
    wait_ready(svc, f"{base}/health/liveliness", 180)
    py = str(LITELLM_VENV / "bin" / "python")
    version = version_of([py, "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
    return Target(
        "litellm",
        base,
        "mock-gpt",
        svc.proc.pid,
        api_key=master_key,
        version=version,
        short_run=True,
    )


# ---------------------------------------------------------------- variant rows


def wrk_body(model: str, prompt: str = CHAT_PROMPT) -> str:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16},
        separators=(",", ":"),
    )


def variant(t: Target, name: str, what: str, model: str | None = None, **kw: Any) -> Target:
    """A row measured on the running target `t` with another model, body or setting."""
    v = Target(name, t.base_url, model or t.model, t.pid, api_key=t.api_key, version=t.version)
    v.what = what
    for k, val in kw.items():
        setattr(v, k, val)
    return v


class Control:
    """The onetoken control API, as the bootstrap admin (the platform operator)."""

    def __init__(self, t: Target) -> None:
        if not (t.admin_email and t.admin_password and t.org_id):
            raise BenchError("no bootstrap admin credentials (bootstrap --json gave none)")
        self.base = f"{t.control_url}/api/v1"
        self.token = ""
        login = self.call(
            "POST", "/auth/login", {"email": t.admin_email, "password": t.admin_password}
        )
        self.token = str(login.get("access_token") or "")
        if not self.token:
            raise BenchError("control API login returned no access_token")
        # The operator running the bench accepts the current terms of service, as at a
        # first console sign-in; until then the control API answers 403 (docs/terms.md).
        terms = self.call("GET", "/me/terms")
        if terms.get("accepted_at") is None:
            self.call("POST", "/me/terms/accept", {"version": terms.get("version")})

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - loopback http
            self.base + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback http
                text = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise BenchError(f"control API {method} {path}: {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BenchError(f"control API {method} {path}: {exc}") from None
        return json.loads(text) if text.strip() else {}

    def provider(self, name: str, protocol: str, base_url: str) -> str:
        body = {"name": name, "scope": "platform", "protocol": protocol, "base_url": base_url}
        return str(self.call("POST", "/providers", body)["id"])

    def model(self, name: str, provider_id: str, upstream: str, priority: int = 0) -> None:
        body = {
            "name": name,
            "provider_id": provider_id,
            "upstream_model": upstream,
            "input_price": "0.5",
            "output_price": "1.5",
            "priority": priority,
        }
        self.call("POST", "/models", body)


def wait_serves(t: Target, timeout: float = 20) -> None:
    """The gateway applies control changes asynchronously at worst: wait for a 200."""
    url = f"{t.base_url}/v1/chat/completions"
    body = (t.body or wrk_body(t.model)).encode()
    hdrs = {"Authorization": f"Bearer {t.api_key}", "Content-Type": "application/json"}
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        status = http_status(url, body, hdrs)
        if status == 200:
            return
        time.sleep(0.2)
    raise BenchError(f"{t.name}: model {t.model} does not answer 200 (last status {status})")


@dataclass
class VariantStep:
    """Configure (through the control API), then measure `rows` on the same server."""

    setup: Callable[[], None]
    rows: list[Target]


def onetoken_variants(t: Target, mock_upstream: str) -> list[VariantStep]:
    """Issue 5's rows: routing with a fallback configured, the guard on, translation on.
    Each uses its own public model name; the guard is org-wide, so its rows come last (the
    server, with its temporary data dir, is stopped right after them)."""
    ctl = Control(t)
    openai_base = f"http://{mock_upstream}/v1"
    long_body = wrk_body(t.model, LONG_PROMPT)
    kb = len(LONG_PROMPT.encode()) / 1024

    def fallback() -> None:
        primary = ctl.provider("bench-primary", "openai", openai_base)
        secondary = ctl.provider("bench-secondary", "openai", openai_base)
        ctl.model("bench-fallback", primary, "mock-gpt", priority=0)
        ctl.model("bench-fallback", secondary, "mock-gpt", priority=1)
        ctl.call(
            "POST",
            "/routes",
            {"name": "bench-fallback", "scope": "platform", "strategy": "priority"},
        )

    def translation() -> None:
        anthropic = ctl.provider("bench-anthropic", "anthropic", openai_base)
        ctl.model("bench-translated", anthropic, "mock-claude")

    def guard_on() -> None:
        ctl.call("PUT", f"/orgs/{t.org_id}/guard", {"mode": "flag", "categories": None})

    long_what = f"`onetoken` with a {kb:.0f} KB prompt (guard off): the guard rows' baseline"
    return [
        VariantStep(
            fallback,
            [
                variant(
                    t,
                    "onetoken+fallback",
                    "model served by a `priority` route over two deployments (primary and "
                    "secondary providers, both the mock); every request served by the primary",
                    model="bench-fallback",
                )
            ],
        ),
        VariantStep(
            translation,
            [
                variant(
                    t,
                    "onetoken+translation",
                    "model served by an `anthropic`-protocol provider (the mock's "
                    "/v1/messages): OpenAI chat translated to Anthropic Messages and back",
                    model="bench-translated",
                )
            ],
        ),
        VariantStep(
            lambda: None,
            [variant(t, "onetoken+4k", long_what, body=long_body, baseline="direct+4k")],
        ),
        VariantStep(
            guard_on,
            [
                variant(
                    t,
                    "onetoken+guard",
                    "org guard in `flag` mode, every category (clean prompt, nothing flagged)",
                ),
                variant(
                    t,
                    "onetoken+guard+4k",
                    f"the guard as above, {kb:.0f} KB clean prompt",
                    body=long_body,
                    baseline="direct+4k",
                ),
            ],
        ),
    ]


def direct_variants(t: Target) -> list[Target]:
    kb = len(LONG_PROMPT.encode()) / 1024
    return [
        variant(
            t,
            "direct+4k",
            f"the mock with the {kb:.0f} KB prompt: baseline of the 4 KB rows",
            body=wrk_body(t.model, LONG_PROMPT),
        )
    ]


# ---------------------------------------------------------------- workloads


@dataclass
class Workload:
    key: str
    title: str
    connections: int
    tool: str  # "wrk" or "loadgen"
    stream_body: dict[str, Any] | None = None


def stream_body(model: str, delay_ms: int) -> dict[str, Any]:
    return {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 16,
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "mock": {"chunks": STREAM_CHUNKS, "delay_ms": delay_ms},
    }


WORKLOADS = (
    Workload("chat_32c", "Non-streaming chat, 32 connections (throughput)", 32, "wrk"),
    Workload("chat_1c", "Non-streaming chat, 1 connection (added latency)", 1, "wrk"),
    Workload(
        "stream_1c",
        f"Streaming chat, {STREAM_CHUNKS} chunks {STREAM_DELAY_MS} ms apart, 1 connection "
        "(time to first token, per-chunk gap)",
        1,
        "loadgen",
        {"delay_ms": STREAM_DELAY_MS},
    ),
    Workload(
        "stream_32c",
        f"Streaming chat, {STREAM_CHUNKS} chunks unpaced, 32 connections (stream throughput)",
        32,
        "loadgen",
        {"delay_ms": 0},
    ),
)


def run_wrk(t: Target, w: Workload, seconds: int) -> dict[str, Any]:
    env = {**os.environ, "BENCH_MODEL": t.model, "BENCH_API_KEY": t.api_key}
    if t.body:
        env["BENCH_BODY"] = t.body
    threads = min(2, w.connections)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{w.connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        t.base_url,
    ]
    out = run_cmd(argv, timeout=seconds + 60, env=env)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise BenchError(f"wrk printed no summary:\n{out[-2000:]}")
    raw = json.loads(line[len("WRK_JSON ") :])
    secs = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in raw if k.startswith("errors_"))
    return {
        "requests": raw["requests"],
        "errors": errors,
        "rps": raw["requests"] / secs if secs else 0.0,
        "p50_us": raw["p50_us"],
        "p90_us": raw["p90_us"],
        "p99_us": raw["p99_us"],
        "mean_us": raw["lat_mean_us"],
    }


def run_loadgen(loadgen: Path, t: Target, w: Workload, seconds: int) -> dict[str, Any]:
    body = stream_body(t.model, int((w.stream_body or {}).get("delay_ms", 0)))
    argv = [
        str(loadgen),
        "--url",
        f"{t.base_url}/v1/chat/completions",
        "--body",
        json.dumps(body),
        "--connections",
        str(w.connections),
        "--duration",
        str(seconds),
        "--warmup",
        "0.5",
        "--threads",
        "2" if w.connections > 1 else "1",
    ]
    if t.api_key:
        argv += ["--header", f"Authorization: Bearer {t.api_key}"]
    raw = json.loads(run_cmd(argv, timeout=seconds + 60).strip().splitlines()[-1])

    def pct(name: str, p: str) -> float | None:
        s = raw.get(name)
        return float(s[p]) if s else None

    return {
        "requests": raw["requests"],
        "errors": raw["errors"] + raw["non_2xx"],
        "rps": raw["rps"],
        "events_per_stream": raw["events_per_response"],
        "ttft_p50_us": pct("first_event_us", "p50"),
        "ttft_p99_us": pct("first_event_us", "p99"),
        "gap_p50_us": pct("event_gap_us", "p50"),
        "gap_p99_us": pct("event_gap_us", "p99"),
        "total_p50_us": pct("total_us", "p50"),
        "total_p99_us": pct("total_us", "p99"),
        "headers_p50_us": pct("headers_us", "p50"),
    }


# Open idle streams held at once to measure the gateway's memory per stream. Each one holds
# a client and an upstream socket in the gateway, so the open-files hard limit (20,000 per
# process on the reference machine) may cap the count: the report says how many were open.
IDLE_STREAMS = 10_000
IDLE_STREAM_HOLD_S = 3.0


def idle_streams(t: Target, wanted: int) -> dict[str, Any]:
    """Memory per open idle stream: RSS of the gateway process with `wanted` streams open
    (each waiting for a chunk the mock sends only after a long pause) minus before.

    Checks its own output: every stream must have answered 200 with an SSE content type
    before the figure counts; otherwise the measurement is refused."""
    import asyncio
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(wanted, max(0, (hard - 1_000) // 2))
    pids = [p for p in proc_tree(t.pid) if process_role(p) == "gateway"] or [t.pid]
    gateway = pids[0]
    host, port = t.base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(
        {
            "model": t.model,
            "stream": True,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": CHAT_PROMPT}],
            "mock": {"chunks": 2, "delay_ms": 60_000},
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {t.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def open_one(
        sem: asyncio.Semaphore,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(request)
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                return None
            text = head.decode("latin-1").lower()
            if not text.startswith("http/1.1 200") or "text/event-stream" not in text:
                writer.close()
                return None
            return reader, writer

    async def run() -> dict[str, Any]:
        before = pid_rss_mb(gateway)
        sem = asyncio.Semaphore(256)
        opened = await asyncio.gather(*(open_one(sem) for _ in range(count)))
        ok = [c for c in opened if c is not None]
        await asyncio.sleep(IDLE_STREAM_HOLD_S)
        during = pid_rss_mb(gateway)
        for _, writer in ok:
            writer.close()
        return {
            "wanted": wanted,
            "opened": len(ok),
            "tried": count,
            "rss_before_mb": before,
            "rss_open_mb": during,
        }

    result = asyncio.run(run())
    if result["opened"] != count:
        raise BenchError(
            f"only {result['opened']} of {count} idle streams answered 200 text/event-stream"
        )
    result["kb_per_stream"] = (
        (result["rss_open_mb"] - result["rss_before_mb"]) * 1024 / result["opened"]
    )
    log(
        f"onetoken: {result['opened']} idle streams: gateway RSS {result['rss_before_mb']:.1f} "
        f"→ {result['rss_open_mb']:.1f} MB, {result['kb_per_stream']:.1f} KB per stream"
    )
    return result


_PHASE_LINE = re.compile(r'^onetoken_phase_cpu_seconds_total\{phase="([a-z_]+)"\} ([0-9.eE+-]+)$')


def phase_seconds(metrics_url: str) -> dict[str, float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if m := _PHASE_LINE.match(line):
            out[m[1]] = float(m[2])
    return out


def phase_profile(
    services: Services,
    workdir: Path,
    upstream: str,
    python: str,
    seconds: int,
    warmup: int,
    loadgen: Path,
) -> dict[str, Any]:
    """CPU µs per request split by phase: a second onetoken with the gateway's phase
    timing on (it costs CPU of its own, so the headline rows run without it), the
    non-streaming 32-connection workload, the counters' growth over the requests served."""
    metrics_port = free_port()
    t = start_onetoken(
        services,
        workdir,
        upstream,
        python,
        name="onetoken-phases",
        extra_env={
            "ONETOKEN_GATEWAY_PHASE_TIMING": "1",
            "ONETOKEN_METRICS_LISTEN": f"{HOST}:{metrics_port}",
        },
    )
    metrics_url = f"http://{HOST}:{metrics_port}/metrics"
    warm_up(t, warmup)
    before = phase_seconds(metrics_url)
    row = measure(t, WORKLOADS[0], seconds, loadgen)
    after = phase_seconds(metrics_url)
    if not after or row["errors"] or not row["requests"]:
        raise BenchError(
            f"phase profile not usable: {len(after)} phase counters, {row['errors']} errors"
        )
    n = row["requests"]
    phases = {p: (v - before.get(p, 0.0)) * 1e6 / n for p, v in after.items()}
    return {"phases": phases, "row": row}


# ---------------------------------------------------------------- tracing rows

# The tracing rows: onetoken exporting traces over OTLP at each sampling ratio, against
# the `onetoken` row (tracing off).
OTLP_ROWS = (("onetoken+otlp1%", 0.01), ("onetoken+otlp100%", 1.0))
OTLP_EXPORT_INTERVAL_MS = 200


class OtlpSink:
    """A local OTLP/HTTP receiver for the tracing rows: it accepts every export and counts
    the spans received without decoding them, so it takes little of the cores the gateway
    is measured on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/v1/traces":
                    # The gateway's OTLP/JSON: one spanId per span.
                    sink.received(body.count(b'"spanId"'))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    @property
    def spans(self) -> int:
        with self._lock:
            return self._spans

    def received(self, n: int) -> None:
        with self._lock:
            self._spans += n

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def require_spans(sink: OtlpSink, timeout: float) -> int:
    """The spans `sink` received, once at least one has (waiting up to `timeout` for the
    exporter's next round): a tracing row whose gateway exported nothing measured tracing
    off, so it is refused rather than reported."""
    deadline = time.monotonic() + timeout
    while sink.spans == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if sink.spans == 0:
        raise BenchError(f"no span reached the OTLP sink within {timeout:.0f} s")
    return sink.spans


def otlp_rows(
    services: Services,
    workdir: Path,
    upstream: str,
    python: str,
    seconds: int,
    warmup: int,
    loadgen: Path,
    rows: dict[tuple[str, str], dict[str, Any]],
    variants: list[Target],
    meta: dict[str, Any],
) -> None:
    """Each tracing row: a onetoken exporting to a sink of its own, the non-streaming
    workloads, and its figures kept only when the sink received at least one span."""
    for name, ratio in OTLP_ROWS:
        sink = OtlpSink()
        try:
            log(f"{name}: starting")
            t = start_onetoken(
                services,
                workdir,
                upstream,
                python,
                name=name,
                extra_env={
                    "ONETOKEN_OTEL_ENDPOINT": sink.url,
                    "ONETOKEN_OTEL_RATIO": str(ratio),
                    "ONETOKEN_OTEL_EXPORT_INTERVAL_MS": str(OTLP_EXPORT_INTERVAL_MS),
                },
            )
            t.baseline = "onetoken"
            t.what = (
                f"`onetoken` tracing {ratio:.0%} of requests, exported over OTLP/HTTP to a "
                "local sink (docs/observability.md)"
            )
            warm_up(t, warmup)
            measured = {}
            for w in WORKLOADS[:2]:
                log(f"{name}: {w.key} for {seconds} s")
                measured[(name, w.key)] = measure(t, w, seconds, loadgen)
            spans = require_spans(sink, timeout=10 * OTLP_EXPORT_INTERVAL_MS / 1000)
            for r in measured.values():
                r["otlp_spans_exported"] = spans
            rows.update(measured)
            variants.append(t)
            log(f"{name}: {spans:,} spans exported")
        except BenchError as exc:
            meta["errors"].append(f"{name}: {exc}")
            log(f"{name}: failed: {exc}")
        finally:
            services.stop_after_first()
            sink.close()


def measure(t: Target, w: Workload, seconds: int, loadgen: Path) -> dict[str, Any]:
    procs0 = by_process(t.pid)
    if w.tool == "wrk":
        data = run_wrk(t, w, seconds)
    else:
        data = run_loadgen(loadgen, t, w, seconds)
    procs1 = by_process(t.pid)
    total = data["requests"] + data["errors"]
    per_role = {
        role: (v["cpu_s"] - procs0.get(role, {}).get("cpu_s", 0.0)) * 1e6 / total
        for role, v in procs1.items()
        if total
    }
    data["cpu_us_per_req"] = sum(per_role.values()) if total else None
    data["cpu_us_per_req_by_process"] = per_role
    data["rss_mb_by_process"] = {role: v["rss_mb"] for role, v in procs1.items()}
    data["rss_mb"] = rss_mb(t.pid)
    data["seconds"] = seconds
    return data


def run_variants(
    steps: list[VariantStep],
    seconds: int,
    warmup: int,
    loadgen: Path,
    rows: dict[tuple[str, str], dict[str, Any]],
    variants: list[Target],
    meta: dict[str, Any],
) -> None:
    """Configure each step, then run the non-streaming workloads (wrk) on its rows."""
    for step in steps:
        names = ", ".join(v.name for v in step.rows)
        try:
            step.setup()
            for v in step.rows:
                wait_serves(v)
        except BenchError as exc:
            meta["errors"].append(f"{names}: set-up failed: {exc}")
            log(f"{names}: set-up failed: {exc}")
            continue
        for v in step.rows:
            variants.append(v)
            warm_up(v, warmup)
            for w in WORKLOADS[:2]:
                log(f"{v.name}: {w.key} for {seconds} s")
                try:
                    rows[(v.name, w.key)] = r = measure(v, w, seconds, loadgen)
                except BenchError as exc:
                    meta["errors"].append(f"{v.name} {w.key}: {exc}")
                    log(f"{v.name}: {w.key} failed: {exc}")
                    continue
                log(
                    f"{v.name}: {w.key}: {r['rps']:,.0f} req/s, errors {r['errors']}, "
                    f"cpu/req {fmt(r['cpu_us_per_req'], 1)} µs"
                )


def warm_up(t: Target, seconds: int) -> None:
    """Fill connection pools, JIT-less caches and allocator arenas before measuring."""
    run_wrk(t, WORKLOADS[0], seconds)


# ---------------------------------------------------------------- report


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
    }


def loadavg() -> str:
    """1, 5 and 15 minute load averages: anything well above 0 means the run had company."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def git_sha() -> str:
    try:
        sha = run_cmd(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], 30).strip()
    except BenchError:
        return "none (no commit yet)"
    dirty = run_cmd(["git", "-C", str(ROOT), "status", "--porcelain"], 30).strip()
    return f"{sha}{' + uncommitted changes' if dirty else ''}"


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def diff(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    return f"{a - b:+,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def write_report(
    path: Path,
    meta: dict[str, Any],
    targets: list[Target],
    rows: dict[tuple[str, str], dict[str, Any]],
    skipped: dict[str, str],
    variants: list[Target] | None = None,
    extras: dict[str, Any] | None = None,
) -> None:
    variants = variants or []
    extras = extras or {}
    # Each target's variant rows (same server, another configuration) follow it.
    names = []
    for t in targets:
        names.append(t.name)
        names += [v.name for v in variants if v.name.startswith(t.name + "+")]
    baseline = {v.name: v.baseline for v in variants}
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}. Compare rows within one run only:",
        "absolute figures drift between runs and machines (DESIGN.md section 7).",
        "",
        "## Machine and software",
        "",
        f"- machine: {meta['machine']['nproc']} CPUs ({meta['machine']['cpu']}), "
        f"{meta['machine']['memory']} RAM, Linux {meta['machine']['kernel']}",
        f"- git: {meta['git']}",
        f"- load tools: {meta['versions']['wrk']}; onetoken-loadgen (rust/mock-upstream)",
        "- upstream: onetoken-mock-upstream (release build), default 8 tokens per reply",
        f"- rustc: {meta['versions']['rustc']}; python: {meta['versions']['python']}",
        f"- run: {meta['seconds']} s per row ({meta['litellm_seconds']} s for LiteLLM), "
        f"{meta['warmup']} s warm-up per target, everything on 127.0.0.1 on the same cores",
        f"- load average before / after the run: {meta['loadavg_start']} / "
        f"{meta['loadavg_end']} (other work on the machine skews every row)",
        "",
        "| target | what runs | version | idle RSS MB |",
        "|---|---|---|---|",
    ]
    what = {
        "direct": "the mock upstream itself (baseline)",
        "nginx": "nginx reverse proxy, keep-alive upstream, proxy_buffering off, workers auto",
        "onetoken": "`onetoken serve --demo`: full pipeline (auth, limits, routing, "
        "reserve/settle, token counting, metadata records into embedded chDB)",
        "litellm": "LiteLLM proxy, 1 worker, openai-compatible provider",
    }
    for t in targets:
        lines.append(f"| {t.name} | {what[t.name]} | {t.version} | {fmt(t.idle_rss_mb, 1)} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} | - | - |")
    lines.append("")
    for t in targets:
        if t.note:
            lines += [f"**Note ({t.name}):** {t.note}.", ""]
    if variants:
        lines += [
            "Variant rows (non-streaming workloads only), each on the running target's process "
            "with another configuration made through its API, or another request body:",
            "",
            "| row | what |",
            "|---|---|",
        ]
        lines += [f"| {v.name} | {v.what} |" for v in variants]
        lines.append("")

    def get(target: str, wl: str) -> dict[str, Any]:
        return rows.get((target, wl), {})

    def table(
        w: Workload, intro: str, columns: list[str], cells: Callable[[str, dict[str, Any]], str]
    ) -> list[str]:
        """A workload's section: a row per target (or variant) that ran it."""
        out = [f"## {w.title}", "", intro, "", "| " + " | ".join(["target", *columns]) + " |"]
        out.append("|---|" + "---:|" * len(columns))
        out += [f"| {n} | {cells(n, r)} |" for n in names if (r := get(n, w.key))]
        return [*out, ""]

    w = WORKLOADS[0]  # non-streaming throughput
    nginx_rps = get("nginx", w.key).get("rps")
    lines += table(
        w,
        "wrk, 2 threads, `bench/chat.lua`. CPU and RSS are the target's own processes "
        "(for `direct`, the mock's).",
        ["req/s", "x nginx", "p50 µs", "p99 µs", "errors", "CPU µs/req", "RSS MB"],
        lambda _, r: f"{fmt(r['rps'])} | {ratio(r['rps'], nginx_rps)} | {fmt(r['p50_us'])} | "
        f"{fmt(r['p99_us'])} | {fmt(r['errors'])} | {fmt(r['cpu_us_per_req'], 1)} | "
        f"{fmt(r['rss_mb'], 1)}",
    )

    w = WORKLOADS[1]  # non-streaming latency at one connection

    def latency(n: str, r: dict[str, Any]) -> str:
        base = get(baseline.get(n, "direct"), WORKLOADS[1].key)
        return (
            f"{fmt(r['rps'])} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | "
            f"{diff(r['p50_us'], base.get('p50_us'))} | "
            f"{diff(r['p99_us'], base.get('p99_us'))} | {fmt(r['cpu_us_per_req'], 1)}"
        )

    lines += table(
        w,
        "wrk, 1 thread, 1 connection. Added = this row minus `direct` in the same run "
        "(the 4 KB rows: minus `direct+4k`).",
        ["req/s", "p50 µs", "p99 µs", "added p50 µs", "added p99 µs", "CPU µs/req"],
        latency,
    )

    w = WORKLOADS[2]  # paced stream at one connection
    paced = get("direct", w.key)
    lines += table(
        w,
        "onetoken-loadgen, 1 connection; the mock pauses before each chunk, so a proxy that "
        "buffered would show a time to first token near the total. TTFT = request sent to "
        "first complete SSE event; gap = between consecutive events.",
        ["streams/s", "TTFT p50 µs", "TTFT p99 µs", "added TTFT p50 µs", "gap p50 µs",
         "gap p99 µs", "added gap p50 µs", "total p50 µs", "events/stream"],
        lambda _, r: f"{fmt(r['rps'], 1)} | {fmt(r['ttft_p50_us'])} | {fmt(r['ttft_p99_us'])} | "
        f"{diff(r['ttft_p50_us'], paced.get('ttft_p50_us'))} | {fmt(r['gap_p50_us'])} | "
        f"{fmt(r['gap_p99_us'])} | {diff(r['gap_p50_us'], paced.get('gap_p50_us'))} | "
        f"{fmt(r['total_p50_us'])} | {fmt(r['events_per_stream'], 1)}",
    )

    w = WORKLOADS[3]  # unpaced streams at 32 connections
    nginx_streams = get("nginx", w.key).get("rps")
    lines += table(
        w,
        "onetoken-loadgen, 32 connections, 2 threads.",
        ["streams/s", "x nginx", "TTFT p50 µs", "TTFT p99 µs", "total p50 µs", "total p99 µs",
         "errors", "CPU µs/stream", "RSS MB"],
        lambda _, r: f"{fmt(r['rps'])} | {ratio(r['rps'], nginx_streams)} | "
        f"{fmt(r['ttft_p50_us'])} | {fmt(r['ttft_p99_us'])} | {fmt(r['total_p50_us'])} | "
        f"{fmt(r['total_p99_us'])} | {fmt(r['errors'])} | "
        f"{fmt(r['cpu_us_per_req'], 1)} | {fmt(r['rss_mb'], 1)}",
    )

    lines += onetoken_processes(rows, targets, extras)
    lines += guard_cost(rows)
    lines += targets_check(rows, targets, extras)
    if meta.get("errors"):
        lines += ["## Problems during the run", ""]
        lines += [f"- {e}" for e in meta["errors"]]
        lines.append("")
    lines += kept_sections(path)
    path.write_text("\n".join(lines))


# Sections other scripts write into the same report (bench/scale.py): a new run of this
# one replaces its own tables and keeps theirs.
KEPT_SECTIONS = ("## Many gateways",)


def kept_sections(path: Path) -> list[str]:
    try:
        old = path.read_text().split("\n")
    except OSError:
        return []
    out: list[str] = []
    keeping = False
    for line in old:
        if line.startswith("## "):
            keeping = line in KEPT_SECTIONS
        if keeping:
            out.append(line)
    return out


def onetoken_processes(
    rows: dict[tuple[str, str], dict[str, Any]], targets: list[Target], extras: dict[str, Any]
) -> list[str]:
    """onetoken's processes apart: idle RSS and CPU per request of each, memory per idle
    stream, and the gateway's CPU per request split by phase."""
    ot = next((t for t in targets if t.name == "onetoken"), None)
    if ot is None:
        return []
    roles = sorted(ot.idle_rss_by_process)
    out = [
        "## onetoken by process",
        "",
        "`serve --demo` runs the control process (control API, ingestion into chDB and the "
        "ledger) and one gateway child. CPU µs per request of each process over the same "
        "rows as above; the totals above are their sum.",
        "",
        "| measure | " + " | ".join(roles) + " |",
        "|---|" + "---:|" * len(roles),
        "| idle RSS MB | " + " | ".join(fmt(ot.idle_rss_by_process[r], 1) for r in roles) + " |",
    ]
    for w in WORKLOADS:
        r = rows.get(("onetoken", w.key), {})
        by = r.get("cpu_us_per_req_by_process") or {}
        if by:
            out.append(
                f"| CPU µs/req, {w.key} | " + " | ".join(fmt(by.get(x), 1) for x in roles) + " |"
            )
        rss = r.get("rss_mb_by_process") or {}
        if rss and w.key == "chat_32c":
            out.append(
                f"| RSS MB after {w.key} | " + " | ".join(fmt(rss.get(x), 1) for x in roles) + " |"
            )
    out.append("")
    streams = extras.get("idle_streams")
    if streams:
        out += [
            "### Open idle streams",
            "",
            f"{streams['opened']:,} streams open at once (each answered 200 text/event-stream and "
            "then waits for a chunk the mock sends only after 60 s), held "
            f"{IDLE_STREAM_HOLD_S:.0f} s. Each holds a client and an upstream socket in the "
            "gateway, so the open-files hard limit caps the count below "
            f"{streams['wanted']:,} when it is under twice that.",
            "",
            "| gateway RSS before MB | with streams open MB | KB per stream |",
            "|---:|---:|---:|",
            f"| {fmt(streams['rss_before_mb'], 1)} | {fmt(streams['rss_open_mb'], 1)} | "
            f"{fmt(streams['kb_per_stream'], 1)} |",
            "",
        ]
    prof = extras.get("phases")
    if prof:
        phases = prof["phases"]
        # In request order: the engine's /metrics lists the phases so, and the profile
        # keeps the order it read them in.
        names = list(phases)
        gw = (prof["row"].get("cpu_us_per_req_by_process") or {}).get("gateway")
        total = sum(phases.values())
        out += [
            "### Gateway CPU per request by phase",
            "",
            "A second onetoken with `ONETOKEN_GATEWAY_PHASE_TIMING=1` (the thread CPU clock "
            "around each phase; it adds CPU of its own, so the rows above run without it), "
            f"non-streaming chat at 32 connections, {fmt(prof['row']['rps'])} req/s. "
            "'outside phases' is the gateway process's CPU per request minus the phases: "
            "hyper's connection handling, socket reads and writes, the runtime.",
            "",
            "| " + " | ".join(names) + " | phases | outside phases | gateway total |",
            "|" + "---:|" * (len(names) + 3),
            "| " + " | ".join(fmt(phases[p], 2) for p in names) + f" | {fmt(total, 1)} | "
            f"{fmt(gw - total if gw is not None else None, 1)} | {fmt(gw, 1)} |",
            "",
        ]
    return out


def guard_cost(rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """What the guard adds, from the rows with it off and on, small and 4 KB prompts."""

    def val(target: str, wl: str, key: str) -> float | None:
        v = rows.get((target, wl), {}).get(key)
        return float(v) if v is not None else None

    def delta(on: str, off: str, wl: str, key: str) -> float | None:
        a, b = val(on, wl, key), val(off, wl, key)
        return a - b if a is not None and b is not None else None

    if ("onetoken+guard", "chat_1c") not in rows:
        return []
    small = len(wrk_body("m").encode()) / 1024
    kb = len(wrk_body("m", LONG_PROMPT).encode()) / 1024 - small
    measures = (
        ("CPU µs/req, 32 connections", "chat_32c", "cpu_us_per_req"),
        ("CPU µs/req, 1 connection", "chat_1c", "cpu_us_per_req"),
        ("p50 µs, 1 connection", "chat_1c", "p50_us"),
    )
    out = [
        "## Cost of the guard",
        "",
        "Guard (`flag`, every category) on minus off, same server and run. Per KB = (the "
        f"4 KB prompt's cost minus the small prompt's) / {kb:.1f} KB of extra body. Differences "
        "of a few µs are within the noise of one run; read them as an order of magnitude.",
        "",
        "| measure | small prompt | 4 KB prompt | per KB |",
        "|---|---:|---:|---:|",
    ]
    for label, wl, key in measures:
        d_small = delta("onetoken+guard", "onetoken", wl, key)
        d_long = delta("onetoken+guard+4k", "onetoken+4k", wl, key)
        per_kb = (d_long - d_small) / kb if d_small is not None and d_long is not None else None
        out.append(f"| {label} | {fmt(d_small, 1)} | {fmt(d_long, 1)} | {fmt(per_kb, 2)} |")
    out.append("")
    return out


def targets_check(
    rows: dict[tuple[str, str], dict[str, Any]],
    targets: list[Target],
    extras: dict[str, Any] | None = None,
) -> list[str]:
    """onetoken against DESIGN.md section 7, when both it and the peers ran."""
    if not any(t.name == "onetoken" for t in targets):
        return []

    def val(target: str, wl: str, key: str) -> float | None:
        v = rows.get((target, wl), {}).get(key)
        return float(v) if v is not None else None

    checks: list[tuple[str, float | None, float, str]] = []
    ot, ng = val("onetoken", "chat_32c", "rps"), val("nginx", "chat_32c", "rps")
    checks.append(("throughput ≥ 0.8 x nginx", ot / ng if ot and ng else None, 0.8, ">="))
    ot, ng = val("onetoken", "stream_32c", "rps"), val("nginx", "stream_32c", "rps")
    checks.append(("stream throughput ≥ 0.8 x nginx", ot / ng if ot and ng else None, 0.8, ">="))
    for wl, label in (("chat_32c", "request"), ("stream_32c", "stream")):
        a, b = val("onetoken", wl, "cpu_us_per_req"), val("nginx", wl, "cpu_us_per_req")
        checks.append((f"CPU per {label} ≤ 1.5 x nginx's", a / b if a and b else None, 1.5, "<="))
    for key, limit, label in (("p50_us", 50, "p50"), ("p99_us", 150, "p99")):
        a, b = val("onetoken", "chat_1c", key), val("direct", "chat_1c", key)
        checks.append(
            (f"added {label} at 1 connection ≤ {limit} µs", a - b if a and b else None, limit, "<=")
        )
    a, b = val("onetoken", "stream_1c", "ttft_p50_us"), val("direct", "stream_1c", "ttft_p50_us")
    checks.append(("added time to first token ≤ 300 µs", a - b if a and b else None, 300, "<="))
    a, b = val("onetoken", "stream_1c", "gap_p50_us"), val("direct", "stream_1c", "gap_p50_us")
    checks.append(("added per-chunk gap ≤ 10 µs", a - b if a and b else None, 10, "<="))
    ot_target = next((t for t in targets if t.name == "onetoken"), None)
    gateway_idle = ot_target.idle_rss_by_process.get("gateway") if ot_target else None
    checks.append(("gateway process idle RSS ≤ 64 MB", gateway_idle, 64, "<="))
    streams = (extras or {}).get("idle_streams")
    checks.append(
        (
            "≤ 20 KB per open idle stream",
            streams["kb_per_stream"] if streams else None,
            20,
            "<=",
        )
    )
    out = [
        "## onetoken against the targets (DESIGN.md section 7)",
        "",
        "| target | measured | result |",
        "|---|---:|---|",
    ]
    for label, value, bound, op in checks:
        if value is None:
            out.append(f"| {label} | - | not measured |")
            continue
        ok = value >= bound if op == ">=" else value <= bound
        shown = f"{value:.2f}" if op == ">=" or value < 10 else f"{value:,.0f}"
        out.append(f"| {label} | {shown} | {'met' if ok else 'NOT met'} |")
    out.append("")
    return out


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def terminate_on_signals(services: Services) -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        services.stop_all()
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per row (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per row, 1 s warm-up")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (direct always runs)",
    )
    parser.add_argument(
        "--onetoken-python", help="interpreter with onetoken installed (default: this one)"
    )
    parser.add_argument("--output", type=Path, default=BENCH / "RESULTS.md", help="report path")
    args = parser.parse_args(argv)

    wanted = {t.strip() for t in args.targets.split(",") if t.strip()} | {"direct"}
    unknown = wanted - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    seconds = 3 if args.quick else max(1, args.duration)
    warmup = 1 if args.quick else 2
    # LiteLLM serves ~100 req/s: a shorter run gives it as many samples as it can use.
    litellm_seconds = max(2, seconds // 2)

    ensure_debian_tools()
    mock_bin, loadgen = build_rust_tools()

    meta: dict[str, Any] = {
        "command": " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "git": git_sha(),
        "seconds": seconds,
        "litellm_seconds": litellm_seconds,
        "warmup": warmup,
        "versions": {
            "wrk": version_of(["wrk", "-v"]).split(" [")[0],
            "rustc": version_of(["rustc", "--version"]),
            "python": platform.python_version(),
        },
        "errors": [],
        "loadavg_start": loadavg(),
    }
    targets: list[Target] = []
    variants: list[Target] = []
    skipped: dict[str, str] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    # onetoken-only measurements: idle streams, the phase profile.
    extras: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="onetoken-bench-") as tmp:
        workdir = Path(tmp)
        services = Services(workdir)
        with terminate_on_signals(services):
            try:
                direct = start_mock(services, mock_bin)
                upstream = direct.base_url.removeprefix("http://")
                starters = {
                    "nginx": lambda: start_nginx(services, workdir, upstream),
                    "litellm": lambda: start_litellm(services, workdir, upstream),
                }
                py = None
                if "onetoken" in wanted:
                    py = onetoken_python(args.onetoken_python)
                    if py is None:
                        skipped["onetoken"] = (
                            "the onetoken package (with its extension) is not importable here; "
                            "run `make bench`, or pass --onetoken-python"
                        )
                    else:
                        starters["onetoken"] = lambda: start_onetoken(
                            services, workdir, upstream, py
                        )
                order = [direct.name] + [n for n in ALL_TARGETS[1:] if n in wanted]
                for name in order:
                    if name in skipped:
                        log(f"{name}: skipped ({skipped[name]})")
                        continue
                    log(f"{name}: starting")
                    try:
                        t = direct if name == "direct" else starters[name]()
                    except BenchError as exc:
                        skipped[name] = str(exc).splitlines()[0]
                        meta["errors"].append(f"{name}: {exc}")
                        log(f"{name}: could not start: {exc}")
                        services.stop_after_first()
                        continue
                    t.idle_rss_mb = rss_mb(t.pid)
                    t.idle_rss_by_process = {
                        role: v["rss_mb"] for role, v in by_process(t.pid).items()
                    }
                    targets.append(t)
                    warm_up(t, warmup)
                    secs = litellm_seconds if t.short_run else seconds
                    for w in WORKLOADS:
                        log(f"{name}: {w.key} for {secs} s")
                        try:
                            rows[(name, w.key)] = measure(t, w, secs, loadgen)
                        except BenchError as exc:
                            meta["errors"].append(f"{name} {w.key}: {exc}")
                            log(f"{name}: {w.key} failed: {exc}")
                            continue
                        r = rows[(name, w.key)]
                        log(
                            f"{name}: {w.key}: {r['rps']:,.0f} req/s, errors {r['errors']}, "
                            f"cpu/req {fmt(r['cpu_us_per_req'], 1)} µs"
                        )
                    if name == "direct" and "onetoken" in starters:
                        steps = [VariantStep(lambda: None, direct_variants(t))]
                        run_variants(steps, seconds, warmup, loadgen, rows, variants, meta)
                    elif name == "onetoken":
                        try:
                            steps = onetoken_variants(t, upstream)
                        except BenchError as exc:
                            meta["errors"].append(f"onetoken variants: {exc}")
                            log(f"onetoken: variant rows skipped: {exc}")
                            steps = []
                        run_variants(steps, seconds, warmup, loadgen, rows, variants, meta)
                        try:
                            extras["idle_streams"] = idle_streams(t, IDLE_STREAMS)
                        except BenchError as exc:
                            meta["errors"].append(f"onetoken idle streams: {exc}")
                    # Give the cores back before the next target starts.
                    services.stop_after_first()
                if py is not None and any(t.name == "onetoken" for t in targets):
                    log("onetoken: phase profile")
                    try:
                        extras["phases"] = phase_profile(
                            services, workdir, upstream, py, seconds, warmup, loadgen
                        )
                    except BenchError as exc:
                        meta["errors"].append(f"onetoken phase profile: {exc}")
                    services.stop_after_first()
                    otlp_rows(services, workdir, upstream, py, seconds, warmup, loadgen,
                              rows, variants, meta)
            finally:
                services.stop_all()

    meta["loadavg_end"] = loadavg()
    write_report(args.output, meta, targets, rows, skipped, variants, extras)
    OUT_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = {
        "meta": meta,
        "targets": [
            {k: v for k, v in t.__dict__.items() if k not in ("admin_password", "body")}
            for t in [*targets, *variants]
        ],
        "skipped": skipped,
        "rows": [{"target": k[0], "workload": k[1], **v} for k, v in rows.items()],
        "extras": extras,
    }
    (OUT_DIR / f"results-{stamp}.json").write_text(json.dumps(raw, indent=2))
    log(f"wrote {args.output} and bench/out/results-{stamp}.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(1)
