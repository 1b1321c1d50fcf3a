"""POST /api/v1/analytics/sql (docs/sql.md): the analyst role, the caller's org as the
scope, operators' wider scopes, refusals in the OpenAI error shape, and the audit record
that keeps a hash and a length of the query, never its text. Real chDB under a real
control app."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from onetoken.analytics import clickhouse as ch
from onetoken.analytics.sink import CallLogSink
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.unit.conftest import Admin, add_account
from tests.unit.test_accounts import drained_events

SQL = "/api/v1/analytics/sql"


@dataclass
class Runtime:
    """The part of a running server the control API reads ClickHouse through."""

    sink: CallLogSink

    def push_snapshot(self) -> None:
        return None


@pytest.fixture(scope="module")
def ch_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("sql-endpoint"))
    client = ch.open_client(settings)
    yield client
    client.close()


@pytest.fixture
def calls(state: AppState, ch_client: Client, admin: Admin, other_admin: Admin) -> Iterator[None]:
    ch_client.command("TRUNCATE TABLE onetoken.call_log")
    for org, n in ((admin.org_id, 3), (other_admin.org_id, 5)):
        ch_client.command(
            "INSERT INTO onetoken.call_log (ts, request_id, org_id, cost) "  # noqa: S608
            f"SELECT now64(6), concat('{org}-', toString(number)), '{org}', 10 FROM numbers({n})"
        )
    state.runtime = Runtime(CallLogSink(state.settings, client=ch_client))  # type: ignore[assignment]
    drained_events()
    yield
    state.runtime = None


def ask(client: TestClient, headers: dict[str, str], query: str, **extra: Any) -> Any:
    return client.post(SQL, headers=headers, json={"query": query, **extra})


def sql_events() -> list[dict[str, Any]]:
    return [e for e in drained_events() if e["kind"] == "analytics.sql"]


def test_an_analyst_reads_its_own_org_and_the_audit_keeps_no_query_text(
    state: AppState, client: TestClient, admin: Admin, calls: None
) -> None:
    analyst = add_account(state, client, admin.org_id, "ana@acme.test", "analyst")
    query = "SELECT org_id, count() AS n, sum(cost) AS cost FROM onetoken.call_log " \
            "GROUP BY org_id /* secret-needle */"
    r = ask(client, analyst, query)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["columns"] == ["org_id", "n", "cost"]
    assert body["types"] == ["String", "UInt64", "Int64"]
    assert body["rows"] == [[admin.org_id, 3, 30]]
    assert body["row_count"] == 1 and body["truncated"] is False
    assert body["org"] == admin.org_id and body["elapsed_ms"] >= 0

    (event,) = sql_events()
    assert event["org_id"] == admin.org_id
    assert event["detail"]["query_sha256"] == hashlib.sha256(query.encode()).hexdigest()
    assert event["detail"]["query_length"] == len(query)
    assert event["detail"]["outcome"] == "ok" and event["detail"]["rows"] == 1
    assert "secret-needle" not in str(event)

    objects = ask(client, analyst, "SELECT count() AS n FROM onetoken.call_log",
                  format="objects").json()
    assert objects["rows"] == [{"n": 3}]


def test_an_analyst_writes_nothing_through_the_api(
    state: AppState, client: TestClient, admin: Admin, calls: None
) -> None:
    analyst = add_account(state, client, admin.org_id, "ana@acme.test", "analyst")
    assert client.post("/api/v1/keys", headers=analyst, json={"name": "k"}).status_code == 403
    assert client.get("/api/v1/calls", headers=analyst).status_code == 200
    assert client.get("/api/v1/usage/summary", headers=analyst).status_code == 200


def test_the_analyst_role_is_granted_and_changed_like_any_other(
    client: TestClient, admin: Admin
) -> None:
    r = client.post("/api/v1/accounts", headers=admin.headers,
                    json={"role": "analyst", "login_name": "invited-analyst"})
    assert r.status_code == 201, r.text
    assert r.json()["role"] == "analyst"
    r = client.post("/api/v1/accounts", headers=admin.headers,
                    json={"role": "viewer", "login_name": "later-analyst"})
    changed = client.patch(f"/api/v1/accounts/{r.json()['id']}", headers=admin.headers,
                           json={"role": "analyst"})
    assert changed.status_code == 200 and changed.json()["role"] == "analyst"


def test_refusals_are_openai_shaped_and_audited(
    state: AppState, client: TestClient, admin: Admin, calls: None
) -> None:
    for query, code in (
        ("SELECT * FROM system.tables", "sql_refused"),
        ("SELECT count() FROM merge('onetoken', '^call_log$')", "sql_refused"),
        ("INSERT INTO onetoken.call_log (org_id) VALUES ('x')", "sql_refused"),
        ("SELECT nope FROM onetoken.call_log", "sql_error"),
    ):
        r = ask(client, admin.headers, query)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == code and error["param"] == "query"
        assert error["type"] == "invalid_request_error" and error["message"]
        (event,) = sql_events()
        assert event["detail"]["outcome"] == code


def test_only_operators_widen_the_scope(
    client: TestClient, admin: Admin, other_admin: Admin, operator: Admin, calls: None
) -> None:
    query = "SELECT org_id FROM onetoken.call_log GROUP BY org_id ORDER BY org_id"
    for extra in ({"org": other_admin.org_id}, {"all_orgs": True}):
        r = ask(client, admin.headers, query, **extra)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert ask(client, admin.headers, query, org=admin.org_id).json()["rows"] == [
        [admin.org_id]
    ]
    other = ask(client, operator.headers, query, org=other_admin.org_id).json()
    assert other["rows"] == [[other_admin.org_id]] and other["org"] == other_admin.org_id
    every = ask(client, operator.headers, query, all_orgs=True).json()
    assert sorted(r[0] for r in every["rows"]) == sorted([admin.org_id, other_admin.org_id])
    assert every["org"] is None
    # The operator's own org has no calls: the default scope is still one org.
    assert ask(client, operator.headers, query).json()["rows"] == []


def test_the_security_log_is_for_those_who_may_read_it_through_the_api(
    state: AppState, client: TestClient, admin: Admin, calls: None
) -> None:
    """Analysts do not hold security.read, so SQL does not open the security log to them;
    owners and admins read their org's."""
    analyst = add_account(state, client, admin.org_id, "ana@acme.test", "analyst")
    query = "SELECT count() FROM onetoken.security_log"
    r = ask(client, analyst, query)
    assert r.status_code == 400 and r.json()["error"]["code"] == "sql_refused"
    nested = ask(client, analyst, "SELECT (SELECT count() FROM onetoken.security_log)")
    assert nested.json()["error"]["code"] == "sql_refused"
    assert ask(client, admin.headers, query).status_code == 200
