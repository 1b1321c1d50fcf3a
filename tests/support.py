"""What unit and integration tests share: the test secret, waiting for a condition
instead of sleeping, a port nothing listens on, and a private redis-server.

A fixed sleep is either too short on a loaded machine (a flaky test) or longer than needed
everywhere else (a slow suite); `wait_until` polls the condition and fails with a message
when it never holds.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
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
