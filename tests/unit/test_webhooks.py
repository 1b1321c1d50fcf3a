"""Webhooks against a real local receiver: signatures, retries after 500s, the delivery
log, secrets at rest, org isolation and roles."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpcore
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from onetoken import webhooks
from onetoken.control import build_state, create_app
from onetoken.security import net
from onetoken.settings import Settings
from onetoken.state import AppState
from onetoken.webhooks.dispatcher import Outcome, Target, WebhookDispatcher, send
from onetoken.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from onetoken.webhooks.signing import SIGNATURE_HEADER, header_value, verify
from tests.support import TEST_SECRET, wait_until
from tests.unit.stub_dns import STUB_DNS, stub_resolver
from tests.webhook_receiver import DripReceiver, Receiver

from .conftest import Admin, add_account, make_org_admin


def _settings(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "secret_key": SecretStr(TEST_SECRET),
        # The receivers are on loopback: an operator allow-list, as for on-premises ones.
        "webhook_private_cidrs": "127.0.0.0/8",
        "webhook_timeout_seconds": 1.0,
        "webhook_backoff_base_seconds": 0.05,
        "webhook_backoff_max_seconds": 0.2,
        "webhook_poll_interval_seconds": 0.05,
        "webhook_max_attempts": 4,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


# One control DB and org for the module (migrations and argon2 logins are the slow part);
# every test registers its own endpoint and looks only at that endpoint's deliveries.
@pytest.fixture(scope="module")
def wh_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppState]:
    st = build_state(_settings(tmp_path_factory.mktemp("wh")))
    yield st
    st.db_engine.dispose()


@pytest.fixture(scope="module")
def wh_client(wh_state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(wh_state.settings, state=wh_state)) as c:
        yield c


@pytest.fixture(scope="module")
def owner(wh_state: AppState, wh_client: TestClient) -> Admin:
    return make_org_admin(wh_state, wh_client, "Acme", "owner@acme.test")


@pytest.fixture(scope="module")
def other(wh_state: AppState, wh_client: TestClient) -> Admin:
    return make_org_admin(wh_state, wh_client, "Globex", "admin@globex.test", role="admin")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def dispatcher(wh_state: AppState) -> Iterator[WebhookDispatcher]:
    d = WebhookDispatcher(wh_state.settings, wh_state.secrets, wh_state.session_factory)
    webhooks.install(d)
    d.start()
    yield d
    d.stop()
    webhooks.install(None)


def _create(client: TestClient, admin: Admin, url: str, kinds: list[str]) -> dict[str, str]:
    r = client.post("/api/v1/webhooks", json={"url": url, "kinds": kinds}, headers=admin.headers)
    assert r.status_code == 201, r.text
    body: dict[str, str] = r.json()
    return body


def _wait_delivery(
    state: AppState, endpoint_id: str, status: str, timeout: float = 15.0
) -> WebhookDelivery:

    def reached() -> WebhookDelivery | None:
        with state.session_factory() as s:
            return s.scalars(
                select(WebhookDelivery).where(
                    WebhookDelivery.status == status, WebhookDelivery.endpoint_id == endpoint_id
                )
            ).first()

    return wait_until(reached, timeout, 0.02, message=f"a delivery reaching {status}")


def test_signature_roundtrip_and_tampering() -> None:
    body = b'{"a":1}'
    header = header_value("whsec_x", body, timestamp=int(time.time()))
    assert verify("whsec_x", body, header)
    assert not verify("whsec_x", body + b" ", header)
    assert not verify("whsec_other", body, header)
    old = header_value("whsec_x", body, timestamp=int(time.time()) - 3600)
    assert not verify("whsec_x", body, old)


def test_secret_shown_once_and_encrypted_at_rest(
    wh_client: TestClient, wh_state: AppState, owner: Admin, receiver: Receiver
) -> None:
    created = _create(wh_client, owner, receiver.url, ["key_risk", "balance_low"])
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert created["url_display"].startswith("http://127.0.0.1:")
    assert "t0ken-in-path" not in orjson.dumps(created).decode()
    listed = wh_client.get("/api/v1/webhooks", headers=owner.headers).json()["data"]
    assert listed and all("secret" not in e for e in listed)
    one = wh_client.get(f"/api/v1/webhooks/{created['id']}", headers=owner.headers).json()
    assert "secret" not in one
    with wh_state.session_factory() as s:
        row = s.get(WebhookEndpoint, created["id"])
        assert row is not None
        assert secret not in row.secret_encrypted
        assert "t0ken-in-path" not in row.url_encrypted
        assert wh_state.secrets.decrypt(row.secret_encrypted) == secret
    raw = b"".join(
        p.read_bytes() for p in (wh_state.settings.data_dir).glob("control.db*") if p.is_file()
    )
    assert secret.encode() not in raw
    assert b"t0ken-in-path" not in raw


@pytest.fixture
def stub_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "system_resolver", stub_resolver)


def test_private_targets_refused_unless_allowed(tmp_path: Path, stub_dns: None) -> None:
    st = build_state(_settings(tmp_path, webhook_private_cidrs=""))
    try:
        with TestClient(create_app(st.settings, state=st)) as c:
            admin = make_org_admin(st, c, "Acme", "o@acme.test")
            refused = [
                "http://127.0.0.1:9/x?token=SEKRIT", "http://10.1.2.3/x", "http://[::1]/x",
                "http://[::ffff:169.254.169.254]/x", "http://100.64.0.1/x",
                "http://localhost/x", "ftp://example.com/x", "https://user:SEKRIT@example.com/x",
                *(f"https://{name}/SEKRIT" for name in STUB_DNS if not name.startswith("public")),
            ]
            for url in refused:
                r = c.post("/api/v1/webhooks", json={"url": url, "kinds": ["key_risk"]},
                           headers=admin.headers)
                assert r.status_code == 422, url
                assert r.json()["error"]["param"] == "url"
                assert "SEKRIT" not in r.text and "10." not in r.text and "example" not in r.text
            for url in ("https://public.example.test/x", "https://unresolvable.example.test/x"):
                ok = c.post("/api/v1/webhooks", json={"url": url, "kinds": ["key_risk"]},
                            headers=admin.headers)
                assert ok.status_code == 201, url
            hook_id = ok.json()["id"]
            moved = c.patch(f"/api/v1/webhooks/{hook_id}",
                            json={"url": "https://metadata.example.test/x"}, headers=admin.headers)
            assert moved.status_code == 422 and moved.json()["error"]["param"] == "url"
    finally:
        st.db_engine.dispose()


def _send(target: Target, url: str) -> Outcome:
    return send(target, url, "whsec_x", b"{}", delivery_id="whd_1", event_id="evt_1",
                kind="key_risk", attempt=1)


def test_delivery_refuses_private_answers_before_any_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connects: list[str] = []

    def no_connect(self: object, host: str, port: int, *args: object, **kw: object) -> None:
        connects.append(host)
        raise AssertionError("connected")

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", no_connect)
    # The loopback allow-list does not cover 10/8, 169.254/16, 100.64/10 or ULAs.
    target = Target(allow=net.networks("127.0.0.0/8"), deadline_s=1.0,
                    ssl_context=ssl.create_default_context(), resolver=stub_resolver)
    for name in ("private", "metadata", "cgnat", "ula", "mixed"):
        outcome = _send(target, f"https://{name}.example.test/x")
        assert outcome.error == "target_not_allowed" and outcome.status_code is None, name
    strict = Target(allow=(), deadline_s=1.0, ssl_context=ssl.create_default_context(),
                    resolver=stub_resolver)
    assert _send(strict, "http://mapped.example.test/x").error == "target_not_allowed"
    assert _send(strict, "http://127.0.0.1:9/x").error == "target_not_allowed"
    assert connects == []


def test_delivery_connects_to_the_address_it_checked(receiver: Receiver) -> None:
    """A name that answers a checked address first and a private one afterwards (DNS
    rebinding) is resolved once: the POST goes to the checked address, under its name."""
    port = int(receiver.url.split(":")[2].split("/")[0])
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])
    asked: list[str] = []

    def rebinding(host: str, p: int) -> list[str]:
        asked.append(host)
        return next(answers)

    target = Target(allow=net.networks("127.0.0.0/8"), deadline_s=2.0,
                    ssl_context=ssl.create_default_context(), resolver=rebinding)
    outcome = _send(target, f"http://hooks.example.test:{port}/hooks/pinned")
    assert outcome.ok and outcome.status_code == 200, outcome
    assert asked == ["hooks.example.test"]
    got = receiver.received[0]
    assert got.path == "/hooks/pinned"
    assert got.headers["host"] == f"hooks.example.test:{port}"


def test_test_event_is_signed_and_logged_without_payload(
    wh_client: TestClient, wh_state: AppState, owner: Admin, receiver: Receiver
) -> None:
    created = _create(wh_client, owner, receiver.url, ["key_risk"])
    r = wh_client.post(f"/api/v1/webhooks/{created['id']}/test", headers=owner.headers)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending"
    _wait_delivery(wh_state, created["id"], "delivered")
    d = wh_client.get(f"/api/v1/webhooks/deliveries/{r.json()['id']}",
                      headers=owner.headers).json()
    assert d["status"] == "delivered" and d["attempts"] == 1 and d["last_status_code"] == 200
    assert d["attempt_log"][0]["status_code"] == 200
    got = receiver.received[0]
    assert got.path == "/hooks/t0ken-in-path"
    assert verify(created["secret"], got.body, got.headers[SIGNATURE_HEADER])
    event = orjson.loads(got.body)
    assert event["type"] == "webhook_test" and event["org_id"] == owner.org_id
    assert got.headers["onetoken-event-id"] == event["id"]
    with wh_state.session_factory() as s:
        row = s.get(WebhookDelivery, d["id"])
        assert row is not None and row.payload is None


@pytest.mark.usefixtures("dispatcher")
def test_retries_after_500s_with_backoff_then_delivers(
    wh_client: TestClient, wh_state: AppState, owner: Admin, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503, 200]
    created = _create(wh_client, owner, receiver.url, ["quota_exhausted"])
    # Billing's spelling, and a non-scalar value that must not travel.
    webhooks.emit(owner.org_id, "quota.exhausted",
                  {"scope": "org", "period": "day", "nested": {"x": 1}, "budget": "5.000000000"})
    got = receiver.wait_for(lambda rs: len(rs) >= 3)
    delivered = _wait_delivery(wh_state, created["id"], "delivered")
    assert delivered.attempts == 3 and delivered.last_status_code == 200
    assert delivered.payload is None
    # Exponential backoff: the second gap is not shorter than the base delay.
    assert got[1].at - got[0].at >= 0.03 and got[2].at - got[1].at >= 0.06
    bodies = {r.body for r in got}
    assert len(bodies) == 1, "every attempt sends the same event"
    for r in got:
        assert verify(created["secret"], r.body, r.headers[SIGNATURE_HEADER])
    assert [r.headers["onetoken-delivery-attempt"] for r in got] == ["1", "2", "3"]
    event = orjson.loads(got[0].body)
    assert event["type"] == "quota_exhausted"
    assert event["data"] == {"scope": "org", "period": "day", "budget": "5.000000000"}
    detail = wh_client.get(f"/api/v1/webhooks/deliveries/{delivered.id}",
                           headers=owner.headers).json()
    assert [a["status_code"] for a in detail["attempt_log"]] == [500, 503, 200]
    assert [a["error"] for a in detail["attempt_log"]] == ["http_500", "http_503", None]
    assert all(a["latency_ms"] >= 0 for a in detail["attempt_log"])
    listing = wh_client.get("/api/v1/webhooks/deliveries", params={"endpoint_id": created["id"]},
                            headers=owner.headers).json()["data"]
    assert [x["id"] for x in listing] == [delivered.id]


@pytest.mark.usefixtures("dispatcher")
def test_final_failure_keeps_metadata_only(
    wh_client: TestClient, wh_state: AppState, owner: Admin, receiver: Receiver
) -> None:
    receiver.statuses = [500]
    created = _create(wh_client, owner, receiver.url, ["system_alarm"])
    webhooks.emit(owner.org_id, "system_alarm", {"counter": "x"})
    failed = _wait_delivery(wh_state, created["id"], "failed")
    assert failed.attempts == wh_state.settings.webhook_max_attempts
    assert failed.payload is None and failed.last_error == "http_500"
    assert len(receiver.received) == wh_state.settings.webhook_max_attempts


@pytest.mark.usefixtures("dispatcher")
def test_unsubscribed_kinds_and_disabled_endpoints_get_nothing(
    wh_client: TestClient, wh_state: AppState, owner: Admin, receiver: Receiver
) -> None:
    created = _create(wh_client, owner, receiver.url, ["abnormal_login"])
    webhooks.emit(owner.org_id, "frequency_anomaly", {"key_id": "k"})
    r = wh_client.patch(f"/api/v1/webhooks/{created['id']}", json={"status": "disabled"},
                        headers=owner.headers)
    assert r.status_code == 200 and r.json()["status"] == "disabled"
    webhooks.emit(owner.org_id, "abnormal_login", {"reason": "new_network"})
    # Events are persisted in the order they were emitted: once a later one is delivered
    # elsewhere, the two above have been handled.
    barrier = Receiver().start()
    try:
        later = _create(wh_client, owner, barrier.url, ["abnormal_login"])
        webhooks.emit(owner.org_id, "abnormal_login", {"reason": "new_network"})
        _wait_delivery(wh_state, later["id"], "delivered")
    finally:
        barrier.stop()
    assert receiver.received == []
    with wh_state.session_factory() as s:
        rows = s.scalars(
            select(WebhookDelivery).where(WebhookDelivery.endpoint_id == created["id"])
        ).all()
        assert rows == []


def test_other_org_and_roles(
    wh_client: TestClient, wh_state: AppState, owner: Admin, other: Admin, receiver: Receiver
) -> None:
    created = _create(wh_client, owner, receiver.url, ["key_risk"])
    wh_client.post(f"/api/v1/webhooks/{created['id']}/test", headers=owner.headers)
    ep = f"/api/v1/webhooks/{created['id']}"
    assert wh_client.get(ep, headers=other.headers).status_code == 404
    patched = wh_client.patch(ep, json={"status": "disabled"}, headers=other.headers)
    assert patched.status_code == 404
    assert wh_client.post(f"{ep}/test", headers=other.headers).status_code == 404
    assert wh_client.post(f"{ep}/rotate-secret", headers=other.headers).status_code == 404
    assert wh_client.delete(ep, headers=other.headers).status_code == 404
    assert wh_client.get("/api/v1/webhooks", headers=other.headers).json()["data"] == []
    assert wh_client.get("/api/v1/webhooks/deliveries", headers=other.headers).json()["data"] == []
    mine = wh_client.get("/api/v1/webhooks/deliveries", params={"endpoint_id": created["id"]},
                         headers=owner.headers).json()["data"]
    assert len(mine) == 1
    other_delivery = f"/api/v1/webhooks/deliveries/{mine[0]['id']}"
    assert wh_client.get(other_delivery, headers=other.headers).status_code == 404
    for role in ("developer", "billing", "viewer"):
        h = add_account(wh_state, wh_client, owner.org_id, f"{role}@acme.test", role)
        assert wh_client.get("/api/v1/webhooks", headers=h).status_code == 403
        r = wh_client.post("/api/v1/webhooks", json={"url": receiver.url, "kinds": ["key_risk"]},
                           headers=h)
        assert r.status_code == 403
    # Platform-wide endpoints are for operators only.
    r = wh_client.post("/api/v1/webhooks",
                       json={"url": receiver.url, "kinds": ["system_alarm"], "platform": True},
                       headers=owner.headers)
    assert r.status_code == 403


def test_rotate_secret_and_delete(
    wh_client: TestClient, wh_state: AppState, owner: Admin, receiver: Receiver
) -> None:
    created = _create(wh_client, owner, receiver.url, ["key_risk"])
    r = wh_client.post(f"/api/v1/webhooks/{created['id']}/rotate-secret", headers=owner.headers)
    new_secret = r.json()["secret"]
    assert new_secret != created["secret"]
    wh_client.post(f"/api/v1/webhooks/{created['id']}/test", headers=owner.headers)
    got = receiver.wait_for(lambda rs: len(rs) >= 1)[-1]
    assert verify(new_secret, got.body, got.headers[SIGNATURE_HEADER])
    assert not verify(created["secret"], got.body, got.headers[SIGNATURE_HEADER])
    assert wh_client.delete(f"/api/v1/webhooks/{created['id']}",
                            headers=owner.headers).status_code == 204
    listed = wh_client.get("/api/v1/webhooks", headers=owner.headers).json()["data"]
    assert created["id"] not in {e["id"] for e in listed}
    # The delivery log (metadata) outlives the endpoint until its retention ends.
    log = wh_client.get("/api/v1/webhooks/deliveries", params={"endpoint_id": created["id"]},
                        headers=owner.headers).json()["data"]
    assert len(log) == 1


def test_emit_without_dispatcher_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    webhooks.install(None)
    with caplog.at_level("WARNING", logger="onetoken.webhooks"):
        webhooks.emit("org_x", "balance_low", {"a": 1})
    assert [r.getMessage() for r in caplog.records] == ["webhooks.no_dispatcher"]


def test_emit_with_a_failing_dispatcher_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def submit(self, org_id: str, kind: str, data: object) -> None:
            raise RuntimeError("queue gone")

    webhooks.install(Broken())  # type: ignore[arg-type]
    try:
        with caplog.at_level("ERROR", logger="onetoken.webhooks"):
            webhooks.emit("org_x", "balance_low", {"a": 1})
    finally:
        webhooks.install(None)
    assert [r.getMessage() for r in caplog.records] == ["webhooks.emit_failed"]


def test_a_dripping_receiver_delays_no_other_endpoint(
    wh_client: TestClient, wh_state: AppState, dispatcher: WebhookDispatcher, receiver: Receiver
) -> None:
    """A receiver answering a byte every 0.2 s (8 s for its whole answer) gets one 1 s
    deadline per attempt, and another endpoint's delivery of the same event arrives at once."""
    assert wh_state.settings.webhook_timeout_seconds == 1.0
    admin = make_org_admin(wh_state, wh_client, "Initech", "admin@initech.test", role="admin")
    slow = DripReceiver(interval=0.2).start()
    try:
        slow_hook = _create(wh_client, admin, slow.url, ["balance_low"])
        fast_hook = _create(wh_client, admin, receiver.url, ["balance_low"])
        # /test answers without waiting for the slow receiver.
        started = time.monotonic()
        r = wh_client.post(f"/api/v1/webhooks/{slow_hook['id']}/test", headers=admin.headers)
        assert r.status_code == 202 and r.json()["status"] == "pending"
        assert time.monotonic() - started < 0.5
        sent = time.monotonic()
        webhooks.emit(admin.org_id, "balance_low", {"balance": "1.00"})
        got = receiver.wait_for(lambda rs: len(rs) >= 1, timeout=10)
        assert got[0].at - sent < 1.0, "the fast endpoint waited for the slow one"
        assert _wait_delivery(wh_state, fast_hook["id"], "delivered").attempts == 1
        with wh_state.session_factory() as s:

            def attempts() -> Sequence[WebhookAttempt]:
                s.expire_all()
                return s.scalars(
                    select(WebhookAttempt)
                    .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
                    .where(WebhookDelivery.endpoint_id == slow_hook["id"])
                ).all()

            tried = wait_until(attempts, 10, message="an attempt at the slow endpoint")
        assert all(a.error == "timeout" and a.status_code is None for a in tried)
        # The deadline holds the whole attempt, not each read.
        assert all(900 <= a.latency_ms < 1500 for a in tried), [a.latency_ms for a in tried]
    finally:
        slow.stop()


