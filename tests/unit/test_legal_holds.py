"""Legal holds (docs/retention.md, "Legal holds"): placed and lifted by operators, audited
and read by the org; while one stands, ClickHouse's TTLs (real chDB), the control-DB purge
and account cancellation keep the held org's records, and all resume once it ends."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from onetoken.analytics import clickhouse as ch
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.db.base import utcnow
from onetoken.orgs.models import Account
from onetoken.rights import erasure, holds, retention
from onetoken.rights.models import AccountErasure
from onetoken.security.log import SECURITY_LOG_COLUMNS
from onetoken.security.models import LoginSource
from onetoken.settings import Settings
from onetoken.state import AppState
from onetoken.tickets.models import Ticket
from onetoken.webhooks.models import WebhookDelivery
from tests.support import wait_until
from tests.unit.conftest import accept_terms

from .conftest import Admin, drained_events, make_org_admin
from .test_analytics_sink import make_batch

POOL_DB = "onetoken_hold"
DAY_US = 86_400 * 1_000_000


def _in_a_week() -> str:
    return (utcnow() + timedelta(days=7)).isoformat()


def _place(client: TestClient, operator: Admin, org_id: str, **body: Any) -> Any:
    return client.post(f"/api/v1/orgs/{org_id}/holds",
                       json={"reason": "Case 2026-114", "expires_at": _in_a_week(), **body},
                       headers=operator.headers)


def test_operators_place_and_lift_holds_audited_and_read_by_the_org(
    client: TestClient, admin: Admin, operator: Admin
) -> None:
    drained_events()
    # Tenants cannot hold, not even their own org.
    assert _place(client, admin, admin.org_id).status_code == 403
    past = _place(client, operator, admin.org_id,
                  expires_at=(utcnow() - timedelta(minutes=1)).isoformat())
    assert past.status_code == 400 and past.json()["error"]["code"] == "invalid_expiry"
    assert _place(client, operator, "org_missing").status_code == 404
    r = _place(client, operator, admin.org_id)
    assert r.status_code == 201, r.text
    hold = r.json()
    assert hold["state"] == "standing" and hold["placed_by"] == operator.account_id

    seen = client.get("/api/v1/org/holds", headers=admin.headers).json()
    assert seen["held"] is True
    assert [(h["id"], h["reason"]) for h in seen["data"]] == [(hold["id"], "Case 2026-114")]
    assert client.get(f"/api/v1/orgs/{admin.org_id}/holds",
                      headers=admin.headers).status_code == 403

    lifted = client.post(f"/api/v1/orgs/{admin.org_id}/holds/{hold['id']}/lift",
                         headers=operator.headers)
    assert lifted.status_code == 200 and lifted.json()["state"] == "lifted"
    again = client.post(f"/api/v1/orgs/{admin.org_id}/holds/{hold['id']}/lift",
                        headers=operator.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "hold_ended"
    assert client.get("/api/v1/org/holds", headers=admin.headers).json()["held"] is False

    trail = [(e["kind"], e["org_id"], e["actor_id"], e["detail"].get("hold_id"))
             for e in drained_events() if e["kind"].startswith("legal_hold.")]
    assert trail == [
        ("legal_hold.placed", admin.org_id, operator.account_id, hold["id"]),
        ("legal_hold.lifted", admin.org_id, operator.account_id, hold["id"]),
    ]
    # The reason is the operator's free text: kept with the hold, not in the log.
    assert "Case 2026-114" not in str(trail)


def _materialize_ttl(client: Any, table: str) -> None:
    """Apply the TTL now, as a background TTL merge would."""
    database, name = table.split(".")
    client.command(f"ALTER TABLE {table} MATERIALIZE TTL SETTINGS mutations_sync = 0")

    def done() -> bool:
        pending = client.query(
            "SELECT count(), any(latest_fail_reason) FROM system.mutations "
            "WHERE database = {d:String} AND table = {t:String} AND NOT is_done",
            parameters={"d": database, "t": name}).result_rows[0]
        return int(pending[0]) == 0

    wait_until(done, timeout=30)


def _rows(client: Any, table: str) -> dict[str, int]:
    return {str(o): int(n) for o, n in client.query(
        f"SELECT org_id, count() FROM {table} GROUP BY org_id"  # noqa: S608
    ).result_rows}


def test_ttl_purge_skips_held_orgs_rows_and_resumes_after_the_hold(
    client: TestClient, state: AppState, settings: Settings, admin: Admin, operator: Admin
) -> None:
    """Every TTL (each call_log, its rollup, security_log with both its rules) keeps the
    expired rows of a held org while purging the others', and purges them once the hold
    is lifted: forced with MATERIALIZE TTL in real chDB."""
    held, free = admin.org_id, "org_free"
    ch_client = open_client(settings)
    try:
        ch.ensure_pool_database(ch_client, POOL_DB, settings.call_log_ttl_days)
        # Idempotent: every TTL already carries the hold condition.
        assert ch.set_ttl_days(ch_client, "onetoken.call_log", settings.call_log_ttl_days) is False
        assert ch.ensure_security_log_ttl(
            ch_client, settings.security_log_ttl_days, settings.login_records_ttl_days) is False

        def runner(query: Any) -> Any:
            return query(ch_client)

        # Held before its rows expire: rows already past their TTL are purged by the next
        # background merge, which may come right after the insert.
        hold = _place(client, operator, held).json()
        # The API synced the hold on placing it when it could; the worker's pass does it
        # here (no gateway in this test), and a second pass has nothing to write.
        assert holds.sync_clickhouse(state.session_factory, runner) == 1
        assert holds.sync_clickhouse(state.session_factory, runner) == 0

        old = int(time.time() * 1_000_000) - 400 * DAY_US
        recent = int(time.time() * 1_000_000) - DAY_US
        call_logs = [f"{db}.call_log" for db in ("onetoken", POOL_DB)]
        for table in call_logs:
            for org in (held, free):
                for ts0, tag in ((old, "old"), (recent, "new")):
                    rows = make_batch(org, 2, ts0=ts0)
                    rows["request_id"] = [f"{r}-{tag}" for r in rows["request_id"]]
                    ch_client.insert(table, [rows[c] for c in CALL_LOG_COLUMNS],
                                     column_names=list(CALL_LOG_COLUMNS), column_oriented=True)
        events = []
        for org in (held, free):
            for ts, kind in ((old, "key.created"), (old, "auth.login_failed"),
                             (recent, "key.created")):
                events.append([ts, f"ev-{org}-{kind}-{ts}", kind, "info", org, "a", "s", "",
                               "", "{}"])
        ch_client.insert("onetoken.security_log", events,
                         column_names=list(SECURITY_LOG_COLUMNS))

        tables = [*call_logs, *(t.replace("call_log", "call_stats_1m") for t in call_logs),
                  "onetoken.security_log"]

        def purge_now() -> dict[str, dict[str, int]]:
            for table in tables:
                _materialize_ttl(ch_client, table)
            return {t: _rows(ch_client, t) for t in tables}

        kept = purge_now()
        for table in call_logs:
            # The held org keeps its expired calls; the other keeps only its recent ones.
            assert kept[table] == {free: 2, held: 4}, table
        for table in tables[2:4]:
            assert kept[table][held] > kept[table][free], table
        assert kept["onetoken.security_log"] == {free: 1, held: 3}

        client.post(f"/api/v1/orgs/{held}/holds/{hold['id']}/lift", headers=operator.headers)
        assert holds.sync_clickhouse(state.session_factory, runner) == 1
        purged = purge_now()
        for table in call_logs:
            assert purged[table] == {free: 2, held: 2}, table
        for table in tables[2:4]:
            assert purged[table][held] == purged[table][free], table
        assert purged["onetoken.security_log"] == {free: 1, held: 1}
    finally:
        ch_client.close()


def test_an_expired_hold_stops_protecting_without_the_control_process(
    state: AppState, settings: Settings
) -> None:
    """The table of holds carries their expiry: ClickHouse lets an expired hold go by
    itself, even if no sync follows."""
    ch_client = open_client(settings)
    try:
        soon = utcnow() + timedelta(seconds=3)
        ch.sync_legal_holds(ch_client, [("hold_x", "org_x", soon)])
        old = int(time.time() * 1_000_000) - 400 * DAY_US
        rows = make_batch("org_x", 1, ts0=old)
        ch_client.insert("onetoken.call_log", [rows[c] for c in CALL_LOG_COLUMNS],
                         column_names=list(CALL_LOG_COLUMNS), column_oriented=True)

        def purge_now() -> dict[str, int]:
            _materialize_ttl(ch_client, "onetoken.call_log")
            return _rows(ch_client, "onetoken.call_log")

        assert purge_now() == {"org_x": 1}
        while utcnow() <= soon:
            time.sleep(0.1)
        assert purge_now() == {}
    finally:
        ch_client.close()


def test_control_db_purge_and_cancellation_wait_for_the_hold(
    client: TestClient, state: AppState, admin: Admin, operator: Admin
) -> None:
    other = make_org_admin(state, client, "Globex", "admin@globex.test", role="admin")
    old = utcnow() - timedelta(days=400)
    password = "another long password"
    r = client.post("/api/v1/accounts", json={"email": "ann@acme.test", "role": "developer",
                                              "password": password, "display_name": "Ann"},
                    headers=admin.headers)
    ann = r.json()["id"]
    with state.session_factory() as s:
        for org, who in ((admin.org_id, ann), (other.org_id, other.account_id)):
            s.add(WebhookDelivery(id=f"whd_{org}", endpoint_id="e", org_id=org, event_id="v",
                                  kind="key_risk", status="delivered", attempts=1,
                                  created_at=old))
            s.add(LoginSource(account_id=who, kind="net", value="192.0.2.0/24",
                              first_seen=old, last_seen=old))
            s.add(Ticket(id=f"tic_{org}", org_id=org, opened_by=who, subject="s",
                         category="other", description="d", status="closed", created_at=old,
                         updated_at=old, last_message_at=old, closed_at=old))
        s.commit()
    hold = _place(client, operator, admin.org_id).json()

    result = retention.purge(state.session_factory, state.settings)
    assert (result.deliveries, result.login_sources, result.tickets) == (1, 1, 1)
    with state.session_factory() as s:
        assert [d.org_id for d in s.scalars(select(WebhookDelivery))] == [admin.org_id]
        assert [t.org_id for t in s.scalars(select(Ticket))] == [admin.org_id]
        assert [x.account_id for x in s.scalars(
            select(LoginSource).where(LoginSource.value == "192.0.2.0/24"))] == [ann]

    # Cancelling under the hold: signed out and disabled, keys revoked, nothing erased.
    h = {"Authorization": "Bearer " + client.post(
        "/api/v1/auth/login", json={"email": "ann@acme.test", "password": password}
    ).json()["access_token"]}
    accept_terms(client, h)
    key = client.post("/api/v1/keys", json={"name": "Ann's laptop"}, headers=h).json()
    r = client.post(f"/api/v1/accounts/{ann}/cancel", headers=admin.headers)
    assert r.status_code == 200 and r.json()["state"] == "held", r.text
    assert client.get("/api/v1/me", headers=h).status_code == 401
    got = client.get(f"/api/v1/keys/{key['id']}", headers=admin.headers).json()
    assert got["status"] == "revoked" and got["name"] == "Ann's laptop"
    secrets_, store = state.secrets, state.settings.ticket_store_dir
    assert erasure.resume_held(state.session_factory, secrets_, store) == 0
    with state.session_factory() as s:
        account = s.get(Account, ann)
        assert account is not None and account.email == "ann@acme.test"
        assert account.status == "disabled"
        row = s.get(AccountErasure, ann)
        assert row is not None and row.state == "held" and row.pending_encrypted is None

    client.post(f"/api/v1/orgs/{admin.org_id}/holds/{hold['id']}/lift",
                headers=operator.headers)
    assert erasure.resume_held(state.session_factory, secrets_, store) == 1
    with state.session_factory() as s:
        account = s.get(Account, ann)
        assert account is not None and account.email is None
        assert account.login_name.startswith("erased-")
        row = s.get(AccountErasure, ann)
        assert row is not None and row.state == "control_done" and row.pending_encrypted
        assert s.scalars(select(LoginSource).where(LoginSource.account_id == ann)).all() == []
    assert client.get(f"/api/v1/keys/{key['id']}", headers=admin.headers).json()["name"] == (
        "erased")
    result = retention.purge(state.session_factory, state.settings)
    assert (result.deliveries, result.tickets) == (1, 1)
