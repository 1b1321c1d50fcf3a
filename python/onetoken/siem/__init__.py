"""Security events to a SIEM (docs/siem.md): the security log read in order after a
cursor (`stream`), as RFC 5424 syslog over TLS (`syslog`), pushed to the operator's and
each org's receiver from a durable cursor per destination (`forwarder`), whose org side
org admins configure (`service`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onetoken.siem.forwarder import Forwarder

_forwarder: Forwarder | None = None


def install(forwarder: Forwarder | None) -> None:
    """Make `forwarder` the one a saved destination wakes (None uninstalls)."""
    global _forwarder
    _forwarder = forwarder


def current() -> Forwarder | None:
    return _forwarder