def _tls_receiver(tmp_path: Path, name: str) -> tuple[ThreadingHTTPServer, str, list[str]]:
    """An HTTPS receiver on 127.0.0.1 with a self-signed certificate for `name`; returns
    the server, the certificate (PEM) and the SNI names it was asked for."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    (tmp_path / "cert.pem").write_text(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    sni: list[str] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    def note_sni(_sock: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        sni.append(server_name or "")

    ctx.sni_callback = note_sni

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(204 if self.headers.get("host", "").startswith(name) else 421)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, cert_pem, sni


def test_pinned_tls_delivery_keeps_the_name_for_sni_and_the_certificate(tmp_path: Path) -> None:
    name = "hooks.example.test"
    server, cert_pem, sni = _tls_receiver(tmp_path, name)
    try:
        answers = iter([["127.0.0.1"], ["10.0.0.1"]])
        target = Target(allow=net.networks("127.0.0.0/8"), deadline_s=5.0,
                        ssl_context=ssl.create_default_context(cadata=cert_pem),
                        resolver=lambda host, port: next(answers))
        port = server.server_address[1]
        outcome = _send(target, f"https://{name}:{port}/hooks/tls")
        assert outcome.ok and outcome.status_code == 204, outcome
        assert sni == [name]
    finally:
        server.shutdown()
        server.server_close()


def test_one_orgs_slow_endpoints_leave_workers_for_other_orgs(tmp_path: Path) -> None:
    """Two workers, so an org may hold one: an org with two dripping endpoints does not
    make another org's delivery wait for their 2 s deadline."""
    st = build_state(_settings(tmp_path, webhook_workers=2, webhook_timeout_seconds=2.0))
    d = WebhookDispatcher(st.settings, st.secrets, st.session_factory)
    webhooks.install(d)
    d.start()
    slow = DripReceiver(interval=0.2).start()
    fast = Receiver().start()
    try:
        with TestClient(create_app(st.settings, state=st)) as c:
            noisy = make_org_admin(st, c, "Hooli", "admin@hooli.test")
            quiet = make_org_admin(st, c, "Pied Piper", "admin@piedpiper.test")
            for _ in range(2):
                _create(c, noisy, slow.url, ["balance_low"])
            _create(c, quiet, fast.url, ["balance_low"])
            webhooks.emit(noisy.org_id, "balance_low", {"balance": "1.00"})
            wait_until(lambda: slow.connections >= 1, 5, 0.01)
            # Time for the second noisy attempt to start, were the dispatcher to start it:
            # what must not happen has no condition to wait for, so this pause is the test.
            time.sleep(0.1)
            sent = time.monotonic()
            webhooks.emit(quiet.org_id, "balance_low", {"balance": "2.00"})
            got = fast.wait_for(lambda rs: len(rs) >= 1, timeout=10)
            assert got[0].at - sent < 1.0, "the quiet org waited for the noisy one"
            # The noisy org's second endpoint gets its turn once the first attempt ends.
            wait_until(lambda: slow.connections >= 2, 10,
                       message="the noisy org's second endpoint tried")
    finally:
        d.stop()
        webhooks.install(None)
        slow.stop()
        fast.stop()
        st.db_engine.dispose()


def test_a_slow_name_lookup_ends_at_the_deadline() -> None:
    release = threading.Event()

    def stalling(host: str, port: int) -> list[str]:
        release.wait(10)
        return ["127.0.0.1"]

    target = Target(allow=net.networks("127.0.0.0/8"), deadline_s=0.5,
                    ssl_context=ssl.create_default_context(), resolver=stalling)
    try:
        outcome = _send(target, "http://slow-dns.example.test/x")
    finally:
        release.set()
    assert outcome.error == "timeout" and outcome.status_code is None
    assert 400 <= outcome.latency_ms < 1500
