from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from onetoken import _core

from .harness import Admin, Server, bootstrap


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[tuple[_core.MockUpstream, str]]:
    """The fake provider, in this process so tests can count what reached it."""
    mock = _core.MockUpstream("127.0.0.1:0")
    addr = mock.start()
    yield mock, addr
    mock.stop()


@pytest.fixture(scope="session")
def mock_addr(mock_upstream: tuple[_core.MockUpstream, str]) -> str:
    return mock_upstream[1]


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, mock_addr: str
) -> Iterator[dict[str, Any]]:
    """One running server per test module, with its bootstrap credentials."""
    data_dir: Path = tmp_path_factory.mktemp("onetoken")
    creds = bootstrap(data_dir)
    server = Server(data_dir=data_dir, upstream=mock_addr)
    server.start()
    try:
        yield {"server": server, "creds": creds, "data_dir": data_dir}
    finally:
        server.kill()


@pytest.fixture(scope="module")
def admin(deployment: dict[str, Any]) -> Admin:
    c = deployment["creds"]
    return Admin(deployment["server"], c["admin_email"], c["admin_password"])
