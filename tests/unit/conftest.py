from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from onetoken.control import build_state, create_app
from onetoken.orgs import service as orgs
from onetoken.security import log as security_log
from onetoken.settings import Settings
from onetoken.state import AppState
from tests import builders as build
from tests.support import TEST_SECRET, RedisServer

CONTRACT = Path(__file__).resolve().parents[1] / "contract"


def contract(name: str) -> Any:
    return json.loads((CONTRACT / name).read_text())


# Set (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/onetoken_test) to run the
# control-DB tests against PostgreSQL; the database's public schema is wiped per test.
POSTGRES_URL = os.environ.get("ONETOKEN_TEST_POSTGRES_URL")


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(autouse=True, scope="session")
def _cheap_password_hashing() -> Iterator[None]:
    """argon2 at its production cost (~64 MiB, 3 passes) makes every sign-in in a unit test
    take tens of milliseconds; the algorithm is the same at a lower cost. The integration
    suite runs the real server with the real parameters."""
    from argon2 import PasswordHasher

    from onetoken.kit import crypto

    saved = crypto._hasher, crypto._DUMMY_HASH
    crypto._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    crypto._DUMMY_HASH = crypto._hasher.hash("dummy-password-for-timing")
    yield
    crypto._hasher, crypto._DUMMY_HASH = saved


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", secret_key=SecretStr(TEST_SECRET))
    if POSTGRES_URL:
        _reset_postgres(POSTGRES_URL)
        s.database_url = POSTGRES_URL
    return s


@pytest.fixture
def state(settings: Settings) -> Iterator[AppState]:
    st = build_state(settings)
    yield st
    st.db_engine.dispose()


@pytest.fixture
def client(settings: Settings, state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(settings, state=state)) as c:
        yield c


@dataclass
class Admin:
    org_id: str
    account_id: str
    email: str
    password: str
    headers: dict[str, str]


def make_org_admin(
    state: AppState,
    client: TestClient,
    org_name: str,
    email: str,
    role: str = "owner",
    *,
    is_operator: bool = False,
) -> Admin:
    password = build.PASSWORD
    with state.session_factory() as session:
        org, account = build.org_with_owner(
            session, org_name, email, password, role, is_operator=is_operator
        )
        session.commit()
        org_id, account_id = org.id, account.id
    r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    return Admin(org_id, account_id, email, password, {"Authorization": f"Bearer {token}"})


def add_account(
    state: AppState, client: TestClient, org_id: str, email: str, role: str
) -> dict[str, str]:
    password = "another long password"
    with state.session_factory() as session:
        build.accept_terms(session, orgs.create_account(session, org_id, email, password, role))
        session.commit()
    r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def accept_terms(client: TestClient, headers: dict[str, str]) -> dict[str, str]:
    """The signed-in account (`headers`) accepts the current terms of service, as a person
    does at their first sign-in; returns `headers`."""
    r = client.post("/api/v1/me/terms/accept", json={"version": build.TERMS_VERSION},
                    headers=headers)
    assert r.status_code == 200, r.text
    return headers


def drained_events() -> list[dict[str, Any]]:
    """Everything recorded so far in this process's security log queue."""
    writer = security_log.current()
    assert writer is not None
    rows = writer.drain()
    events = [dict(zip(security_log.SECURITY_LOG_COLUMNS, r, strict=True)) for r in rows]
    for e in events:
        e["detail"] = orjson.loads(e["detail"])
    return events


@pytest.fixture
def admin(state: AppState, client: TestClient) -> Admin:
    return make_org_admin(state, client, "Acme", "owner@acme.test")


@pytest.fixture
def other_admin(state: AppState, client: TestClient) -> Admin:
    return make_org_admin(state, client, "Globex", "admin@globex.test", role="admin")


@pytest.fixture
def operator(state: AppState, client: TestClient) -> Admin:
    """The platform's staff: the only ones who move money by default."""
    return make_org_admin(state, client, "Platform", "op@platform.test", is_operator=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for the test (tests/support.py)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of `redis_server`, answering str."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()
