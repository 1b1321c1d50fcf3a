"""`onetoken gateway`: the slim process's imports and its side of the gateway channel
(against a stand-in control process and a stand-in engine)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from onetoken.gateway import runner
from onetoken.gateway.runner import ControlChannel, GatewayEnv, GatewayError, GatewayRunner
from onetoken.kit import channel
from tests.support import free_port, wait_until

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
HEAVY = ("fastapi", "starlette", "sqlalchemy", "pydantic", "clickhouse_connect", "chdb", "uvicorn")
TOKEN = "t" * 64


def test_gateway_command_imports_nothing_heavy() -> None:
    """What `onetoken gateway` loads before it serves: the CLI's parser, the runner, the
    extension. A fresh interpreter, so nothing else this test run imported counts."""
    code = (
        "import sys\n"
        "from onetoken.cli import build_parser\n"
        "args = build_parser().parse_args(['gateway'])\n"
        "assert args.func.__name__ == 'cmd_gateway'\n"
        "import onetoken.gateway.runner\n"
        "try:\n"
        "    import onetoken._core\n"
        "except ImportError:\n"
        "    pass\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == ""


# -- a stand-in control process --------------------------------------------------------------


@dataclass
class Control:
    config: dict[str, Any]
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    down: bool = False

    def snapshot(self) -> tuple[str, bytes]:
        snap = self.snapshots[-1]
        return f'"{snap["version"]}"', orjson.dumps(snap)


def _handler(control: Control) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            control.requests.append((self.path, dict(self.headers)))
            if control.down:
                self.send_response(503)
                self.end_headers()
                return
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_response(401)
                self.end_headers()
                return
            if self.path == "/internal/gateway/config":
                body = orjson.dumps(control.config)
                self.send_response(200)
            elif self.path.startswith("/internal/gateway/snapshot?instance="):
                etag, body = control.snapshot()
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def control() -> Iterator[tuple[Control, str]]:
    ctl = Control(
        config={"listen": "0.0.0.0:8080", "spool_dir": "/elsewhere", "shutdown_grace_ms": 2500},
        snapshots=[{"version": 1, "orgs": []}],
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ctl))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield ctl, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class FakeEngine:
    def __init__(self, config_json: bytes) -> None:
        self.config = orjson.loads(config_json)
        self.loaded: list[int] = []
        self.status: list[bool] = []
        self.stops: list[float | None] = []
        self.instance_id = "inst-1"
        self.metrics_address = "127.0.0.1:19090" if self.config.get("metrics_listen") else None

    def start(self) -> str:
        return "127.0.0.1:18080"

    def load_snapshot(self, data: bytes) -> int:
        version = int(orjson.loads(data)["version"])
        self.loaded.append(version)
        return version

    def snapshot_dropped(self) -> list[dict[str, str]]:
        return []

    def set_control_status(self, reachable: bool) -> None:
        self.status.append(reachable)

    def stop(self, grace_seconds: float | None = None) -> None:
        self.stops.append(grace_seconds)


def _env(url: str, tmp_path: Path, **over: str) -> GatewayEnv:
    return GatewayEnv.from_environ(
        {
            "ONETOKEN_CONTROL_URL": url,
            "ONETOKEN_GATEWAY_TOKEN": TOKEN,
            "ONETOKEN_DATA_DIR": str(tmp_path),
            "ONETOKEN_GATEWAY_LISTEN": "127.0.0.1:0",
            "ONETOKEN_CONFIG_WATCH_INTERVAL_MS": "50",
            **over,
        }
    )


Rig = tuple[Control, GatewayRunner, list[FakeEngine]]


@pytest.fixture
def rig(control: tuple[Control, str], tmp_path: Path) -> Rig:
    """A runner (not started) on the fake control process, and the engines it makes."""
    ctl, url = control
    engines: list[FakeEngine] = []

    def factory(cfg: bytes) -> FakeEngine:
        engines.append(FakeEngine(cfg))
        return engines[-1]

    return ctl, GatewayRunner(_env(url, tmp_path), engine_factory=factory), engines


def test_start_takes_the_config_with_its_own_address_and_data_dir(
    rig: Rig, tmp_path: Path
) -> None:
    ctl, r, engines = rig
    assert r.start() == "127.0.0.1:18080"
    (engine,) = engines
    assert engine.config["listen"] == "127.0.0.1:0"
    assert engine.config["spool_dir"] == str((tmp_path / "spool").resolve())
    assert engine.loaded == [1] and engine.status == [True]
    path, headers = ctl.requests[-1]
    # The first snapshot is asked for without waiting.
    assert path == "/internal/gateway/snapshot?instance=inst-1"
    assert headers["Authorization"] == f"Bearer {TOKEN}"


def test_redis_comes_from_the_control_unless_the_gateway_says_otherwise(
    control: tuple[Control, str], tmp_path: Path
) -> None:
    _, url = control
    sent = {"listen": "127.0.0.1:1", "shared": {"redis_url": "redis://ctl:6379/0", "wait_ms": 5}}
    plain = GatewayRunner(_env(url, tmp_path))
    assert plain.engine_config(sent)["shared"] == sent["shared"]
    assert plain.engine_config({"listen": "x"}).get("shared") is None
    own = GatewayRunner(_env(url, tmp_path, ONETOKEN_REDIS_URL="unix:///run/r.sock"))
    assert own.engine_config(sent)["shared"] == {"redis_url": "unix:///run/r.sock", "wait_ms": 5}
    assert own.engine_config({"listen": "x"})["shared"] == {"redis_url": "unix:///run/r.sock"}


def test_a_pool_gateway_asks_for_its_pool_and_journals_into_its_spool_dir(
    control: tuple[Control, str], tmp_path: Path
) -> None:
    ctl, url = control
    engines: list[FakeEngine] = []

    def factory(cfg: bytes) -> FakeEngine:
        engines.append(FakeEngine(cfg))
        return engines[-1]

    # --pool wins over the environment.
    env = _env(url, tmp_path, ONETOKEN_GATEWAY_POOL="other")
    assert env.pool == "other"
    env = GatewayEnv.from_environ({"ONETOKEN_GATEWAY_TOKEN": TOKEN, "ONETOKEN_GATEWAY_POOL": "x"},
                                  "eu-1")
    assert env.pool == "eu-1"
    r = GatewayRunner(_env(url, tmp_path, ONETOKEN_GATEWAY_POOL="eu-1"), engine_factory=factory)
    r.start()
    assert engines[0].config["spool_dir"] == str((tmp_path / "spool/pools/eu-1").resolve())
    assert ctl.requests[-1][0] == "/internal/gateway/snapshot?instance=inst-1&pool=eu-1"
    with pytest.raises(GatewayError, match="pool name"):
        _env(url, tmp_path, ONETOKEN_GATEWAY_POOL="../up")


def test_start_learns_the_metrics_address_the_ready_report_carries(
    control: tuple[Control, str], tmp_path: Path
) -> None:
    _, url = control
    env = _env(url, tmp_path, ONETOKEN_METRICS_LISTEN="127.0.0.1:0")
    r = GatewayRunner(env, engine_factory=FakeEngine)
    address = r.start()
    assert r.engine is not None
    assert r.metrics_address == "127.0.0.1:19090"
    line = runner.ready_line(address, r.metrics_address)
    assert line == "ready 127.0.0.1:18080 127.0.0.1:19090"
    verb, _, detail = line.partition(" ")
    assert (verb, runner.parse_ready(detail)) == ("ready", ("127.0.0.1:18080", "127.0.0.1:19090"))
    # Without a metrics listener the report is the address alone.
    assert runner.ready_line(address, None) == "ready 127.0.0.1:18080"
    assert runner.parse_ready("127.0.0.1:18080") == ("127.0.0.1:18080", None)


def test_polls_load_only_a_new_snapshot(rig: Rig) -> None:
    ctl, r, engines = rig
    r.start()
    assert r.poll(0.5) and r.poll()
    assert engines[0].loaded == [1]
    assert ctl.requests[-1][1]["If-None-Match"] == '"1"'
    # With an ETag it waits at the control process for a change (long poll).
    assert ctl.requests[-2][0] == "/internal/gateway/snapshot?instance=inst-1&wait=0.5"
    ctl.snapshots.append({"version": 2, "orgs": []})
    assert r.poll()
    assert engines[0].loaded == [1, 2]


def test_control_down_keeps_the_last_snapshot_and_says_so(rig: Rig) -> None:
    ctl, r, engines = rig
    r.start()
    ctl.down = True
    assert not r.poll()
    assert engines[0].status[-1] is False
    assert engines[0].loaded == [1]  # still serving it; nothing unloaded
    ctl.down = False
    assert r.poll()
    assert engines[0].status[-1] is True and engines[0].loaded == [1]


def test_unreachable_control_counts_as_down(tmp_path: Path) -> None:
    engine = FakeEngine(b"{}")
    url = f"http://127.0.0.1:{free_port()}"
    r = GatewayRunner(_env(url, tmp_path), engine_factory=lambda _: engine)
    r.engine = engine
    assert not r.poll()
    assert engine.status == [False]


def test_run_stops_the_engine_with_the_configured_grace(rig: Rig) -> None:
    _, r, engines = rig
    r.start()
    t = threading.Thread(target=r.run)
    t.start()
    wait_until(lambda: len(engines[0].status) >= 3, 5, 0.01, message="polls on its own")
    r.stopping.set()
    t.join(timeout=5)
    # The engine drains for the config's shutdown_grace_ms itself.
    assert engines[0].stops == [None]


def test_start_waits_for_the_control_process(rig: Rig) -> None:
    ctl, r, engines = rig
    ctl.down = True
    started: list[str] = []
    t = threading.Thread(target=lambda: started.append(r.start()))
    t.start()
    wait_until(lambda: len(ctl.requests) >= 2, 5, 0.01, message="two config requests")
    assert not started and not engines  # no engine without a config
    ctl.down = False
    t.join(timeout=10)
    assert started == ["127.0.0.1:18080"] and engines[0].loaded == [1]


def test_start_gives_up_when_stopped_while_waiting(tmp_path: Path) -> None:
    r = GatewayRunner(_env("http://127.0.0.1:1", tmp_path), engine_factory=FakeEngine)
    r.stopping.set()
    with pytest.raises(GatewayError):
        r.start()


def test_wrong_token_is_not_taken_for_a_config(
    control: tuple[Control, str], tmp_path: Path
) -> None:
    _, url = control
    with pytest.raises(runner.ChannelError):
        ControlChannel(url, "wrong").config()


def test_token_comes_from_the_master_secret_when_not_given(tmp_path: Path) -> None:
    secret = "s" * 48
    env = GatewayEnv.from_environ({"ONETOKEN_SECRET_KEY": secret})
    assert env.token == channel.channel_token(secret.encode(), channel.GATEWAY)
    (tmp_path / "secret.key").write_text("f" * 48 + "\n")
    env = GatewayEnv.from_environ({"ONETOKEN_DATA_DIR": str(tmp_path)})
    assert env.token == channel.channel_token(b"f" * 48, channel.GATEWAY)
    assert env.control_url == "http://127.0.0.1:8081"
    with pytest.raises(GatewayError, match="no gateway token"):
        GatewayEnv.from_environ({"ONETOKEN_DATA_DIR": str(tmp_path / "empty")})


def test_main_reports_a_start_failure_on_the_ready_pipe(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    code = runner.main(
        {
            "ONETOKEN_CONTROL_URL": "ftp://nowhere",
            "ONETOKEN_GATEWAY_TOKEN": TOKEN,
            runner.READY_FD_ENV: str(write_fd),
        }
    )
    with os.fdopen(read_fd, "rb") as f:
        report = f.read().decode()
    assert code == 2
    assert report.startswith("error ") and "ONETOKEN_CONTROL_URL" in report


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_control_is_trusted_by_its_own_certificate_only(tmp_path: Path) -> None:
    """`serve`'s child reaches the control listener on loopback with ONETOKEN_TLS_CERT: that
    certificate (whatever host it names) is trusted, another one is not."""
    import ssl

    cert, key = _self_signed(tmp_path, "control.example")
    other, _ = _self_signed(tmp_path, "other.example")
    ctl = Control(config={"listen": "x"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ctl))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        assert ControlChannel(url, TOKEN, ca_file=str(cert)).config() == {"listen": "x"}
        with pytest.raises(runner.ChannelError):
            ControlChannel(url, TOKEN, ca_file=str(other)).config()
    finally:
        server.shutdown()
        server.server_close()
