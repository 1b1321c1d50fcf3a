"""E-mail against a real SMTP server (aiosmtpd on a free port): invitations with a
working link, the self-service password reset end to end, low-balance and security
alerts once each, nothing at all without SMTP configured, and no planted content or key
in any message."""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import func, select, update

from onetoken.billing import budgets
from onetoken.control import start_mail
from onetoken.db.base import utcnow
from onetoken.mail.models import MailMessage
from onetoken.mail.outbox import MailWorker
from onetoken.orgs import service as orgs
from onetoken.orgs.models import Account, PasswordReset
from onetoken.rights import erasure, retention
from onetoken.security import log as security_log
from onetoken.security.log import SecurityEvent
from onetoken.settings import Settings
from onetoken.state import AppState
from tests import builders as build
from tests.support import wait_until
from tests.unit.conftest import Admin, drained_events

API = "/api/v1"
CANARY = "CANARY-7f3a9 the secret prompt"
CANARY_KEY = "sk-ot-CANARYFULLKEY0123456789abcdefghijklmnop"
RESET = "Reset your onetoken password"
LINK = re.compile(r"(http://\S+\?token=(\S+))")


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"

    def to(self, address: str, subject: str | None = None) -> list[Message]:
        return [m for rcpt, m in self.messages
                if address in rcpt and subject in (None, m["Subject"])]


class _AnyPortController(Controller):
    """aiosmtpd's controller, bound to a free port (it connects once to its own port
    before `start` returns, so the bound one is read back first)."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def smtp() -> Iterator[tuple[_Inbox, int]]:
    inbox = _Inbox()
    controller = _AnyPortController(inbox, hostname="127.0.0.1", port=0)
    controller.start()
    yield inbox, controller.port
    controller.stop()


@pytest.fixture
def mailer(settings: Settings, state: AppState, smtp: tuple[_Inbox, int]) -> Iterator[_Inbox]:
    inbox, port = smtp
    settings.smtp_url = SecretStr(f"smtp://127.0.0.1:{port}")
    settings.public_url = "http://console.test"
    settings.mail_poll_interval_seconds = 0.05
    worker = start_mail(state)
    assert isinstance(worker, MailWorker)
    yield inbox
    worker.stop()
    from onetoken import mail

    mail.install(None)


def _body(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def _link(message: Message) -> tuple[str, str]:
    found = LINK.search(_body(message))
    assert found is not None, _body(message)
    return found.group(1), found.group(2)


def _console_page_holds(client: TestClient, link: str, token: str) -> None:
    """The link opens the console's page whose form sends the token with the password."""
    page = client.get(link.removeprefix("http://console.test"))
    assert page.status_code == 200
    assert f'name="token" value="{token}"' in page.text
    assert page.headers["referrer-policy"] == "no-referrer"


def _login(client: TestClient, email: str, password: str) -> int:
    return client.post(f"{API}/auth/login", json={"email": email, "password": password}).status_code


def test_invite_arrives_with_a_link_that_sets_the_password(
    client: TestClient, admin: Admin, mailer: _Inbox
) -> None:
    r = client.post(f"{API}/accounts", headers=admin.headers,
                    json={"email": "dana@acme.test", "role": "developer"})
    assert r.status_code == 201, r.text
    [message] = wait_until(lambda: mailer.to("dana@acme.test"), message="invitation sent")
    assert message["Subject"] == "Your onetoken invitation"
    link, token = _link(message)
    assert link.startswith("http://console.test/accept-invite?token=oti_")
    _console_page_holds(client, link, token)
    r = client.post(f"{API}/auth/accept-invite",
                    json={"token": token, "password": "a long enough password"})
    assert r.status_code == 200, r.text
    assert _login(client, "dana@acme.test", "a long enough password") == 200


