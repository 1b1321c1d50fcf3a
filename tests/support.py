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
