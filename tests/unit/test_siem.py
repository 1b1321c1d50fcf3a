"""Security events to a SIEM (docs/siem.md), against a real receiver: Debian's rsyslogd
with imtcp over TLS (tests/support.py SyslogReceiver), a test CA made here, the events in
a real chDB.

Covered: delivery in (ts, event_id) order to the operator's receiver (which asks for a
client certificate) and to an org's (its events only); a receiver whose certificate does
not verify is refused and retried, and gets everything once its CA is right; an outage
and a restart of the forwarder, then catch-up with nothing lost and nothing twice; the
NDJSON export's cursor paging, scoped to the caller's org; and a canary: neither a
password nor a full API key reaches an exported or sent event."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import update

from onetoken import siem
from onetoken.analytics.clickhouse import open_client
from onetoken.control import control_metrics, start_background
from onetoken.ingest.ingestor import Ingestor
from onetoken.orgs.models import Org
from onetoken.security.log import SecurityEvent, insert_rows
from onetoken.settings import Settings
from onetoken.siem import syslog
from onetoken.siem.forwarder import Forwarder, due
from onetoken.siem.models import OPERATOR, SiemDestination
from onetoken.siem.stream import Cursor, Event
from onetoken.state import AppState
from tests.support import TEST_SECRET, SyslogReceiver, make_ca, rsyslogd, wait_until
from tests.unit.conftest import Admin, add_account, drained_events
from tests.unit.journal_files import AcceptingSink

API = "/api/v1/security"
DOC = Path(__file__).resolve().parents[2] / "docs" / "siem.md"


def _schema() -> dict[str, Any]:
    """The JSON schema docs/siem.md publishes for one event."""
    text = DOC.read_text().split("## Event schema", 1)[1]
    return dict(json.loads(text.split("```json", 1)[1].split("```", 1)[0]))


def _valid(events: list[dict[str, Any]]) -> None:
    validator = jsonschema.Draft202012Validator(_schema())
    for event in events:
        validator.validate(event)


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("siem-ch"),
                        secret_key=SecretStr(TEST_SECRET))
    client = open_client(settings)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _empty_log(ch: Client) -> None:
    ch.command("TRUNCATE TABLE onetoken.security_log")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rsyslogd()  # skips (fails under CI) before any work when the receiver is missing
    directory = tmp_path_factory.mktemp("siem-pki")
    ca, issue = make_ca(directory, "receiver")
    server_cert, server_key = issue("localhost", "server")
    client_ca, issue_client = make_ca(directory, "clients")
    client_cert, client_key = issue_client("onetoken", "client")
    stranger, _ = make_ca(directory, "stranger")
    return {"ca": ca, "cert": server_cert, "key": server_key, "client_ca": client_ca,
            "client_cert": client_cert, "client_key": client_key, "stranger": stranger}


@pytest.fixture
def settings(settings: Settings, pki: dict[str, Path]) -> Settings:
    settings.siem_settle_seconds = 0
    settings.siem_poll_interval_seconds = 0.05
    settings.siem_backoff_max_seconds = 0.3
    settings.siem_timeout_seconds = 5
    settings.siem_batch_events = 7  # several batches per test
    settings.siem_private_cidrs = "127.0.0.0/8"
    settings.siem_ca_file = pki["ca"]
    settings.siem_client_cert = pki["client_cert"]
    settings.siem_client_key = pki["client_key"]
    return settings


@pytest.fixture
def _log_reader(client: TestClient, ch: Client) -> None:
    client.app.state.security_log_runner = lambda query: query(ch)  # type: ignore[attr-defined]


def _run(ch: Client) -> Any:
    return lambda query: query(ch)


def _insert(ch: Client, org_id: str, n: int, *, start: datetime | None = None) -> list[str]:
    """`n` events of `org_id`, a millisecond apart from `start` (now), inserted in
    shuffled order so that the order they are sent in is the log's, not the insert's."""
    start = start or datetime.now(UTC)
    events = [
        SecurityEvent(kind="key.revoked_used", severity="high", org_id=org_id,
                      subject_id=f"key_{i:04d}", detail={"n": i},
                      ts=start + timedelta(milliseconds=i))
        for i in range(n)
    ]
    rows = [e.row() for e in events]
    insert_rows(_run(ch), rows[1::2] + rows[0::2])
    return [e.event_id for e in events]


def _received(receiver: SyslogReceiver) -> list[dict[str, Any]]:
    return [json.loads(line) for line in receiver.lines()]


def _ids(receiver: SyslogReceiver) -> list[str]:
    return [e["event_id"] for e in _received(receiver)]


def _forwarder(state: AppState, ch: Client) -> Forwarder:
    forwarder = Forwarder(state.settings, state.session_factory, _run(ch), hostname="relay-1")
    forwarder.start()
    return forwarder


def _row(state: AppState, dest_id: str) -> SiemDestination:
    with state.session_factory() as session:
        row = session.get(SiemDestination, dest_id)
        assert row is not None
        session.expunge(row)
        return row


def test_message_is_rfc5424_with_octet_counting() -> None:
    event = Event(1_765_000_000_123_456, "e" * 32, "auth.login_failed", "medium", "org_1",
                  "", "acc_1", "203.0.113.7", "curl/8.5 \u00e9", {"reason": "password"})
    framed = syslog.frame([event, event], "relay 1")
    length, _, rest = framed.partition(b" ")
    first = rest[: int(length)]
    assert rest[int(length):] == framed[: len(length) + 1 + int(length)]  # two equal frames
    # authpriv (10) * 8 + warning (4); host without its space; the kind as MSGID.
    assert first.startswith(b"<84>1 2025-12-06T05:46:40.123456Z relay1 onetoken - "
                            b"auth.login_failed - {")
    assert first.isascii()
    body = json.loads(first.split(b" - ", 2)[2])
    assert body["user_agent"] == "curl/8.5 \u00e9" and body["schema"] == "onetoken.security_event/1"


def test_operator_receiver_gets_every_event_in_order(
    state: AppState, ch: Client, pki: dict[str, Path], tmp_path: Path
) -> None:
    with SyslogReceiver(tmp_path / "rx", pki["ca"], pki["cert"], pki["key"],
                        client_ca=pki["client_ca"]) as receiver:
        state.settings.siem_syslog_address = f"localhost:{receiver.port}"
        forwarder = _forwarder(state, ch)
        try:
            expected = _insert(ch, "org_a", 12) + _insert(ch, "org_b", 9)
            got = wait_until(lambda: len(_ids(receiver)) >= 21 and _ids(receiver),
                             message="21 events at the receiver")
            assert got == expected  # the log's order, each once
            wait_until(lambda: _row(state, OPERATOR).delivered == 21)
            _valid(_received(receiver))
            sample = _received(receiver)[0]
            assert set(sample) == {"schema", "ts", "event_id", "kind", "severity", "org_id",
                                   "actor_id", "subject_id", "source_ip", "user_agent",
                                   "detail"}

            def caught_up() -> bool:
                lag = next(m for m in forwarder.metrics() if m.name == "onetoken_siem_lag_seconds")
                return ("", {"destination": "operator"}, 0.0) in lag.samples

            wait_until(caught_up, message="the lag back to 0")
        finally:
            forwarder.stop()


def test_a_receiver_that_does_not_verify_is_refused_and_retried(
    state: AppState, ch: Client, client: TestClient, admin: Admin, other_admin: Admin,
    pki: dict[str, Path], tmp_path: Path,
) -> None:
    with SyslogReceiver(tmp_path / "rx", pki["ca"], pki["cert"], pki["key"]) as receiver:
        wrong = {"host": "127.0.0.1", "port": receiver.port,
                 "ca_pem": pki["stranger"].read_text()}
        r = client.put(f"{API}/siem", json=wrong, headers=admin.headers)
        assert r.status_code == 200, r.text
        dest_id = _destination_id(state, admin.org_id)
        forwarder = _forwarder(state, ch)
        try:
            mine = _insert(ch, admin.org_id, 5)
            _insert(ch, other_admin.org_id, 5)  # another org's: never sent here
            wait_until(lambda: _row(state, dest_id).failures >= 2,
                       message="failed attempts, retried")
            row = _row(state, dest_id)
            assert row.last_error == "tls_verify" and row.delivered == 0
            assert receiver.lines() == []
            test = client.post(f"{API}/siem/test", headers=admin.headers).json()
            assert test == {"ok": False, "event_id": None, "error": "tls_verify"}

            right = {**wrong, "ca_pem": pki["ca"].read_text()}
            assert client.put(f"{API}/siem", json=right, headers=admin.headers).status_code == 200
            got = wait_until(lambda: len(_ids(receiver)) >= 5 and _ids(receiver))
            assert got == mine
            test = client.post(f"{API}/siem/test", headers=admin.headers).json()
            assert test["ok"] is True
            wait_until(lambda: test["event_id"] in _ids(receiver))
            status = client.get(f"{API}/siem", headers=admin.headers).json()
            assert status["delivered"] == 5 and status["last_error"] is None and status["has_ca"]
        finally:
            forwarder.stop()


def _destination_id(state: AppState, org_id: str) -> str:
    with state.session_factory() as session:
        row = session.query(SiemDestination).filter_by(org_id=org_id).one()
        return row.id


def test_an_outage_and_a_restart_lose_nothing_and_repeat_nothing(
    state: AppState, ch: Client, pki: dict[str, Path], tmp_path: Path
) -> None:
    receiver = SyslogReceiver(tmp_path / "rx", pki["ca"], pki["cert"], pki["key"],
                              client_ca=pki["client_ca"]).start()
    try:
        state.settings.siem_syslog_address = f"localhost:{receiver.port}"
        forwarder = _forwarder(state, ch)
        before = _insert(ch, "org_a", 10)
        wait_until(lambda: _ids(receiver) == before)

        receiver.stop()
        during = _insert(ch, "org_a", 15)
        wait_until(lambda: _row(state, OPERATOR).failures >= 2, message="sends failing")
        assert _row(state, OPERATOR).last_error in ("connect_error", "tls_error", "send_error")
        lag = next(m for m in forwarder.metrics() if m.name == "onetoken_siem_lag_seconds")
        assert lag.samples[0][1] == {"destination": "operator"} and lag.samples[0][2] > 0
        # The control process goes away too; the cursor is in the control DB.
        forwarder.stop()
        after = _insert(ch, "org_a", 4)

        receiver.start()
        forwarder = _forwarder(state, ch)
        expected = before + during + after
        got = wait_until(lambda: len(_ids(receiver)) >= len(expected) and _ids(receiver))
        assert got == expected
        wait_until(lambda: _row(state, OPERATOR).delivered == len(expected))
        forwarder.stop()
    finally:
        receiver.stop()


def test_an_org_destination_must_be_public(client: TestClient, admin: Admin,
                                           state: AppState, pki: dict[str, Path]) -> None:
    state.settings.siem_private_cidrs = ""
    for host in ("127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254"):
        r = client.put(f"{API}/siem", json={"host": host, "port": 6514}, headers=admin.headers)
        assert r.status_code == 422, (host, r.text)
        assert r.json()["error"]["param"] == "host"
    r = client.put(f"{API}/siem", json={"host": "1.1.1.1", "ca_pem": "not a pem"},
                   headers=admin.headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "ca_pem"
    r = client.get(f"{API}/siem", headers=admin.headers)
    assert r.status_code == 200 and r.json()["configured"] is False and r.json()["host"] is None
    r = client.post(f"{API}/siem/test", headers=admin.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "siem_not_configured"
    # Setting and removing a destination are security events of their own.
    drained_events()
    r = client.put(f"{API}/siem", json={"host": "1.1.1.1"}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["port"] == 6514 and not r.json()["has_ca"]
    # The CA bundle stays when a change leaves it out (the console's empty field), and goes
    # with an explicit null.
    ca = pki["ca"].read_text()
    r = client.put(f"{API}/siem", json={"host": "1.1.1.1", "ca_pem": ca}, headers=admin.headers)
    assert r.json()["has_ca"]
    r = client.put(f"{API}/siem", json={"host": "1.1.1.1", "port": 6515}, headers=admin.headers)
    assert r.json()["has_ca"] and r.json()["port"] == 6515
    r = client.put(f"{API}/siem", json={"host": "1.1.1.1", "ca_pem": None},
                   headers=admin.headers)
    assert not r.json()["has_ca"]
    assert client.delete(f"{API}/siem", headers=admin.headers).status_code == 204
    assert client.delete(f"{API}/siem", headers=admin.headers).status_code == 404
    kinds = [(e["kind"], e["actor_id"]) for e in drained_events()
             if e["kind"].startswith("admin.siem")]
    assert kinds == [*[("admin.siem_changed", admin.account_id)] * 4,
                     ("admin.siem_removed", admin.account_id)]


@pytest.mark.usefixtures("_log_reader")
def test_export_pages_with_a_cursor_within_the_callers_org(
    client: TestClient, ch: Client, admin: Admin, other_admin: Admin, operator: Admin,
) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    mine = _insert(ch, admin.org_id, 23, start=start)
    theirs = _insert(ch, other_admin.org_id, 4, start=start)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        r = client.get(f"{API}/events/export", params=params, headers=admin.headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.text.splitlines()]
        _valid(lines)
        assert all(e["org_id"] == admin.org_id for e in lines)
        # The sign-ins of the test's accounts are in the log too.
        seen += [e["event_id"] for e in lines if e["kind"] == "key.revoked_used"]
        assert r.headers["x-next-cursor"] and 'rel="next"' in r.headers["link"]
        if not lines:
            assert r.headers["x-next-cursor"] == cursor  # nothing new: poll again later
            break
        cursor = r.headers["x-next-cursor"]
        pages += 1
    assert seen == mine and pages == 3
    # Without a cursor, `start` is the earliest time (events a millisecond apart).
    r = client.get(f"{API}/events/export", headers=admin.headers, params={
        "start": (start + timedelta(milliseconds=10)).isoformat(), "limit": 13})
    assert [e["event_id"] for e in map(json.loads, r.text.splitlines())] == mine[10:]
    # Events recorded after the last page come with the same cursor, and only they.
    later = _insert(ch, admin.org_id, 2)
    r = client.get(f"{API}/events/export", params={"cursor": cursor}, headers=admin.headers)
    assert [json.loads(line)["event_id"] for line in r.text.splitlines()
            if json.loads(line)["kind"] == "key.revoked_used"] == later

    r = client.get(f"{API}/events/export", params={"org_id": admin.org_id},
                   headers=other_admin.headers)
    assert r.status_code == 404
    r = client.get(f"{API}/events/export", params={"limit": 5000}, headers=operator.headers)
    everyone = [json.loads(line)["event_id"] for line in r.text.splitlines()]
    assert set(mine + theirs + later) <= set(everyone)
    r = client.get(f"{API}/events/export", params={"cursor": "not-a-cursor"},
                   headers=admin.headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "cursor"
    assert Cursor.parse(Cursor(5, "x").token()) == Cursor(5, "x")


@pytest.mark.usefixtures("_log_reader")
def test_canary_no_password_or_full_key_in_an_exported_event(
    client: TestClient, ch: Client, admin: Admin, operator: Admin,
) -> None:
    canary_password = "canary-password-7Qz9"
    r = client.post("/api/v1/auth/login",
                    json={"email": admin.email, "password": canary_password})
    assert r.status_code == 401
    r = client.post("/api/v1/keys", json={"name": "canary"}, headers=admin.headers)
    assert r.status_code == 201, r.text
    full_key = r.json()["key"]
    assert client.post(f"/api/v1/keys/{r.json()['id']}/revoke",
                       headers=admin.headers).status_code in (200, 204)
    r = client.get(f"{API}/events/export", params={"limit": 5000}, headers=operator.headers)
    kinds = {json.loads(line)["kind"] for line in r.text.splitlines()}
    assert "auth.login_failed" in kinds and len(kinds) >= 2, kinds
    assert canary_password not in r.text
    assert full_key not in r.text and full_key[8:] not in r.text


def test_a_dead_receiver_holds_up_no_other_destination(
    state: AppState, ch: Client, client: TestClient, admin: Admin, pki: dict[str, Path],
    tmp_path: Path,
) -> None:
    # Accepts connections (the kernel's backlog) and never answers the TLS handshake.
    with socket.socket() as black_hole, SyslogReceiver(
        tmp_path / "rx", pki["ca"], pki["cert"], pki["key"], client_ca=pki["client_ca"]
    ) as receiver:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        r = client.put(f"{API}/siem", headers=admin.headers, json={
            "host": "127.0.0.1", "port": black_hole.getsockname()[1],
            "ca_pem": pki["ca"].read_text()})
        assert r.status_code == 200, r.text
        dest_id = _destination_id(state, admin.org_id)
        state.settings.siem_syslog_address = f"localhost:{receiver.port}"
        state.settings.siem_timeout_seconds = 3
        forwarder = _forwarder(state, ch)
        try:
            expected = _insert(ch, admin.org_id, 5)
            wait_until(lambda: _ids(receiver) == expected, timeout=10)
            # The org's send is still waiting for its handshake while the operator's went.
            row = _row(state, dest_id)
            assert row.lease_owner == forwarder.owner and row.last_error is None
            assert client.get(f"{API}/siem", headers=admin.headers).status_code == 200
            wait_until(lambda: _row(state, dest_id).last_error == "timeout", timeout=15)
        finally:
            forwarder.stop()


def test_console_page_offers_the_settings_to_those_who_may_change_them(
    client: TestClient, state: AppState, admin: Admin,
) -> None:
    browser = TestClient(client.app, base_url="https://testserver", follow_redirects=False)

    def page(email: str, password: str) -> str:
        browser.cookies.clear()
        r = browser.post("/api/v1/auth/session", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        r = browser.get("/security/siem")
        assert r.status_code == 200, r.text
        return r.text

    owner = page(admin.email, admin.password)
    assert 'data-api="/api/v1/security/siem/test"' in owner and 'id="siem-form"' in owner
    assert 'data-load="/api/v1/security/siem"' in owner
    # The owner's navigation lists it; a developer (no security.read) is refused the page.
    assert 'href="/security/siem"' in owner
    add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    browser.cookies.clear()
    r = browser.post("/api/v1/auth/session",
                     json={"email": "dev@acme.test", "password": "another long password"})
    assert r.status_code == 200, r.text
    assert browser.get("/security/siem").status_code in (403, 404)


def test_a_terminated_orgs_events_no_longer_leave(
    state: AppState, ch: Client, client: TestClient, admin: Admin, pki: dict[str, Path],
    tmp_path: Path,
) -> None:
    with SyslogReceiver(tmp_path / "rx", pki["ca"], pki["cert"], pki["key"],
                        client_ca=pki["client_ca"]) as receiver:
        r = client.put(f"{API}/siem", headers=admin.headers, json={
            "host": "127.0.0.1", "port": receiver.port, "ca_pem": pki["ca"].read_text()})
        assert r.status_code == 200, r.text
        dest_id = _destination_id(state, admin.org_id)
        with state.session_factory() as session:
            assert dest_id in due(session, datetime.now(UTC), "me")
            session.execute(update(Org).where(Org.id == admin.org_id).values(status="terminated"))
            session.commit()
            assert dest_id not in due(session, datetime.now(UTC), "me")
        # The operator's destination, on the same receiver: each event arrives once, from it.
        state.settings.siem_syslog_address = f"localhost:{receiver.port}"
        forwarder = _forwarder(state, ch)
        try:
            expected = _insert(ch, admin.org_id, 4)
            wait_until(lambda: _row(state, OPERATOR).delivered == 4)
            assert _ids(receiver) == expected
            assert _row(state, dest_id).delivered == 0
        finally:
            forwarder.stop()


class _ChSink(AcceptingSink):
    """The call_log sink of a serving process, as far as the forwarder uses it: reads
    through the one chDB client."""

    def __init__(self, ch: Client) -> None:
        self.ch = ch

    def read(self, query: Any) -> Any:
        return query(self.ch)


def test_a_serving_control_process_forwards_and_shows_the_lag(
    state: AppState, ch: Client, pki: dict[str, Path], tmp_path: Path,
) -> None:
    with SyslogReceiver(tmp_path / "rx", pki["ca"], pki["cert"], pki["key"],
                        client_ca=pki["client_ca"]) as receiver:
        state.settings.siem_syslog_address = f"localhost:{receiver.port}"
        ingestor = Ingestor(state.settings, state.session_factory, sink=_ChSink(ch))  # type: ignore[arg-type]
        background = start_background(state, ingestor)
        try:
            assert siem.current() is background.siem
            expected = _insert(ch, "org_a", 3)
            wait_until(lambda: _ids(receiver) == expected)
            registry = control_metrics(state, ingestor)
            wait_until(lambda: 'onetoken_siem_delivered_total{destination="operator"} 3'
                       in registry.render(), message="the delivery counted")
            assert 'onetoken_siem_lag_seconds{destination="operator"} 0' in registry.render()
        finally:
            background.stop()
        assert siem.current() is None


def test_two_control_processes_send_each_event_once(
    state: AppState, ch: Client, pki: dict[str, Path], tmp_path: Path
) -> None:
    with SyslogReceiver(tmp_path / "rx", pki["ca"], pki["cert"], pki["key"],
                        client_ca=pki["client_ca"]) as receiver:
        state.settings.siem_syslog_address = f"localhost:{receiver.port}"
        # Two forwarders on one control DB, as two control processes: the lease lets one
        # send for the destination at a time.
        first, second = _forwarder(state, ch), _forwarder(state, ch)
        try:
            expected: list[str] = []
            for _ in range(4):
                expected += _insert(ch, "org_a", 9)
                first.poke()
                second.poke()
            got = wait_until(lambda: len(_ids(receiver)) >= len(expected) and _ids(receiver))
            assert got == expected
            wait_until(lambda: _row(state, OPERATOR).delivered == len(expected))
            assert _ids(receiver) == expected
        finally:
            first.stop()
            second.stop()
