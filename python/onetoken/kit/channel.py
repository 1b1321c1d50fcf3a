"""Bearer tokens for the internal channels between onetoken processes.

Gateways fetch their engine configuration and snapshots from the control process, and
operator CLI commands (reconcile, audit-retention) ask a running control process to read
what only it may open (chDB). Each channel has its own token, derived from the master
secret (ONETOKEN_SECRET_KEY, or the one generated in the data dir), so a process that
holds the master secret can authenticate without any extra configuration, and a token
leaked from one channel opens no other.

Standard library only: the gateway process imports this and must stay slim.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

# The gateway channel: engine configuration and snapshots (they carry provider
# credentials and key-hash secrets).
GATEWAY: Final = "gateway"
# The operator channel: reads a running control process performs for the CLI.
OPS: Final = "ops"

_CONTEXT: Final = b"onetoken internal channel v1:"


def channel_token(master: bytes, channel: str) -> str:
    """The bearer token of `channel`: hex HMAC-SHA256 of the master secret."""
    return hmac.new(master, _CONTEXT + channel.encode(), hashlib.sha256).hexdigest()


def bearer_matches(authorization: str | None, expected: str) -> bool:
    """True when an `Authorization: Bearer <token>` header carries `expected`
    (constant-time comparison)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())
