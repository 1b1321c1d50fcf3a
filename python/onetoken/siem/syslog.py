"""RFC 5424 messages over RFC 5425 transport: TLS over TCP, each message framed by its
octet count, the receiver's certificate verified against its name.

A batch counts as received only when the receiver, after our TLS close_notify, closes the
connection in order: receivers read a connection to its end before closing it, so that
close comes after every message of the batch was read. A reset, a timeout or any error
before it leaves the batch unconfirmed, and the forwarder sends it again (at least once)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from onetoken.kit.net import IpNetwork
from onetoken.security.net import AddressRefused, resolve_checked, system_resolver
from onetoken.siem.stream import Event, rfc3339

# authpriv (10): security and authorization messages (RFC 5424 table 1).
FACILITY = 10
# RFC 5424 severities: informational, notice, warning, error, critical.
_SEVERITY = {"info": 6, "low": 5, "medium": 4, "high": 3, "critical": 2}
APP_NAME = "onetoken"
_MSGID_MAX = 32
_CHUNK = 64 * 1024


def _printable(value: str, limit: int) -> str:
    """An RFC 5424 header field: 1 to `limit` printable US-ASCII characters, "-" if none."""
    kept = "".join(ch for ch in value if "!" <= ch <= "~")[:limit]
    return kept or "-"


def message(event: Event, hostname: str) -> bytes:
    """One RFC 5424 message: the event's JSON as MSG, its kind as MSGID."""
    pri = FACILITY * 8 + _SEVERITY.get(event.severity, 6)
    header = (
        f"<{pri}>1 {rfc3339(event.ts_us)} {_printable(hostname, 255)} {APP_NAME} - "
        f"{_printable(event.kind, _MSGID_MAX)} - "
    )
    return header.encode() + event.json_line()


def frame(events: Iterable[Event], hostname: str) -> bytes:
    """Octet-counting framing (RFC 6587 3.4.1, required by RFC 5425): `LEN SP MSG`."""
    out = bytearray()
    for event in events:
        msg = message(event, hostname)
        out += str(len(msg)).encode() + b" " + msg
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Target:
    """A receiver. `allow` None: the operator's own, reached wherever it is; otherwise a
    tenant's, reached only at a public address or one inside `allow`."""

    host: str
    port: int
    ca_file: Path | None = None
    ca_pem: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    allow: Sequence[IpNetwork] | None = ()


class SendFailed(Exception):
    """A send that did not complete; `code` is a fixed name (never the peer's text)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def tls_context(target: Target) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(target.ca_file) if target.ca_file else None,
        cadata=target.ca_pem or None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if target.client_cert is not None and target.client_key is not None:
        context.load_cert_chain(str(target.client_cert), str(target.client_key))
    return context


def send(target: Target, payload: bytes, *, timeout: float) -> None:
    """Deliver `payload` (framed messages) in one connection and wait for the receiver's
    orderly close; the whole within `timeout` seconds. Raises SendFailed."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SendFailed("timeout")
        return left

    try:
        context = tls_context(target)
    except (OSError, ssl.SSLError, ValueError):
        raise SendFailed("tls_config") from None
    try:
        if target.allow is None:
            addresses = list(dict.fromkeys(system_resolver(target.host, target.port)))
        else:
            addresses = [str(a) for a in resolve_checked(target.host, target.port, target.allow)]
    except AddressRefused:
        raise SendFailed("address_refused") from None
    except (OSError, UnicodeError):
        raise SendFailed("resolve_error") from None
    raw: socket.socket | None = None
    for address in addresses:
        try:
            raw = socket.create_connection((address, target.port), timeout=remaining())
            break
        except OSError:
            continue
    if raw is None:
        raise SendFailed("connect_error")
    try:
        raw.settimeout(remaining())
        # The name (not the address connected to) is what the certificate must carry.
        tls = context.wrap_socket(raw, server_hostname=target.host.strip("[]"))
    except ssl.SSLCertVerificationError:
        raw.close()
        raise SendFailed("tls_verify") from None
    except TimeoutError:
        raw.close()
        raise SendFailed("timeout") from None
    except (ssl.SSLError, OSError):
        raw.close()
        raise SendFailed("tls_error") from None
    try:
        view = memoryview(payload)
        while view:
            # Each write within what is left: a slow receiver cannot hold a worker past
            # the deadline by taking a few bytes at a time.
            tls.settimeout(remaining())
            sent = tls.send(view[:_CHUNK])
            view = view[sent:]
        tls.settimeout(remaining())
        try:
            plain = tls.unwrap()
        except ssl.SSLEOFError:
            return  # closed in order after reading our close_notify: received
        _wait_for_close(plain, remaining)
    except SendFailed:
        raise
    except TimeoutError:
        raise SendFailed("timeout") from None
    except (ssl.SSLError, OSError):
        raise SendFailed("send_error") from None
    finally:
        tls.close()


def _wait_for_close(sock: socket.socket, remaining: Callable[[], float]) -> None:
    """After a receiver answered our close_notify with its own: its TCP close."""
    sock.settimeout(remaining())
    while sock.recv(4096):
        sock.settimeout(remaining())