def test_password_reset_end_to_end(
    client: TestClient, admin: Admin, mailer: _Inbox, state: AppState
) -> None:
    known = client.post(f"{API}/auth/password-reset/request", json={"email": "OWNER@acme.test"})
    unknown = client.post(f"{API}/auth/password-reset/request",
                          json={"email": "nobody@acme.test"})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    [message] = wait_until(lambda: mailer.to(admin.email, RESET), message="reset sent")
    assert mailer.to("nobody@acme.test") == []
    link, token = _link(message)
    _console_page_holds(client, link, token)
    with state.session_factory() as session:
        stored = session.scalars(select(PasswordReset.token_hash)).all()
    assert token not in stored and state.secrets.hash_session_token(token) in stored

    r = client.post(f"{API}/auth/password-reset",
                    json={"token": token, "password": "a brand new password"})
    assert r.status_code == 204, r.text
    # Every session ended; the old password is gone, the new one works.
    assert client.get(f"{API}/me", headers=admin.headers).status_code == 401
    assert _login(client, admin.email, admin.password) == 401
    assert _login(client, admin.email, "a brand new password") == 200
    # Single use.
    r = client.post(f"{API}/auth/password-reset", json={"token": token, "password": "x" * 20})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_reset_token"
    kinds = [e["kind"] for e in drained_events()]
    assert "auth.password_reset_requested" in kinds and "auth.password_reset" in kinds

    # An expired token is refused.
    client.post(f"{API}/auth/password-reset/request", json={"email": admin.email})
    second = wait_until(lambda: mailer.to(admin.email, RESET)[1:], message="second reset")[0]
    _, expired = _link(second)
    with state.session_factory() as session:
        session.execute(update(PasswordReset).where(PasswordReset.used_at.is_(None))
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    r = client.post(f"{API}/auth/password-reset", json={"token": expired, "password": "y" * 20})
    assert r.status_code == 401
    assert _login(client, admin.email, "a brand new password") == 200


def test_reset_requests_are_limited_per_address(
    client: TestClient, admin: Admin, mailer: _Inbox, state: AppState, settings: Settings
) -> None:
    for _ in range(settings.password_reset_max_per_hour + 2):
        r = client.post(f"{API}/auth/password-reset/request", json={"email": admin.email})
        assert r.status_code == 202
    with state.session_factory() as session:
        queued = session.scalar(select(func.count()).select_from(MailMessage))
    assert queued == settings.password_reset_max_per_hour
    wait_until(lambda: len(mailer.to(admin.email, RESET)) == settings.password_reset_max_per_hour)


def test_alerts_go_once_to_the_right_roles_and_hold_no_content(
    client: TestClient, admin: Admin, mailer: _Inbox, state: AppState
) -> None:
    with state.session_factory() as session:
        for email, role in (("bill@acme.test", "billing"), ("dev@acme.test", "developer"),
                            ("adm@acme.test", "admin")):
            build.accept_terms(session, orgs.create_account(session, admin.org_id, email,
                                                            build.PASSWORD, role))
        budgets.update_org_settings(session, admin.org_id, low_balance_threshold=1_000_000)
        session.commit()
    for _ in range(2):  # the second check finds the balance still low: no new alert
        with state.session_factory() as session:
            events = budgets.check_events(session, [admin.org_id], [])
            session.commit()
        budgets.emit_all(events)
    # A high-severity event of the org reaches its owners and admins; a low one does not.
    # A burst of the same kind makes one alert per recipient within the cooldown.
    for severity in ("high", "low", "critical"):
        security_log.record(SecurityEvent(
            kind="key.leak_suspected", severity=severity, org_id=admin.org_id,  # type: ignore[arg-type]
            actor_id="key_1", subject_id="key_1",
            detail={"note": CANARY, "key": CANARY_KEY},
        ))
    wait_until(lambda: len(mailer.messages) == 5, message="three low-balance, two security")
    kinds: dict[str, list[str]] = {}
    for rcpt, message in mailer.messages:
        kinds.setdefault(message["Subject"], []).extend(rcpt)
    assert sorted(kinds["onetoken: balance below its threshold"]) == [
        "adm@acme.test", "bill@acme.test", admin.email]
    assert sorted(kinds["onetoken security alert: key.leak_suspected"]) == [
        "adm@acme.test", admin.email]
    for _, message in mailer.messages:
        text = message.as_string()
        assert CANARY not in text and CANARY_KEY not in text
    # Sent bodies do not stay in the outbox.
    with state.session_factory() as session:
        wait_until(lambda: session.scalar(select(func.count()).select_from(MailMessage)
                                          .where(MailMessage.status == "sent")) == 5)
        assert set(session.scalars(select(MailMessage.body_encrypted)).all()) == {""}


def test_nothing_is_queued_or_sent_without_smtp(
    client: TestClient, admin: Admin, smtp: tuple[_Inbox, int], state: AppState
) -> None:
    inbox, _ = smtp
    r = client.post(f"{API}/accounts", headers=admin.headers,
                    json={"email": "dana@acme.test", "role": "developer"})
    assert r.status_code == 201 and r.json()["invite_token"].startswith("oti_")
    r = client.post(f"{API}/auth/password-reset/request", json={"email": admin.email})
    assert r.status_code == 202
    security_log.record(SecurityEvent(kind="key.leak_suspected", severity="critical",
                                      org_id=admin.org_id))
    with state.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(MailMessage)) == 0
        assert session.scalar(select(func.count()).select_from(PasswordReset)) == 0
    assert start_mail(state) is None
    assert inbox.messages == []


