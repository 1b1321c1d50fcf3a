"""Commercial terms (policy III.2) and org termination at contract end (policy X.4):
operators set the terms and their members read them; a termination exports the org's
data, revokes its keys, anonymizes its members, deletes its callbacks and providers, keeps
its billing records, and resumes after a crash without doing anything twice
(docs/retention.md, "Termination")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select

from onetoken import _core
from onetoken.analytics import clickhouse as ch
from onetoken.analytics.columns import CALL_LOG_READ
from onetoken.analytics.sink import CallLogSink
from onetoken.billing import budgets
from onetoken.billing import service as billing
from onetoken.billing.models import LedgerEntry
from onetoken.billing.reconcile import reconcile
from onetoken.control import build_state
from onetoken.demo import setup_demo
from onetoken.gateway.snapshot import build_snapshot, snapshot_json
from onetoken.gateway.supervisor import engine_config
from onetoken.ingest import caps
from onetoken.ingest.ingestor import Ingestor
from onetoken.keys.models import ApiKey
from onetoken.orgs.models import Account, Org
from onetoken.providers.models import Model, Provider
from onetoken.rights import erasure, termination
from onetoken.rights.models import AccountErasure, OrgTerminationStep
from onetoken.settings import Settings
from onetoken.siem import service as siem
from onetoken.state import AppState
from onetoken.tickets import service as tickets
from onetoken.webhooks.models import WebhookEndpoint
from tests import builders as build
from tests.support import TEST_SECRET
from tests.unit import journal_files
from tests.unit.conftest import Admin, add_account, drained_events
from tests.unit.test_billing_statements import BLANK, micros

REPO = Path(__file__).resolve().parents[2]


def test_operators_set_commercial_terms_members_read_them(
    client: TestClient, state: AppState, operator: Admin, admin: Admin, other_admin: Admin
) -> None:
    url = f"/api/v1/orgs/{admin.org_id}/terms"
    defaults = client.get(url, headers=admin.headers).json()
    assert defaults | {"updated_at": None} == {
        "org_id": admin.org_id, "pool": None, "contract_ref": None, "settlement": "prepaid",
        "price_factor_ppm": 1_000_000, "credit_limit": "0.000000000", "dpa_signed": False,
        "dpa_signed_at": None, "updated_at": None,
    }
    terms = {"contract_ref": "C-2026-014", "settlement": "monthly",
             "price_factor_ppm": 900_000, "credit_limit": "250.000000001",
             "dpa_signed_at": "2026-03-01T00:00:00Z"}
    # The org's own owner cannot set them; an operator can.
    assert client.patch(url, json=terms, headers=admin.headers).status_code == 403
    r = client.patch(url, json=terms, headers=operator.headers)
    assert r.status_code == 200, r.text
    assert r.json()["dpa_signed"] is True
    viewer = add_account(state, client, admin.org_id, "viewer@acme.test", "viewer")
    read = client.get(url, headers=viewer).json()
    assert (read["contract_ref"], read["settlement"], read["price_factor_ppm"]) == (
        "C-2026-014", "monthly", 900_000)
    assert read["dpa_signed_at"].startswith("2026-03-01T00:00:00")
    assert read["credit_limit"] == "250.000000001"
    assert client.get(url, headers=other_admin.headers).status_code == 404
    # One price factor: the billing settings and the engine's snapshot price with it.
    assert client.get("/api/v1/billing/settings", headers=admin.headers).json()[
        "price_factor_ppm"] == 900_000
    # The credit limit: the engine may spend the balance down to minus the limit, and the
    # gateways' shared money cap in Redis is as far above the ledger balance.
    limit = 250_000_000_001
    with state.session_factory() as s:
        billing.credit(s, admin.org_id, kind="grant", amount=7, idempotency_key="g")
        s.commit()
        snap = build_snapshot(s, state.secrets, version=1, spent_marks={})
        assert budgets.org_settings(s, admin.org_id).price_factor_ppm == 900_000
        _, cap = caps.read_caps(s, [admin.org_id, other_admin.org_id])
    orgs = {o["id"]: o for o in snap["orgs"]}
    assert orgs[admin.org_id]["price_factor_ppm"] == 900_000
    assert orgs[admin.org_id]["balance"] == 7 + limit
    assert orgs[other_admin.org_id]["balance"] == 0
    assert cap == {admin.org_id: 7 + limit, other_admin.org_id: 0}
    # Out of range or unknown values are refused on their field.
    for bad, param in (({"settlement": "weekly"}, "settlement"),
                       ({"price_factor_ppm": 10_000_001}, "price_factor_ppm"),
                       ({"credit_limit": "-1"}, "credit_limit"),
                       ({"credit_limit": 5}, "credit_limit")):
        r = client.patch(url, json=bad, headers=operator.headers)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    # Unsigning the agreement is a change like any other; each change is audited.
    client.patch(url, json={"dpa_signed_at": None}, headers=operator.headers)
    assert client.get(url, headers=viewer).json()["dpa_signed"] is False
    changes = [e for e in drained_events() if e["kind"] == "admin.org_terms_changed"]
    assert len(changes) == 2
    first = changes[0]["detail"]
    assert (first["price_factor_ppm.before"], first["price_factor_ppm.after"]) == (
        1_000_000, 900_000)
    assert first["contract_ref.after"] == "C-2026-014"
    assert first["credit_limit.after"] == "250.000000001"
    assert changes[1]["detail"]["changed"] == "dpa_signed_at"


def _org_world(state: AppState, admin: Admin) -> dict[str, Any]:
    """The org of `admin` with a second member, keys, a callback, a provider with a model,
    credit and a ticket-free history; returns what the assertions need."""
    with state.session_factory() as s:
        org = s.get(Org, admin.org_id)
        owner = s.get(Account, admin.account_id)
        assert org is not None and owner is not None
        dev = build.orgs.create_account(s, org.id, "dev@acme.test", build.PASSWORD, "developer")
        s.flush()
        build.api_key(s, state.secrets, org, owner, name="server")
        build.api_key(s, state.secrets, org, dev, name="laptop", owner_id=dev.id)
        up = build.provider(s, state.secrets, org.id, name="own-upstream")
        build.model(s, org.id, up, "acme-private", input_price=1)
        s.add(WebhookEndpoint(
            id="wh_term", org_id=org.id, url_encrypted=state.secrets.encrypt("https://h.test/x"),
            url_display="https://h.test/x", kinds=["balance_low"],
            secret_encrypted=state.secrets.encrypt("s"), created_by=owner.id,
        ))
        billing.credit(s, org.id, kind="grant", amount=5_000_000_000, idempotency_key="t1")
        s.commit()
        return {"org_id": org.id, "members": 2, "ledger": _ledger(state, org.id)}


def _ledger(state: AppState, org_id: str) -> list[tuple[Any, ...]]:
    with state.session_factory() as s:
        return [tuple(r) for r in s.execute(
            select(LedgerEntry.id, LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.created_at)
            .where(LedgerEntry.org_id == org_id).order_by(LedgerEntry.id)
        ).all()]


def _assert_terminated(state: AppState, world: dict[str, Any]) -> None:
    org_id = world["org_id"]
    with state.session_factory() as s:
        org = s.get(Org, org_id)
        assert org is not None and org.status == "terminated"
        keys = s.scalars(select(ApiKey).where(ApiKey.org_id == org_id)).all()
        assert keys and all(k.status == "revoked" for k in keys)
        accounts = s.scalars(select(Account).where(Account.org_id == org_id)).all()
        assert len(accounts) == world["members"]
        assert all(a.login_name.startswith("erased-") and a.email is None
                   and a.password_hash is None for a in accounts)
        assert s.scalar(select(func.count()).select_from(AccountErasure).where(
            AccountErasure.org_id == org_id)) == world["members"]
        for table in (WebhookEndpoint, Provider, Model):
            assert not s.scalars(select(table).where(table.org_id == org_id)).all()
        steps = s.scalars(select(OrgTerminationStep.step).where(
            OrgTerminationStep.org_id == org_id)).all()
        assert sorted(steps) == sorted(termination.STEPS)
        assert billing.balance(s, org_id) == sum(row[2] for row in world["ledger"])
    # Billing records are kept as they were.
    assert _ledger(state, org_id) == world["ledger"]


def test_operator_terminates_an_org_once_through_the_api(
    client: TestClient, state: AppState, operator: Admin, admin: Admin, other_admin: Admin
) -> None:
    world = _org_world(state, admin)
    with state.session_factory() as s:
        siem.save(s, admin.org_id, host="1.1.1.1", port=6514, ca_pem=None, enabled=True,
                  allow=())
        s.commit()
    app = client.post("/api/v1/applications", json={"name": "crm", "limits": {"rpm": 5}},
                      headers=admin.headers)
    assert app.status_code == 201, app.text
    url = f"/api/v1/orgs/{admin.org_id}/terminate"
    # Nobody but an operator, and never the operators' own org.
    assert client.post(url, json={"reason": "x"}, headers=admin.headers).status_code == 403
    assert client.post(url, json={"reason": "x"}, headers=other_admin.headers).status_code == 403
    own = client.post(f"/api/v1/orgs/{operator.org_id}/terminate", json={"reason": "x"},
                      headers=operator.headers)
    assert own.status_code == 409 and own.json()["error"]["code"] == "operator_org"

    r = client.post(url, json={"reason": "contract C-1 ended"}, headers=operator.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ran"] == list(termination.STEPS) and body["completed_at"]
    assert body["steps"]["keys_revoked"] == {"keys": 2}
    assert body["steps"]["members_anonymized"] == {"accounts": 2}
    _assert_terminated(state, world)

    exported = Path(body["export_path"])
    assert exported.parent == state.settings.data_dir / "exports"
    assert oct(exported.stat().st_mode & 0o777) == "0o600"
    plain = termination.open_export(exported.read_bytes(), state.settings.secret_key_bytes())
    document = json.loads(plain)
    assert document["format"] == termination.EXPORT_FORMAT
    # Taken before anything was removed: the members as they were, no secret anywhere.
    assert sorted(a["account"]["email"] for a in document["accounts"]) == [
        "dev@acme.test", "owner@acme.test"]
    assert [k["status"] for k in document["keys"]] == ["active", "active"]
    assert [p["name"] for p in document["providers"]] == ["own-upstream"]
    assert [(a["name"], a["limits"]["rpm"]) for a in document["applications"]] == [("crm", 5)]
    assert document["webhooks"][0]["url"] == "https://h.test/x"
    assert document["siem_destination"]["host"] == "1.1.1.1"
    assert document["billing"]["ledger"][0]["amount"] == "5.000000000"
    assert "secret" not in plain.decode().lower().replace("secret_", "")

    # Members are signed out; the org cannot be re-enabled; a second run does nothing.
    assert client.get("/api/v1/org", headers=admin.headers).status_code == 401
    again = client.patch(f"/api/v1/orgs/{admin.org_id}", json={"status": "active"},
                         headers=operator.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "org_terminated"
    rerun = client.post(url, json={"reason": "again"}, headers=operator.headers).json()
    assert rerun["ran"] == [] and rerun["steps"] == body["steps"]
    status = client.get(f"/api/v1/orgs/{admin.org_id}/termination", headers=operator.headers)
    assert status.json()["steps"] == body["steps"]
    assert [e["detail"]["steps"] for e in drained_events()
            if e["kind"] == "admin.org_terminated"] == [",".join(termination.STEPS)]
    _assert_terminated(state, world)


def _cli(settings: Settings, *args: str, exit_after: str | None = None) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONETOKEN_")}
    env |= {
        "ONETOKEN_DATA_DIR": str(settings.data_dir),
        "ONETOKEN_DATABASE_URL": str(settings.database_url),
        "ONETOKEN_SECRET_KEY": TEST_SECRET,
        "PYTHONPATH": str(REPO / "python"),
    }
    if exit_after:
        env[termination.EXIT_AFTER_ENV] = exit_after
    return subprocess.run(
        [sys.executable, "-m", "onetoken", *args], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )


def test_a_termination_killed_half_way_resumes_without_doing_anything_twice(
    client: TestClient, state: AppState, settings: Settings, admin: Admin, tmp_path: Path
) -> None:
    world = _org_world(state, admin)
    planted = f"PLANTED-TICKET-{uuid.uuid4().hex}"
    with state.session_factory() as s:
        tickets.create(s, org_id=admin.org_id, opened_by=admin.account_id, subject="Invoice",
                       category="billing", description=f"Our reference is {planted}.")
        s.commit()
    target = tmp_path / "handover" / "acme.json.sealed"
    first = _cli(settings, "orgs", "terminate", "Acme", "--reason", "contract C-1 ended",
                 "--export", str(target), exit_after="members_anonymized")
    assert first.returncode == 75, first.stderr
    with state.session_factory() as s:
        half = termination.status(s, world["org_id"])
        assert half is not None and half.completed_at is None
        assert list(half.steps) == ["export", "keys_revoked", "members_anonymized"]
        org = s.get(Org, world["org_id"])
        assert org is not None and org.status == "active"
        assert s.scalars(select(WebhookEndpoint).where(
            WebhookEndpoint.org_id == world["org_id"])).all()
    exported = target.read_bytes()
    # Sealed at rest (policy X.4 keeps the hand-over's ticket content off the disk in
    # clear); the decrypt command gives it back, and refuses another secret or a change.
    assert exported.startswith(b"ONETOKEN-EXPORT\n") and planted.encode() not in exported
    clear = tmp_path / "handover" / "acme.json"
    opened = _cli(settings, "orgs", "decrypt-export", str(target), "--out", str(clear))
    assert opened.returncode == 0, opened.stderr
    assert oct(clear.stat().st_mode & 0o777) == "0o600"
    document = json.loads(clear.read_text())
    assert any(planted in t["description"] for a in document["accounts"]
               for t in a["tickets"]), "the ticket's content is in the export"
    again = _cli(settings, "orgs", "decrypt-export", str(target), "--out", str(clear))
    assert again.returncode != 0 and "exists" in again.stderr
    tampered = tmp_path / "tampered.sealed"
    tampered.write_bytes(exported[:-1] + bytes([exported[-1] ^ 1]))
    refused = _cli(settings, "orgs", "decrypt-export", str(tampered), "--out", "-")
    assert refused.returncode != 0 and planted not in refused.stdout

    second = _cli(settings, "orgs", "terminate", world["org_id"], "--reason", "resumed",
                  "--json")
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout)
    assert out["ran"] == ["webhooks_deleted", "providers_deleted", "terminated"]
    # The first run's choices hold: the same export, untouched; counts as the first run did.
    assert out["export_path"] == str(target.resolve())
    assert target.read_bytes() == exported
    assert out["steps"]["keys_revoked"] == {"keys": 2}
    assert out["steps"]["members_anonymized"] == {"accounts": 2}
    _assert_terminated(state, world)
    # The CLI's runs are in the security log (spooled for the server to store).
    recorded = "".join(p.read_text() for p in settings.spool_dir.glob("seclog-*.jsonl"))
    assert recorded.count("admin.org_terminated") == 1
    third = termination.terminate(state, world["org_id"], reason="x", requested_by=None)
    assert third.ran == ()
    _assert_terminated(state, world)


@dataclass
class _Runtime:
    """What the control API reads call_log through, as a running server has it."""

    sink: CallLogSink

    def push_snapshot(self) -> None:
        return None


def test_billing_reconciles_to_zero_after_termination_and_its_erasure(
    client: TestClient, state: AppState, operator: Admin, admin: Admin,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    world = _org_world(state, admin)
    org_id = world["org_id"]
    with state.session_factory() as s:
        key = s.scalars(select(ApiKey).where(ApiKey.org_id == org_id)).first()
        assert key is not None
        key_id = key.id
    now = datetime.now(UTC)
    calls = [
        {**BLANK, **journal_files.record(f"t{n}", org_id=org_id, cost=cost, key_id=key_id,
                                         ts_us=micros(now - timedelta(minutes=n))),
         "account_id": admin.account_id, "source_ip": "203.0.113.7", "user_agent": "ua-test"}
        for n, cost in enumerate((1_000_000_007, 5, 333))
    ]
    ch_client = ch.open_client(Settings(data_dir=tmp_path_factory.mktemp("term-ch")))
    try:
        sink = CallLogSink(state.settings, client=ch_client)
        state.settings.ensure_dirs()
        ingestor = Ingestor(state.settings, state.session_factory, sink=sink)
        journal_files.append(state.settings.spool_dir, "term", 1, calls)
        journal_files.dead(state.settings.spool_dir, "term")
        assert ingestor.catch_up() == len(calls)
        world["ledger"] = _ledger(state, org_id)
        state.runtime = _Runtime(sink)  # type: ignore[assignment]

        def differences() -> list[tuple[int, int]]:
            with state.session_factory() as s:
                lines = [r for r in reconcile(s, ch_client) if r.org_id == org_id]
            assert sum(r.ledger_usage for r in lines) == 1_000_000_345
            return [(r.difference, r.calls_difference) for r in lines if r.difference
                    or r.calls_difference]

        assert differences() == []
        r = client.post(f"/api/v1/orgs/{org_id}/terminate", json={"reason": "contract ended"},
                        headers=operator.headers)
        assert r.status_code == 200, r.text
        # With ClickHouse at hand the export carries the members' call statistics.
        document = json.loads(termination.open_export(
            Path(r.json()["export_path"]).read_bytes(), state.settings.secret_key_bytes()))
        owner = next(a for a in document["accounts"] if a["account"]["id"] == admin.account_id)
        assert sum(row["calls"] for row in owner["call_statistics"]) == len(calls)
        # The queued ClickHouse part of the members' erasure: addresses go, costs stay.
        assert erasure.complete_pending(state.session_factory, state.secrets, sink.read) == 2
        assert differences() == []
        left = ch_client.query(
            f"SELECT count() FROM {CALL_LOG_READ} FINAL WHERE org_id = {{o:String}} "  # noqa: S608
            "AND (source_ip != '' OR user_agent != '')", parameters={"o": org_id},
        ).result_rows[0][0]
        assert left == 0
        _assert_terminated(state, world)
    finally:
        state.runtime = None
        ch_client.close()


def test_the_engine_lets_a_balance_go_below_zero_by_the_credit_limit_and_no_further(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", secret_key=SecretStr(TEST_SECRET),
                        gateway_listen="127.0.0.1:0", upstream_private_cidrs="127.0.0.0/8")
    settings.ensure_dirs()
    state = build_state(settings)
    mock = _core.MockUpstream("127.0.0.1:0")
    demo = setup_demo(state.session_factory, state.secrets, mock.start())
    with state.session_factory() as s:
        # Spent to zero: from here on every request is on credit.
        left = billing.balance(s, demo.org_id)
        billing.credit(s, demo.org_id, kind="adjustment", amount=-left, idempotency_key="zero")
        s.commit()
    engine = _core.Engine(orjson.dumps(engine_config(settings, state.secrets)))
    address = engine.start()

    def with_limit(limit: int) -> None:
        with state.session_factory() as s:
            budgets.update_org_settings(s, demo.org_id, credit_limit=limit)
            s.commit()
            engine.load_snapshot(snapshot_json(build_snapshot(
                s, state.secrets, version=time.time_ns(), spent_marks={})))

    def ask(http: httpx.Client) -> httpx.Response:
        return http.post("/v1/chat/completions",
                         headers={"Authorization": f"Bearer {demo.api_key}"},
                         json={"model": "demo-chat", "max_tokens": 16,
                               "messages": [{"role": "user", "content": "hi"}]})

    try:
        with httpx.Client(base_url=f"http://{address}", timeout=10) as http:
            with_limit(0)
            refused = ask(http)
            assert refused.status_code == 402, refused.text
            assert refused.json()["error"]["code"] == "insufficient_balance"
            with_limit(10**12)
            assert ask(http).status_code == 200
            one = engine.org_spend()[demo.org_id][0]
            assert one > 0
            # Room for a few more requests below zero, then refusals.
            limit = one * 4 + one // 2
            with_limit(limit)
            answers = [ask(http).status_code for _ in range(12)]
            assert 200 in answers and answers[-1] == 402, answers
            assert set(answers) == {200, 402}
            spent, reserved = engine.org_spend()[demo.org_id]
            assert reserved == 0 and one < spent <= limit
    finally:
        engine.stop(5)
        mock.stop()
        state.db_engine.dispose()


def test_two_terminations_at_once_do_each_step_once(state: AppState, admin: Admin) -> None:
    """Two operators (or a retried request) at the same moment: each step is done by one
    of them, the other finds it done, and neither fails."""
    world = _org_world(state, admin)
    barrier = threading.Barrier(2)
    results: list[termination.TerminationResult] = []
    errors: list[BaseException] = []

    def run(reason: str) -> None:
        barrier.wait()
        try:
            results.append(termination.terminate(state, world["org_id"], reason=reason,
                                                 requested_by=None))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    ran = sorted(step for r in results for step in r.ran)
    assert ran == sorted(termination.STEPS)
    assert results[0].steps["keys_revoked"] == {"keys": 2}
    assert results[0].steps["members_anonymized"] == {"accounts": 2}
    _assert_terminated(state, world)
