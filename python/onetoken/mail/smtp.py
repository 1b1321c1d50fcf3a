"""Sending one message over SMTP, as ONETOKEN_SMTP_URL says: smtp:// (plain, or STARTTLS
with ONETOKEN_SMTP_STARTTLS) or smtps:// (TLS from the start), with the user and password
of the URL when it has them."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Protocol
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr


class SmtpSettings(Protocol):
    smtp_url: SecretStr | None
    smtp_starttls: bool
    mail_from: str
    mail_timeout_seconds: float


@dataclass(frozen=True, slots=True)
class SmtpSender:
    host: str
    port: int
    implicit_tls: bool
    starttls: bool
    username: str | None
    password: SecretStr | None
    from_address: str
    timeout: float

    @classmethod
    def from_settings(cls, settings: SmtpSettings) -> SmtpSender | None:
        """None when no SMTP server is configured."""
        if settings.smtp_url is None:
            return None
        url = urlsplit(settings.smtp_url.get_secret_value())
        implicit = url.scheme == "smtps"
        return cls(
            host=url.hostname or "localhost",
            port=url.port or (465 if implicit else 25),
            implicit_tls=implicit,
            starttls=settings.smtp_starttls and not implicit,
            username=unquote(url.username) if url.username else None,
            password=SecretStr(unquote(url.password)) if url.password else None,
            from_address=settings.mail_from,
            timeout=settings.mail_timeout_seconds,
        )

    def send(self, to_address: str, subject: str, body: str) -> None:
        """Deliver one plain-text message; raises on any failure (the caller retries)."""
        message = EmailMessage()
        message["From"] = self.from_address
        message["To"] = to_address
        message["Subject"] = subject
        message.set_content(body)
        context = ssl.create_default_context()
        client: smtplib.SMTP
        if self.implicit_tls:
            client = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with client:
            if self.starttls:
                client.starttls(context=context)
            if self.username is not None and self.password is not None:
                client.login(self.username, self.password.get_secret_value())
            client.send_message(message)

    def __repr__(self) -> str:
        return f"SmtpSender({self.host}:{self.port})"
