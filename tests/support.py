"""What unit and integration tests share: the test secret, waiting for a condition
instead of sleeping, a port nothing listens on, a private redis-server, and an onetoken
process serving /metrics with its exposition parsed.

A fixed sleep is either too short on a loaded machine (a flaky test) or longer than needed
everywhere else (a slow suite); `wait_until` polls the condition and fails with a message
when it never holds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0

# ONETOKEN_SECRET_KEY of the servers and settings the tests build: long and random-looking
# enough for the strength check outside --demo.
TEST_SECRET = "unit-test-secret-key-0123456789abcdef"


def wait_until(
    condition: Callable[[], T | Literal[False] | None],
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.05,
    *,
    ignore: tuple[type[BaseException], ...] = (),
    message: str | Callable[[], str] = "condition",
) -> T:
    """Call `condition` every `interval` seconds until it returns a truthy value, and return
    that value. Exceptions of the `ignore` types count as "not yet" (e.g. a server that does
    not accept connections yet). AssertionError naming `message` and the last result when
    `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = condition()
        except ignore as exc:
            last = exc
        else:
            if result is not None and result is not False and result:
                return result
            last = result
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"{what} did not hold within {timeout}s (last: {last!r})")
        time.sleep(interval)


def free_port() -> int:
    """A port nothing listens on *now*: for addresses that must refuse connections. Never
    for a listener a test waits for (another process may take it): bind port 0 and read
    the bound address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server (Debian's) on a unix socket in `directory`: no port to race
    for, no persistence, gone when stopped. Tests that need Redis start their own, so one
    that stops or slows it to test the fallbacks disturbs nobody else."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "600",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout=10, message="redis-server accepting on its socket")
        return self

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# One sample line of the text exposition: name, optional {labels}, value.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """(series name, its labels) -> value of every sample in a Prometheus exposition."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m is not None, f"not a sample line: {line!r}"
        labels = frozenset(_LABEL.findall(m[2] or ""))
        out[(m[1], labels)] = float(m[3])
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The value of one series; KeyError naming it when the exposition lacks it."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise KeyError(f"{name}{labels} not exported")
    return samples[key]


class MetricsProcess:
    """`python -m onetoken <args>` with `env` added to this environment, which prints
    `<announce><url>` once its metrics listener serves; stdout and stderr go to files in
    `directory` (no pipe to fill up)."""

    def __init__(
        self, args: list[str], env: dict[str, str], directory: Path, announce: str
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.stdout = directory / "stdout"
        self.stderr = directory / "stderr"
        self._announce = announce
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "onetoken", *args],
                env={**os.environ, **env}, stdout=out, stderr=err,
            )
        self.url = ""

    def line(self, prefix: str) -> str | None:
        for line in self.stdout.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):]
        return None

    def wait_ready(self, timeout: float = 60) -> MetricsProcess:
        def ready() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode}: {self.stderr_tail()}")
            return self.line(self._announce)

        self.url = wait_until(ready, timeout=timeout, message="the metrics listener announced")
        return self

    def scrape(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:  # noqa: S310
            body: str = resp.read().decode()
            return body

    def samples(self) -> Samples:
        return parse_metrics(self.scrape())

    def stderr_tail(self) -> str:
        return self.stderr.read_text()[-2000:]

    def terminate(self) -> None:
        """SIGTERM, without waiting (stop() waits)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        self.terminate()
        return self.process.wait(timeout=timeout)


def make_ca(
    directory: Path, name: str = "ca"
) -> tuple[Path, Callable[[str, str], tuple[Path, Path]]]:
    """A throwaway CA in `directory`: its certificate's path, and a function issuing
    (cert, key) paths for a common name valid for localhost and 127.0.0.1."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)

    def subject(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def valid(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        return (builder.serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = valid(x509.CertificateBuilder()).subject_name(subject(f"{name} test CA")).issuer_name(
        subject(f"{name} test CA")).public_key(ca_key.public_key()).add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
        x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                      content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, encipher_only=False,
                      decipher_only=False), critical=True).sign(ca_key, hashes.SHA256())
    ca_path = directory / f"{name}.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, purpose: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = (x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if purpose == "server"
                 else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
        cert = valid(x509.CertificateBuilder()).subject_name(subject(cn)).issuer_name(
            ca.subject).public_key(key.public_key()).add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False).sign(ca_key, hashes.SHA256())
        cert_path, key_path = directory / f"{name}-{cn}.pem", directory / f"{name}-{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    return ca_path, issue


def rsyslogd() -> str:
    """Debian's rsyslogd (with rsyslog-gnutls), or a skip saying how to get it; under CI
    (`CI` set) a missing one fails, as .ci/run installs it."""
    import pytest

    path = shutil.which("rsyslogd", path="/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    # rsyslog-gnutls: the TLS driver imtcp loads.
    if path is None or not any(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
        message = "rsyslogd with TLS is not installed (apt-get install rsyslog rsyslog-gnutls)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class SyslogReceiver:
    """A real RFC 5425 receiver: rsyslogd with imtcp over gtls (TLS, octet-counted
    frames) on a port it picks, writing the MSG of every message onetoken sent to a file,
    one a line. `client_ca` set: it asks for a client certificate issued by that CA.
    Stopped and started again, it listens on the same port."""

    def __init__(self, directory: Path, ca: Path, cert: Path, key: Path,
                 client_ca: Path | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.output = directory / "received.log"
        self.port = 0
        self._ca, self._cert, self._key, self._client_ca = ca, cert, key, client_ca
        self._process: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        port_file = self.directory / "port"
        auth = "x509/certvalid" if self._client_ca else "anon"
        # With a client CA it verifies clients against it; the receiver's own chain is
        # served either way.
        ca = self._client_ca or self._ca
        conf = self.directory / "rsyslog.conf"
        conf.write_text(f'''
global(workDirectory="{self.directory}" maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{self._cert}"
  defaultNetstreamDriverKeyFile="{self._key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
  streamDriver.authMode="{auth}")
input(type="imtcp" address="127.0.0.1" port="{self.port}" listenPortFileName="{port_file}")
template(name="msg" type="string" string="%msg%\\n")
if $app-name == "onetoken" then {{
  action(type="omfile" file="{self.output}" template="msg" flushOnTXEnd="on"
         asyncWriting="off")
}}
''')
        return conf

    def start(self) -> SyslogReceiver:
        binary = rsyslogd()
        port_file = self.directory / "port"
        port_file.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [binary, "-n", "-f", str(self._config()), "-i", str(self.directory / "pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError("rsyslogd exited")
            # The port it picked (written only when it picks one; a restart reuses it).
            text = port_file.read_text().strip() if port_file.exists() else ""
            if text.isdigit():
                self.port = int(text)
            if not self.port:
                return False
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, timeout=15, ignore=(OSError,), message="rsyslogd listening")
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def lines(self) -> list[str]:
        if not self.output.exists():
            return []
        return [line.strip() for line in self.output.read_text().splitlines() if line.strip()]

    def __enter__(self) -> SyslogReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