def test_mail_and_reset_tokens_go_with_the_account_and_with_time(
    client: TestClient, admin: Admin, mailer: _Inbox, state: AppState, settings: Settings
) -> None:
    r = client.post(f"{API}/accounts", headers=admin.headers,
                    json={"email": "dana@acme.test", "role": "developer"})
    dana = r.json()["id"]
    client.post(f"{API}/auth/password-reset/request", json={"email": admin.email})
    with state.session_factory() as session:
        wait_until(lambda: session.scalar(select(func.count()).select_from(MailMessage)
                                          .where(MailMessage.status == "sent")) == 2)
        account = session.get(Account, dana)
        assert account is not None
        erasure.anonymize_account(session, account)
        session.commit()
        assert session.scalars(select(MailMessage.kind)).all() == ["password_reset"]
        # Past the delivery log's period, and an hour past the token's expiry.
        session.execute(update(MailMessage).values(
            created_at=utcnow() - timedelta(days=settings.delivery_log_ttl_days, seconds=1)))
        session.execute(update(PasswordReset).values(
            expires_at=utcnow() - timedelta(hours=1, seconds=1)))
        session.commit()
    purged = retention.purge(state.session_factory, settings)
    assert (purged.mail, purged.password_resets) == (1, 1)


class _Flaky(_Inbox):
    """Refuses the first `refusals` messages with a temporary error."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refusals > 0:
            self.refusals -= 1
            return "451 try again later"
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize(("refusals", "outcome"), [(1, "sent"), (5, "failed")])
def test_a_refused_message_is_retried_then_given_up(
    client: TestClient, admin: Admin, state: AppState, settings: Settings, refusals: int,
    outcome: str,
) -> None:
    inbox = _Flaky(refusals)
    controller = _AnyPortController(inbox, hostname="127.0.0.1", port=0)
    controller.start()
    settings.smtp_url = SecretStr(f"smtp://127.0.0.1:{controller.port}")
    settings.mail_poll_interval_seconds = 0.05
    settings.mail_backoff_base_seconds = 0.05
    settings.mail_max_attempts = 3
    worker = start_mail(state)
    assert worker is not None
    try:
        client.post(f"{API}/auth/password-reset/request", json={"email": admin.email})
        with state.session_factory() as session:
            row = wait_until(lambda: session.scalars(
                select(MailMessage).where(MailMessage.status != "pending")
                .execution_options(populate_existing=True)).first())
            assert row.status == outcome
            assert row.attempts == (2 if outcome == "sent" else 3)
            assert row.body_encrypted == ""
            assert row.last_error == (None if outcome == "sent" else "SMTPDataError")
        assert len(inbox.messages) == (1 if outcome == "sent" else 0)
    finally:
        worker.stop()
        controller.stop()


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context for 127.0.0.1, whose certificate is the only one SSL_CERT_FILE
    (set by the caller) trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return ctx


def test_starttls_and_credentials_from_the_url_never_logged(
    client: TestClient, admin: Admin, state: AppState, settings: Settings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "s3cret-SMTP-pass"
    logins: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=auth_data.password == secret.encode())

    inbox = _Inbox()
    controller = _AnyPortController(
        inbox, hostname="127.0.0.1", port=0, tls_context=_self_signed(tmp_path),
        require_starttls=True, authenticator=authenticator, auth_required=True,
    )
    controller.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    settings.smtp_url = SecretStr(f"smtp://mailer:{secret}@127.0.0.1:{controller.port}")
    settings.smtp_starttls = True
    settings.mail_poll_interval_seconds = 0.05
    worker = start_mail(state)
    assert worker is not None
    caplog.set_level(logging.DEBUG)
    try:
        client.post(f"{API}/auth/password-reset/request", json={"email": admin.email})
        [message] = wait_until(lambda: inbox.to(admin.email, RESET))
        _, token = _link(message)
    finally:
        worker.stop()
        controller.stop()
    assert logins == [("mailer", secret)]
    # onetoken's own log (the SMTP server's log, of course, has the whole conversation).
    ours = "\n".join(
        f"{r.getMessage()} {vars(r)}" for r in caplog.records if r.name.startswith("onetoken")
    )
    assert "mail.sent" in ours
    for planted in (secret, token, admin.email, RESET):
        assert planted not in ours and planted not in repr(worker.sender)


def test_an_smtp_url_of_another_scheme_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ONETOKEN_SMTP_URL") as failed:
        Settings(data_dir=tmp_path, smtp_url=SecretStr("http://user:pw-9x@mail.test"))
    assert "pw-9x" not in str(failed.value)


def test_one_reset_token_used_twice_at_once_sets_one_password(
    client: TestClient, admin: Admin, mailer: _Inbox
) -> None:
    client.post(f"{API}/auth/password-reset/request", json={"email": admin.email})
    [message] = wait_until(lambda: mailer.to(admin.email, RESET))
    _, token = _link(message)
    passwords = [f"racing password number {i}" for i in range(4)]
    start = threading.Barrier(len(passwords))

    def use(password: str) -> int:
        start.wait()
        return client.post(f"{API}/auth/password-reset",
                           json={"token": token, "password": password}).status_code

    with ThreadPoolExecutor(len(passwords)) as pool:
        codes = list(pool.map(use, passwords))
    assert sorted(codes) == [204, 401, 401, 401]
    winner = passwords[codes.index(204)]
    assert [p for p in passwords if _login(client, admin.email, p) == 200] == [winner]
