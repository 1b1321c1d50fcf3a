"""What unit and integration tests share: the test secret, waiting for a condition
instead of sleeping, and a port nothing listens on.

A fixed sleep is either too short on a loaded machine (a flaky test) or longer than needed
everywhere else (a slow suite); `wait_until` polls the condition and fails with a message
when it never holds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
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
