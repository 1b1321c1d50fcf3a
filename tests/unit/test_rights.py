"""Users' rights on the control DB: export, cancellation and the retention purge.
(The ClickHouse part of an erasure runs against a real server in
tests/integration/test_security_detection.py.)"""

from __future__ import annotations

import csv
import io
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from onetoken.analytics import clickhouse
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.columns import CALL_LOG_COLUMNS, CALL_LOG_TABLE
from onetoken.db.base import utcnow
from onetoken.orgs.models import AdminSession, TermsAcceptance
from onetoken.rights import erasure, retention
from onetoken.rights.models import AccountErasure
from onetoken.security import log as security_log
from onetoken.security.models import LoginSource
from onetoken.settings import Settings
from onetoken.state import AppState
from onetoken.webhooks.models import WebhookAttempt, WebhookDelivery
from tests import builders as build
from tests.support import wait_until

from .conftest import Admin, accept_terms
from .test_analytics_sink import make_batch

PASSWORD = "another long password"


def _member(client: TestClient, admin: Admin, email: str, role: str, **extra: str) -> str:
    body = {"email": email, "role": role, "password": PASSWORD, **extra}
    r = client.post("/api/v1/accounts", json=body, headers=admin.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _login(client: TestClient, email: str) -> dict[str, str]:
    r = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return accept_terms(client, {"Authorization": f"Bearer {r.json()['access_token']}"})


def test_export_json_and_csv(client: TestClient, admin: Admin) -> None:
    _member(client, admin, "dev@acme.test", "developer", display_name="Dana Dev",
            mobile="+15550001111")
    h = _login(client, "dev@acme.test")
    key = client.post("/api/v1/keys", json={"name": "laptop"}, headers=h)
    assert key.status_code == 201, key.text
    doc = client.get("/api/v1/me/export", headers=h)
    assert doc.status_code == 200
    assert "attachment" in doc.headers["content-disposition"]
    body = doc.json()
    assert body["account"]["email"] == "dev@acme.test"
    assert body["account"]["display_name"] == "Dana Dev"
    assert body["account"]["mobile"] == "+15550001111"
    assert [k["name"] for k in body["keys"]] == ["laptop"]
    assert [(t["version"], t["org_id"]) for t in body["terms_acceptances"]] == [
        (build.TERMS_VERSION, admin.org_id)]
    assert "hash" not in body["keys"][0]
    # Without a running gateway the call statistics are not available (and say so).
    assert body["call_statistics"] is None
    acc = client.get("/api/v1/me/export", params={"format": "csv", "part": "account"}, headers=h)
    assert acc.headers["content-type"].startswith("text/csv")
    rows = dict(csv.reader(io.StringIO(acc.text)))
    assert rows["email"] == "dev@acme.test" and rows["mobile"] == "'+15550001111"
    keys = list(csv.DictReader(io.StringIO(
        client.get("/api/v1/me/export", params={"format": "csv", "part": "keys"},
                   headers=h).text)))
    assert keys[0]["name"] == "laptop" and keys[0]["status"] == "active"
    calls = client.get("/api/v1/me/export", params={"format": "csv", "part": "calls"}, headers=h)
    assert calls.status_code == 503


def test_cancel_own_account_anonymizes_the_control_db(
    client: TestClient, admin: Admin, state: AppState, settings: object
) -> None:
    account_id = _member(client, admin, "ann@acme.test", "developer",
                         display_name="Ann Example", mobile="+15559998888",
                         login_name="ann.example")
    r = client.post("/api/v1/auth/login", json={"email": "ann@acme.test", "password": PASSWORD})
    h = {"Authorization": f"Bearer {r.json()['access_token']}"}
    # Ann accepted the terms from her own address: the acceptance stays, the address goes.
    remote = TestClient(client.app, client=("198.51.100.9", 40000))
    accept_terms(remote, h)
    key = client.post("/api/v1/keys", json={"name": "Ann's laptop"}, headers=h).json()
    wrong = client.post("/api/v1/me/cancel", json={"password": "nope"}, headers=h)
    assert wrong.status_code == 401
    r = client.post("/api/v1/me/cancel", json={"password": PASSWORD}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {"account_id": account_id, "state": "control_done", "keys_revoked": 1}
    # Signed out everywhere, cannot sign in again, key revoked.
    assert client.get("/api/v1/me", headers=h).status_code == 401
    again = client.post("/api/v1/auth/login",
                        json={"email": "ann@acme.test", "password": PASSWORD})
    assert again.status_code == 401
    got = client.get(f"/api/v1/keys/{key['id']}", headers=admin.headers).json()
    assert got["status"] == "revoked" and got["name"] == "erased"
    acc = client.get(f"/api/v1/accounts/{account_id}", headers=admin.headers).json()
    assert acc["email"] in (None, "") and acc["display_name"] == ""
    assert acc["login_name"].startswith("erased-") and acc["status"] == "disabled"
    with state.session_factory() as s:
        erasure = s.get(AccountErasure, account_id)
        assert erasure is not None and erasure.state == "control_done"
        assert erasure.pending_encrypted is not None
        assert "ann@acme.test" not in erasure.pending_encrypted
        assert s.scalars(select(AdminSession).where(AdminSession.account_id == account_id)
                         ).all() == []
        assert s.scalars(select(LoginSource).where(LoginSource.account_id == account_id)
                         ).all() == []
        kept = s.scalars(select(TermsAcceptance).where(TermsAcceptance.account_id == account_id))
        assert [(a.org_id, a.source_ip) for a in kept] == [(admin.org_id, "")]
    data_dir = Path(state.settings.data_dir)
    raw = b"".join(p.read_bytes() for p in data_dir.glob("control.db*") if p.is_file())
    for needle in ("ann@acme.test", "+15559998888", "Ann Example", "ann.example",
                   "Ann's laptop", "198.51.100.9"):
        assert needle.encode() not in raw, needle
    twice = client.post(f"/api/v1/accounts/{account_id}/cancel", headers=admin.headers)
    assert twice.status_code == 409


def test_admins_cancel_accounts_of_their_org_only(
    client: TestClient, admin: Admin, other_admin: Admin
) -> None:
    account_id = _member(client, admin, "bob@acme.test", "viewer")
    r = client.post(f"/api/v1/accounts/{account_id}/cancel", headers=other_admin.headers)
    assert r.status_code == 404
    viewer = _login(client, "bob@acme.test")
    r = client.post(f"/api/v1/accounts/{admin.account_id}/cancel", headers=viewer)
    assert r.status_code == 403
    # The last owner cannot go (the org would be left without one).
    last = client.post("/api/v1/me/cancel", json={"password": admin.password},
                       headers=admin.headers)
    assert last.status_code == 409 and last.json()["error"]["code"] == "last_owner"
    ok = client.post(f"/api/v1/accounts/{account_id}/cancel", headers=admin.headers)
    assert ok.status_code == 200


def test_retention_purge(state: AppState) -> None:
    old = utcnow() - timedelta(days=400)
    with state.session_factory() as s:
        s.add(WebhookDelivery(id="whd_old", endpoint_id="e", org_id="o", event_id="v",
                              kind="key_risk", status="delivered", attempts=1, created_at=old))
        s.add(WebhookAttempt(delivery_id="whd_old", attempt=1, status_code=200, latency_ms=1,
                             created_at=old))
        s.add(WebhookDelivery(id="whd_new", endpoint_id="e", org_id="o", event_id="w",
                              kind="key_risk", status="delivered", attempts=1))
        s.add(WebhookDelivery(id="whd_pending", endpoint_id="e", org_id="o", event_id="x",
                              kind="key_risk", status="pending", attempts=1, created_at=old))
        s.add(LoginSource(account_id="acc_x", kind="net", value="192.0.2.0/24",
                          first_seen=old, last_seen=old))
        s.add(LoginSource(account_id="acc_x", kind="ua", value="curl"))
        s.commit()
    result = retention.purge(state.session_factory, state.settings)
    assert result.deliveries == 1 and result.login_sources == 1
    with state.session_factory() as s:
        assert {d.id for d in s.scalars(select(WebhookDelivery))} == {"whd_new", "whd_pending"}
        assert s.scalars(select(WebhookAttempt)).all() == []
        assert [x.kind for x in s.scalars(select(LoginSource))] == ["ua"]


def test_security_log_ttl_clause() -> None:
    clause = clickhouse.security_log_ttl(365, 90, held=False)
    assert clause == (
        "ts + INTERVAL 90 DAY DELETE WHERE startsWith(kind, 'auth.'), ts + INTERVAL 365 DAY"
    )
    assert clickhouse.security_log_ttl(365, 90) == (
        "ts + toIntervalDay(if(startsWith(kind, 'auth.'), 90, 365)) "
        f"DELETE WHERE {clickhouse.NOT_HELD_CONDITION}"
    )


def test_cancelling_an_admin_keeps_keys_it_made_for_others(
    client: TestClient, admin: Admin
) -> None:
    dev_id = _member(client, admin, "dev2@acme.test", "developer")
    admin2_id = _member(client, admin, "admin2@acme.test", "admin")
    h = _login(client, "admin2@acme.test")
    for_dev = client.post("/api/v1/keys", json={"name": "for dev", "owner_id": dev_id},
                          headers=h).json()
    own = client.post("/api/v1/keys", json={"name": "own"}, headers=h).json()
    r = client.post(f"/api/v1/accounts/{admin2_id}/cancel", headers=admin.headers)
    assert r.status_code == 200 and r.json()["keys_revoked"] == 1
    keys = {k["id"]: k for k in client.get("/api/v1/keys", headers=admin.headers).json()["data"]}
    assert keys[for_dev["id"]]["status"] == "active" and keys[for_dev["id"]]["name"] == "for dev"
    assert keys[own["id"]]["status"] == "revoked"


def test_cancellations_are_queued_then_erased_in_one_batch_naming_no_value(
    client: TestClient, admin: Admin, state: AppState, settings: Settings
) -> None:
    """Cancelling queues the ClickHouse part; the worker's batch rewrites several accounts
    with one mutation per table, and neither the mutations ClickHouse keeps nor any file
    of chDB's data path holds an erased value afterwards (real chDB)."""
    tag = secrets.token_hex(4)
    people = []
    for i in range(2):
        p = {
            "email": f"p{i}.{tag}@acme.test", "mobile": f"+1555{i}{int(tag, 16) % 10**6:06d}",
            "name": f"Person{i} Uniq{tag}", "login": f"person{i}.{tag}",
            "ip": f"198.51.100.{10 + i}", "agent": f"Agent{i}/{tag}",
        }
        p["id"] = _member(client, admin, p["email"], "developer", display_name=p["name"],
                          mobile=p["mobile"], login_name=p["login"])
        h = {**_login(client, p["email"]), "user-agent": p["agent"]}
        for name in (p["name"] + " X", p["name"]):  # the name in security_log's detail
            assert client.patch("/api/v1/me", json={"display_name": name},
                                headers=h).status_code == 200
        p["key"] = client.post("/api/v1/keys", json={"name": "k"}, headers=h).json()["id"]
        people.append(p)
    bystander = {"ip": "203.0.113.5", "agent": f"Bystander/{tag}"}
    rows = make_batch("org-erasure", 3)
    rows["account_id"] = [people[0]["id"], people[1]["id"], "acc_bystander"]
    rows["key_id"] = [people[0]["key"], people[1]["key"], "key_bystander"]
    rows["source_ip"] = [people[0]["ip"], people[1]["ip"], bystander["ip"]]
    rows["user_agent"] = [people[0]["agent"], people[1]["agent"], bystander["agent"]]

    ch = open_client(settings)
    chdb_path = Path(settings.data_dir) / "clickhouse"
    try:
        def runner(query: Any) -> Any:
            return query(ch)

        ch.insert(CALL_LOG_TABLE, [rows[c] for c in CALL_LOG_COLUMNS],
                  column_names=list(CALL_LOG_COLUMNS), column_oriented=True)
        events = security_log.current()
        assert events is not None
        events.flush(runner)
        for p in people:
            r = client.post(f"/api/v1/accounts/{p['id']}/cancel", headers=admin.headers)
            assert r.status_code == 200 and r.json()["state"] == "control_done", r.text
        events.flush(runner)

        def mutations() -> list[tuple[str, str]]:
            return [(str(t), str(c)) for t, c in ch.query(
                "SELECT table, command FROM system.mutations WHERE database = 'onetoken' "
                "AND position(command, 'UPDATE') > 0").result_rows]

        # Queued: nothing rewritten on the request path.
        assert mutations() == []
        before = ch.query("SELECT source_ip, user_agent FROM onetoken.call_log").result_rows
        assert len(before) == 3 and (people[0]["ip"], people[0]["agent"]) in before
        assert erasure.complete_pending(state.session_factory, state.secrets, runner) == 2
        assert erasure.complete_pending(state.session_factory, state.secrets, runner) == 0

        done = mutations()
        assert sorted(t for t, _ in done) == ["call_log", "security_log"], done
        erased = [p[f] for p in people for f in ("email", "mobile", "name", "login", "ip",
                                                  "agent")]
        for _, command in done:
            for value in [*erased, *(p["id"] for p in people), *(p["key"] for p in people)]:
                assert value not in command, (value, command)
        after = ch.query(
            "SELECT account_id, source_ip, user_agent FROM onetoken.call_log ORDER BY account_id"
        ).result_rows
        assert sorted(after) == sorted([
            (people[0]["id"], "", ""), (people[1]["id"], "", ""),
            ("acc_bystander", bystander["ip"], bystander["agent"]),
        ])
        events_text = str(ch.query(
            "SELECT groupArray(concat(source_ip, ' ', user_agent, ' ', detail)) "
            "FROM onetoken.security_log").result_rows[0][0])
        assert "[erased]" in events_text
        for value in erased:
            assert value not in events_text, value
        # The prompt cleanup of replaced parts lasted for the batch only.
        for (engine,) in ch.query(
            "SELECT engine_full FROM system.tables WHERE database = 'onetoken' "
            "AND name IN ('call_log', 'security_log')").result_rows:
            assert "old_parts_lifetime = 60" in engine and "cleanup_delay" not in engine
        with state.session_factory() as s:
            for p in people:
                row = s.get(AccountErasure, p["id"])
                assert row is not None and row.state == "done"
                assert row.pending_encrypted is None and row.completed_at is not None
    finally:
        ch.close()
    files = [f for f in chdb_path.rglob("*") if f.is_file()]
    assert len(files) > 10
    for f in files:
        raw = f.read_bytes()
        for value in erased:
            assert value.encode() not in raw, (value, f)
    assert any(bystander["ip"].encode() in f.read_bytes() for f in files)


def test_erasure_worker_runs_at_start_and_when_woken_then_stops() -> None:
    """Queued erasures are picked up at start (left by a stopped server) and soon after
    a cancellation wakes the worker, not at the next hourly retry."""
    runs: list[float] = []

    def run() -> int:
        runs.append(time.monotonic())
        return 1

    worker = erasure.ErasureWorker(run, retry_seconds=3600, gather_seconds=0.05)
    worker.start()
    try:
        wait_until(lambda: len(runs) == 1, 5, 0.01)
        worker.notify()
        wait_until(lambda: len(runs) == 2, 5, 0.01)
        assert worker.completed == 2
    finally:
        worker.stop()
    assert len(runs) == 2
