"""An org's own SIEM destination: what its admins save, checked like every address a
tenant gives (public, or inside ONETOKEN_SIEM_PRIVATE_CIDRS), and a test send."""

from __future__ import annotations

import enum
import ssl
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.db.base import new_id, utcnow
from onetoken.kit.errors import Unprocessable
from onetoken.kit.net import IpNetwork
from onetoken.security.net import AddressRefused, resolve_checked
from onetoken.siem import syslog
from onetoken.siem.models import SiemDestination
from onetoken.siem.stream import Event

_NOT_PUBLIC = "The receiver must be at a public address."
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal")
MAX_CA_PEM = 64 * 1024


def get(session: Session, org_id: str) -> SiemDestination | None:
    return session.scalar(select(SiemDestination).where(SiemDestination.org_id == org_id))


def check_host(host: str, port: int, allow: Sequence[IpNetwork]) -> None:
    """Refuse a receiver outside the public internet and the allow-list: an address
    literal as is, a name by what it resolves to now (every send checks again, on the
    address it connects to). A name that does not resolve now is accepted."""
    if not allow and (host == "localhost" or host.endswith(_INTERNAL_SUFFIXES)):
        raise Unprocessable(_NOT_PUBLIC, param="host")
    try:
        resolve_checked(host, port, allow)
    except AddressRefused:
        raise Unprocessable(_NOT_PUBLIC, param="host") from None
    except (OSError, UnicodeError, ValueError):
        return


def check_ca(ca_pem: str | None) -> None:
    if ca_pem is None:
        return
    if len(ca_pem) > MAX_CA_PEM:
        raise Unprocessable("The CA bundle is too large.", param="ca_pem")
    try:
        ssl.create_default_context(cadata=ca_pem)
    except (ssl.SSLError, ValueError, TypeError):  # TypeError: not ASCII
        raise Unprocessable("The CA bundle is not PEM certificates.", param="ca_pem") from None


class Keep(enum.Enum):
    """`save(ca_pem=KEEP)`: the CA bundle saved before stays."""

    CA = "keep"


KEEP = Keep.CA


def save(
    session: Session, org_id: str, *, host: str, port: int, ca_pem: str | Keep | None,
    enabled: bool, allow: Sequence[IpNetwork],
) -> SiemDestination:
    """Create or change the org's destination. A new one starts at now (the history
    before is in the export); a changed one keeps its cursor, so a move to another
    receiver loses nothing. `ca_pem` None: the system's CAs; KEEP: as saved."""
    check_host(host, port, allow)
    row = get(session, org_id)
    if isinstance(ca_pem, Keep):
        ca_pem = row.ca_pem if row is not None else None
    check_ca(ca_pem)
    now = utcnow()
    if row is None:
        row = SiemDestination(
            id=new_id("siem"), org_id=org_id, cursor_ts_us=int(now.timestamp() * 1_000_000),
            cursor_event_id="", delivered=0, failures=0, created_at=now,
        )
        session.add(row)
    row.host, row.port, row.ca_pem, row.enabled = host, port, ca_pem, enabled
    row.updated_at = now
    # A fixed address or CA is worth trying now, not after the old backoff.
    row.failures, row.last_error, row.next_attempt_at = 0, None, now
    session.flush()
    return row


def remove(session: Session, org_id: str) -> bool:
    row = get(session, org_id)
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def test_event(org_id: str) -> Event:
    """A `siem.test` event, sent only to the receiver (never in the security log)."""
    now = datetime.now(UTC)
    return Event(
        int(now.timestamp() * 1_000_000), uuid.uuid4().hex, "siem.test", "info", org_id,
        "", "", "", "", {"test": True},
    )


def test_send(target: syslog.Target, org_id: str, *, hostname: str, timeout: float) -> str:
    """Send one test event; returns its event id. Raises syslog.SendFailed."""
    event = test_event(org_id)
    syslog.send(target, syslog.frame([event], hostname), timeout=timeout)
    return event.event_id
