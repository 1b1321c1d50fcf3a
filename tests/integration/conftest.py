from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from onetoken import _core

from .harness import Admin, deployed


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
    with deployed(tmp_path_factory.mktemp("onetoken"), mock_addr) as d:
        yield d


@pytest.fixture(scope="module")
def admin(deployment: dict[str, Any]) -> Admin:
    c = deployment["creds"]
    return Admin(deployment["server"], c["admin_email"], c["admin_password"])
