"""The client address the control API believes, through a real uvicorn server configured as
`onetoken serve` configures it: X-Forwarded-For counts only from ONETOKEN_TRUSTED_PROXIES,
for the per-IP login lockout and for the address the security log records."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from onetoken.control import build_state, create_app
from onetoken.orgs import restriction
from onetoken.security import log as security_log
from onetoken.security.log import SecurityEvent
from onetoken.security.login_guard import SCOPE_IP
from onetoken.security.models import LoginThrottle
from onetoken.serve import _Server, control_config
from onetoken.settings import Settings
from tests.support import TEST_SECRET, wait_until

MAX_FAILURES_IP = 3


def _serve(tmp_path: Path, trusted: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    settings = Settings(
        data_dir=tmp_path / "data",
        secret_key=SecretStr(TEST_SECRET),
        trusted_proxies=trusted,
        login_max_failures_ip=MAX_FAILURES_IP,
        login_max_failures_account=1000,
        login_burst_max_attempts=1000,
    )
    state = build_state(settings)
    events: list[SecurityEvent] = []
    writer = security_log.current()
    assert writer is not None
    monkeypatch.setattr(writer, "record", events.append)
    server = _Server(control_config(create_app(settings, state=state), settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn exited"
        return bool(server.started)

    wait_until(started, 20, 0.02, message="uvicorn started")
    url = "http://{}:{}".format(*sock.getsockname()[:2])
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            yield client, state, events
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        state.db_engine.dispose()


@pytest.fixture
def untrusting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from _serve(tmp_path, "", monkeypatch)


@pytest.fixture
def behind_local_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from _serve(tmp_path, "127.0.0.1", monkeypatch)


def _fail_logins(client: httpx.Client, count: int) -> list[httpx.Response]:
    return [
        client.post(
            "/api/v1/auth/login",
            json={"email": f"nobody{i}@example.test", "password": "not the password"},
            headers={"x-forwarded-for": f"203.0.113.{i + 1}"},
        )
        for i in range(count)
    ]


def _ip_throttles(state: Any) -> set[str]:
    """The addresses the per-address lockout counts, known by their tokens (it keeps no
    address in clear: onetoken.orgs.restriction.address_key)."""
    with state.session_factory() as s:
        rows = s.scalars(select(LoginThrottle).where(LoginThrottle.scope == SCOPE_IP)).all()
        subjects = {r.subject for r in rows}
    assert all(s.startswith("hmac:") for s in subjects), subjects
    return subjects


def _tokens(state: Any, *addresses: str) -> set[str]:
    return {restriction.address_key(state.secrets, a) for a in addresses}


def test_forged_forwarding_from_loopback_is_ignored(untrusting: Any) -> None:
    client, state, events = untrusting
    answers = _fail_logins(client, MAX_FAILURES_IP + 1)
    # Each attempt names another address; the lockout still counts them as one source.
    assert [r.status_code for r in answers[:MAX_FAILURES_IP]] == [401] * MAX_FAILURES_IP
    assert answers[-1].status_code == 429
    assert answers[-1].json()["error"]["code"] == "login_locked"
    assert _ip_throttles(state) == _tokens(state, "127.0.0.1")
    failures = [e for e in events if e.kind.startswith("auth.")]
    assert failures and {e.source_ip for e in failures} == {"127.0.0.1"}


def test_forwarding_from_a_trusted_proxy_is_believed(behind_local_proxy: Any) -> None:
    client, state, events = behind_local_proxy
    answers = _fail_logins(client, MAX_FAILURES_IP + 1)
    assert [r.status_code for r in answers] == [401] * (MAX_FAILURES_IP + 1)
    expected = {f"203.0.113.{i + 1}" for i in range(MAX_FAILURES_IP + 1)}
    assert _ip_throttles(state) == _tokens(state, *expected)
    failures = [e for e in events if e.kind.startswith("auth.")]
    assert {e.source_ip for e in failures} == expected
