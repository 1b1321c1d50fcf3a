"""Incident handling over the security log: who may handle which events (an org's admins
their own, operators every org's; anyone else's is a 404), the status flow, the
append-only history, the timeline's order, notes that cannot carry content, the audit of
the handling itself, and concurrent steps. The events are real rows of (embedded)
ClickHouse; the control DB is SQLite, or PostgreSQL when ONETOKEN_TEST_POSTGRES_URL is set
(conftest)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from onetoken.analytics.clickhouse import open_client
from onetoken.db.base import utcnow
from onetoken.incidents import service as incidents
from onetoken.incidents.models import NOTE_MAX_CHARS, Incident, IncidentEvent, IncidentHistory
from onetoken.kit import crypto
from onetoken.orgs.models import Account
from onetoken.rights import retention
from onetoken.security import log as security_log
from onetoken.security.log import SecurityEvent
from onetoken.security.principal import Principal
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.support import TEST_SECRET
from tests.unit.conftest import Admin, add_account

API = "/api/v1/security"


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One chDB engine for the module (opening one costs seconds and memory)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("incidents-ch"),
                        secret_key=SecretStr(TEST_SECRET))
    client = open_client(settings)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _log_reader(client: TestClient, ch: Client) -> None:
    client.app.state.security_log_runner = lambda query: query(ch)  # type: ignore[attr-defined]


def _event(org_id: str, kind: str = "calls.rate_anomaly", severity: str = "high",
           ts: datetime | None = None) -> str:
    event = SecurityEvent(kind=kind, severity=severity,  # type: ignore[arg-type]
                          org_id=org_id, subject_id="key_0123",
                          detail={"requests": 4200},
                          **({"ts": ts} if ts is not None else {}))
    security_log.record(event)
    return event.event_id


def _ok(r: Any, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return dict(r.json())


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return dict(body["error"])


def _ack_event(client: TestClient, who: Admin, event_id: str) -> dict[str, Any]:
    return _ok(client.post(f"{API}/events/{event_id}/acknowledge", headers=who.headers))


# -- the status flow and its history -----------------------------------------------------------


def test_an_acknowledged_event_is_an_incident_handled_to_its_resolution(
    client: TestClient, admin: Admin
) -> None:
    event_id = _event(admin.org_id)
    inc = _ack_event(client, admin, event_id)
    assert inc["status"] == "acknowledged" and inc["org_id"] == admin.org_id
    assert inc["severity"] == "high" and inc["event_count"] == 1
    assert inc["opened_by"] == admin.account_id and inc["acknowledged_at"]
    iid = inc["id"]
    # The event's handling state is found from the event.
    assert _ok(client.get(f"{API}/events/{event_id}/incident", headers=admin.headers))["id"] == iid

    assigned = _ok(client.post(f"{API}/incidents/{iid}/assign",
                               json={"assignee_id": admin.account_id}, headers=admin.headers))
    assert assigned["assignee_id"] == admin.account_id
    note = _ok(client.post(f"{API}/incidents/{iid}/notes",
                           json={"text": "Key rotated; customer told by phone."},
                           headers=admin.headers), 201)
    assert note["action"] == "noted" and note["actor_id"] == admin.account_id
    done = _ok(client.post(f"{API}/incidents/{iid}/resolve", json={"resolution": "mitigated"},
                           headers=admin.headers))
    assert done["status"] == "resolved" and done["resolution"] == "mitigated"
    assert done["resolved_at"]

    detail = _ok(client.get(f"{API}/incidents/{iid}", headers=admin.headers))
    assert [e["event_id"] for e in detail["events"]] == [event_id]
    history = detail["history"]
    assert [h["action"] for h in history] == [
        "opened", "acknowledged", "assigned", "noted", "resolved"]
    assert [h["status"] for h in history] == [
        "open", "acknowledged", "acknowledged", "acknowledged", "resolved"]
    assert {h["actor_id"] for h in history} == {admin.account_id}
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)
    assert history[3]["note"] == "Key rotated; customer told by phone."

    listed = _ok(client.get(f"{API}/incidents", params={"status": "resolved"},
                            headers=admin.headers))
    assert [i["id"] for i in listed["data"]] == [iid]


def test_steps_out_of_order_are_refused_and_leave_no_trace(
    client: TestClient, admin: Admin
) -> None:
    first, second = _event(admin.org_id, severity="medium"), _event(admin.org_id)
    inc = _ok(client.post(f"{API}/incidents", json={"event_ids": [first, second]},
                          headers=admin.headers), 201)
    iid = inc["id"]
    assert inc["status"] == "open" and inc["severity"] == "high" and inc["event_count"] == 2

    def step(path: str, body: dict[str, Any] | None = None) -> Any:
        return client.post(f"{API}/incidents/{iid}/{path}", json=body or {},
                           headers=admin.headers)

    _error(step("resolve", {"resolution": "fixed"}), 409, "invalid_transition")  # not taken
    _error(step("reopen"), 409, "invalid_transition")
    _ok(step("acknowledge"))
    _error(step("acknowledge"), 409, "invalid_transition")
    _error(step("reopen"), 409, "invalid_transition")
    _error(step("resolve", {"resolution": "shrugged"}), 422, "invalid_value")
    _ok(step("resolve", {"resolution": "false_positive"}))
    _error(step("resolve", {"resolution": "fixed"}), 409, "invalid_transition")
    _error(step("assign", {"assignee_id": admin.account_id}), 409, "invalid_transition")
    _error(step("events", {"event_ids": [_event(admin.org_id)]}), 409, "invalid_transition")
    # Acknowledging an event of a resolved incident is a step on that incident: refused.
    _error(client.post(f"{API}/events/{first}/acknowledge", headers=admin.headers), 409,
           "invalid_transition")
    reopened = _ok(step("reopen"))
    assert reopened["status"] == "acknowledged" and reopened["resolution"] is None
    # An event already in an incident is not grouped into a second one.
    _error(client.post(f"{API}/incidents", json={"event_ids": [second]}, headers=admin.headers),
           409, "event_already_handled")

    history = _ok(client.get(f"{API}/incidents/{iid}", headers=admin.headers))["history"]
    assert [h["action"] for h in history] == ["opened", "acknowledged", "resolved", "reopened"]


def test_the_history_is_append_only(client: TestClient, admin: Admin, state: AppState) -> None:
    iid = _ack_event(client, admin, _event(admin.org_id))["id"]

    def rows() -> list[tuple[Any, ...]]:
        with state.session_factory() as s:
            return [(h.id, h.at, h.actor_id, h.action, h.status, h.assignee_id, h.resolution,
                     h.event_count, h.note)
                    for h in s.scalars(select(IncidentHistory)
                                       .where(IncidentHistory.incident_id == iid)
                                       .order_by(IncidentHistory.id))]

    seen = rows()
    for path, body in (("assign", {"assignee_id": admin.account_id}),
                       ("notes", {"text": "Paged the on-call."}),
                       ("assign", {"assignee_id": None}),
                       ("resolve", {"resolution": "fixed"}),
                       ("reopen", {})):
        r = client.post(f"{API}/incidents/{iid}/{path}", json=body, headers=admin.headers)
        assert r.status_code < 300, r.text
        now = rows()
        assert len(now) == len(seen) + 1 and now[: len(seen)] == seen  # earlier rows intact
        seen = now
    assert [r[3] for r in seen] == ["opened", "acknowledged", "assigned", "noted",
                                    "unassigned", "resolved", "reopened"]


# -- scope -------------------------------------------------------------------------------------


def test_another_orgs_admin_cannot_see_or_touch_the_orgs_events_or_incidents(
    client: TestClient, admin: Admin, other_admin: Admin, state: AppState
) -> None:
    event_id = _event(admin.org_id)
    spare = _event(admin.org_id)
    iid = _ack_event(client, admin, event_id)["id"]
    h = other_admin.headers

    for method, path, body in (
        ("GET", f"/incidents/{iid}", None),
        ("GET", f"/incidents/{iid}/timeline", None),
        ("POST", f"/incidents/{iid}/acknowledge", {}),
        ("POST", f"/incidents/{iid}/assign", {"assignee_id": other_admin.account_id}),
        ("POST", f"/incidents/{iid}/notes", {"text": "mine now"}),
        ("POST", f"/incidents/{iid}/resolve", {"resolution": "fixed"}),
        ("POST", f"/incidents/{iid}/reopen", {}),
        ("POST", f"/incidents/{iid}/events", {"event_ids": [spare]}),
        ("GET", f"/events/{event_id}/incident", None),
        ("POST", f"/events/{event_id}/acknowledge", None),
        ("POST", f"/events/{spare}/acknowledge", None),
        ("POST", "/incidents", {"event_ids": [spare]}),
    ):
        r = client.request(method, f"{API}{path}", headers=h,
                           **({"json": body} if body is not None else {}))
        _error(r, 404, "not_found")
        assert admin.org_id not in r.text and iid not in r.text
    # Their own org's event cannot bring the other org's along either.
    own = _event(other_admin.org_id)
    _error(client.post(f"{API}/incidents", json={"event_ids": [own, spare]}, headers=h),
           404, "not_found")
    assert _ok(client.get(f"{API}/incidents", headers=h))["data"] == []
    _error(client.get(f"{API}/incidents", params={"org_id": admin.org_id}, headers=h),
           404, "not_found")

    # Nothing they tried left a step behind.
    with state.session_factory() as s:
        actors = set(s.scalars(select(IncidentHistory.actor_id)))
    assert other_admin.account_id not in actors

    # Roles without security.handle are refused by the matrix, within their own org.
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    r = client.post(f"{API}/incidents/{iid}/notes", json={"text": "x"}, headers=dev)
    _error(r, 403, "permission_denied")


def test_operators_handle_every_org_and_platform_events_are_theirs_alone(
    client: TestClient, admin: Admin, other_admin: Admin, operator: Admin
) -> None:
    iid = _ack_event(client, admin, _event(admin.org_id))["id"]
    r = client.post(f"{API}/incidents/{iid}/notes", json={"text": "Platform looked too."},
                    headers=operator.headers)
    _ok(r, 201)
    # Events of two orgs never make one incident.
    _error(client.post(f"{API}/incidents",
                       json={"event_ids": [_event(admin.org_id), _event(other_admin.org_id)]},
                       headers=operator.headers), 422, "events_span_orgs")

    platform = _event("", kind="system.upstream_failing")
    _error(client.post(f"{API}/events/{platform}/acknowledge", headers=admin.headers),
           404, "not_found")
    pinc = _ack_event(client, operator, platform)
    assert pinc["org_id"] is None
    _error(client.get(f"{API}/incidents/{pinc['id']}", headers=admin.headers), 404, "not_found")
    every = _ok(client.get(f"{API}/incidents", headers=operator.headers))["data"]
    assert {i["id"] for i in every} >= {iid, pinc["id"]}
    mine = _ok(client.get(f"{API}/incidents", headers=admin.headers))["data"]
    assert [i["id"] for i in mine] == [iid]


def test_assignees_are_accounts_that_may_handle_the_incident(
    client: TestClient, admin: Admin, other_admin: Admin, operator: Admin, state: AppState
) -> None:
    iid = _ack_event(client, admin, _event(admin.org_id))["id"]
    with state.session_factory() as s:
        ids = {a.login_name: a.id for a in s.scalars(select(Account))}
    add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    add_account(state, client, admin.org_id, "second@acme.test", "admin")
    with state.session_factory() as s:
        by_email = {a.email: a for a in s.scalars(select(Account))}
        developer, second = by_email["dev@acme.test"].id, by_email["second@acme.test"].id
        assert ids

    def assign(who: Admin, assignee: str | None) -> Any:
        return client.post(f"{API}/incidents/{iid}/assign", json={"assignee_id": assignee},
                           headers=who.headers)

    _error(assign(admin, other_admin.account_id), 404, "not_found")  # another org's account
    _error(assign(admin, operator.account_id), 404, "not_found")  # beyond an org admin's reach
    _error(assign(admin, "acc_doesnotexist"), 404, "not_found")
    _error(assign(admin, developer), 422, "assignee_out_of_scope")  # cannot handle it
    assert _ok(assign(admin, second))["assignee_id"] == second
    _error(assign(admin, second), 409, "invalid_transition")  # already so
    assert _ok(assign(operator, operator.account_id))["assignee_id"] == operator.account_id
    _error(assign(operator, other_admin.account_id), 422, "assignee_out_of_scope")
    with state.session_factory() as s:
        acc = s.get(Account, second)
        assert acc is not None
        acc.status = "disabled"
        s.commit()
    _error(assign(operator, second), 404, "not_found")
    assert _ok(assign(admin, None))["assignee_id"] is None


# -- notes -------------------------------------------------------------------------------------


REFUSED_NOTES = [
    ("x" * (NOTE_MAX_CHARS + 1), "invalid_value"),  # over the cap: refused by the schema
    ("y" * 5000, "invalid_value"),
    ("   ", "note_refused"),
    ("first line\nsecond line", "note_refused"),
    ("tab\tseparated", "note_refused"),
    ('prompt was {"messages": [1]}', "note_refused"),
    ("<script>alert(1)</script>", "note_refused"),
    ("ran `curl` against it", "note_refused"),
    ("leaked key " + crypto.generate_api_key(), "note_refused"),
    ("blob " + "QUJD" * 11, "note_refused"),
]


def test_notes_never_hold_more_than_the_cap_nor_a_payload(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    iid = _ack_event(client, admin, _event(admin.org_id))["id"]
    for text, code in REFUSED_NOTES:
        r = client.post(f"{API}/incidents/{iid}/notes", json={"text": text},
                        headers=admin.headers)
        err = _error(r, 422, code)
        assert err["param"] in ("text", "body.text"), err
        assert not text.strip() or text.strip() not in r.text  # never echoed
    with state.session_factory() as s:
        stored = list(s.scalars(select(IncidentHistory.note)
                                .where(IncidentHistory.incident_id == iid)))
    assert stored == [None, None]  # opened, acknowledged: no note landed

    # At the cap, a note is kept whole; the column is no wider than the cap.
    text = ("checked " * 40)[: NOTE_MAX_CHARS - 1] + "."
    assert len(text) == NOTE_MAX_CHARS
    entry = _ok(client.post(f"{API}/incidents/{iid}/notes", json={"text": text},
                            headers=admin.headers), 201)
    assert entry["note"] == text
    assert IncidentHistory.__table__.c.note.type.length == NOTE_MAX_CHARS


# -- timeline and audit ------------------------------------------------------------------------


def test_the_timeline_interleaves_logged_events_and_steps_in_time_order(
    client: TestClient, admin: Admin
) -> None:
    early = _event(admin.org_id, kind="auth.login_abnormal", severity="medium",
                   ts=datetime.now(UTC) - timedelta(minutes=5))
    iid = _ok(client.post(f"{API}/incidents", json={"event_ids": [early]},
                          headers=admin.headers), 201)["id"]
    _ok(client.post(f"{API}/incidents/{iid}/acknowledge", headers=admin.headers))
    later = _event(admin.org_id, kind="key.ip_not_allowed")  # logged after the incident opened
    _ok(client.post(f"{API}/incidents/{iid}/events", json={"event_ids": [later]},
                    headers=admin.headers))
    _ok(client.post(f"{API}/incidents/{iid}/notes", json={"text": "Same source both times."},
                    headers=admin.headers), 201)

    timeline = _ok(client.get(f"{API}/incidents/{iid}/timeline", headers=admin.headers))
    data = timeline["data"]
    assert [(e["source"], e["kind"]) for e in data] == [
        ("security_log", "auth.login_abnormal"),
        ("handling", "incident.opened"),
        ("handling", "incident.acknowledged"),
        ("security_log", "key.ip_not_allowed"),
        ("handling", "incident.events_added"),
        ("handling", "incident.noted"),
    ]
    stamps = [e["ts"] for e in data]
    assert stamps == sorted(stamps)
    # The events come as the security log holds them.
    assert data[0]["event_id"] == early and data[0]["detail"] == {"requests": 4200}
    assert data[0]["subject_id"] == "key_0123"
    assert data[3]["event_id"] == later and data[4]["detail"]["event_count"] == 1
    assert data[5]["note"] == "Same source both times."


def test_each_step_is_audited_in_the_orgs_security_log_without_the_note(
    client: TestClient, admin: Admin, operator: Admin
) -> None:
    iid = _ack_event(client, admin, _event(admin.org_id))["id"]
    note = "Customer confirmed by phone."
    _ok(client.post(f"{API}/incidents/{iid}/notes", json={"text": note},
                    headers=operator.headers), 201)
    _ok(client.post(f"{API}/incidents/{iid}/assign", json={"assignee_id": operator.account_id},
                    headers=operator.headers))
    _ok(client.post(f"{API}/incidents/{iid}/resolve", json={"resolution": "fixed"},
                    headers=admin.headers))

    # The org reads the handling of its events, the operator's steps included.
    r = client.get(f"{API}/events", params={"subject_id": iid, "limit": 100},
                   headers=admin.headers)
    rows = sorted(_ok(r)["data"], key=lambda e: e["ts"])
    assert [(e["kind"], e["actor_id"]) for e in rows] == [
        ("incident.opened", admin.account_id),
        ("incident.acknowledged", admin.account_id),
        ("incident.noted", operator.account_id),
        ("incident.assigned", operator.account_id),
        ("incident.resolved", admin.account_id),
    ]
    assert {e["org_id"] for e in rows} == {admin.org_id}
    assert rows[2]["detail"] == {"status": "acknowledged", "note_chars": len(note)}
    assert rows[3]["detail"]["assignee_id"] == operator.account_id
    assert rows[4]["detail"] == {"status": "resolved", "resolution": "fixed"}
    assert note not in r.text
    # The precise events replace the generic admin.action of these writes.
    generic = _ok(client.get(f"{API}/events", params={"kind": "admin.action", "limit": 1000},
                             headers=operator.headers))["data"]
    assert not [e for e in generic
                if e["actor_id"] in (admin.account_id, operator.account_id)
                and "/security/incidents" in e["detail"]["route"]
                and e["detail"]["outcome"] == "ok"]


def test_resolved_incidents_go_with_the_security_log_and_open_ones_stay(
    client: TestClient, admin: Admin, state: AppState, settings: Settings
) -> None:
    old = _ack_event(client, admin, _event(admin.org_id))["id"]
    _ok(client.post(f"{API}/incidents/{old}/resolve", json={"resolution": "fixed"},
                    headers=admin.headers))
    recent = _ack_event(client, admin, _event(admin.org_id))["id"]
    _ok(client.post(f"{API}/incidents/{recent}/resolve", json={"resolution": "fixed"},
                    headers=admin.headers))
    ongoing = _ack_event(client, admin, _event(admin.org_id))["id"]
    long_ago = utcnow() - timedelta(days=settings.security_log_ttl_days + 1)
    with state.session_factory() as s:
        for iid in (old, ongoing):
            incident = s.get(Incident, iid)
            assert incident is not None
            incident.created_at = long_ago
            if iid == old:
                incident.resolved_at = long_ago
        s.commit()

    assert retention.purge(state.session_factory, settings).incidents == 1
    with state.session_factory() as s:
        assert {i.id for i in s.scalars(select(Incident))} >= {recent, ongoing}
        assert s.get(Incident, old) is None
        assert not list(s.scalars(select(IncidentHistory)
                                  .where(IncidentHistory.incident_id == old)))
        assert not list(s.scalars(select(IncidentEvent).where(IncidentEvent.incident_id == old)))


# -- concurrency -------------------------------------------------------------------------------


def _principal(who: Admin) -> Principal:
    return Principal(who.account_id, who.org_id, "owner", who.email)


def test_concurrent_steps_run_one_after_the_other(
    client: TestClient, admin: Admin, state: AppState
) -> None:
    """Four handlers resolve one incident at once: one resolves it, three are told it is
    resolved already; four group one event at once: one incident holds it. On SQLite and
    PostgreSQL alike."""
    iid = _ack_event(client, admin, _event(admin.org_id))["id"]
    who = _principal(admin)
    start = threading.Barrier(4)

    def resolve(_: int) -> str:
        with state.session_factory() as s:
            incident = incidents.get(s, iid, who)
            start.wait()
            try:
                incidents.resolve(s, who, incident, "fixed")
                s.commit()
                return "resolved"
            except incidents.InvalidTransition:
                s.rollback()
                return "refused"

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(resolve, range(4))) == ["refused"] * 3 + ["resolved"]

    fact = incidents.EventFact(_event(admin.org_id), datetime.now(UTC), "calls.rate_anomaly",
                               "high", admin.org_id)
    group = threading.Barrier(4)

    def open_one(_: int) -> str:
        with state.session_factory() as s:
            group.wait()
            try:
                incidents.open_incident(s, who, [fact])
                s.commit()
                return "opened"
            except incidents.EventAlreadyHandled:
                s.rollback()
                return "refused"

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(open_one, range(4))) == ["opened"] + ["refused"] * 3
    with state.session_factory() as s:
        history = list(s.scalars(select(IncidentHistory.action)
                                 .where(IncidentHistory.incident_id == iid)))
    assert history.count("resolved") == 1

