"""Signatures of webhook deliveries (verification is documented in docs/webhooks.md).

Header `onetoken-signature: t=<unix seconds>,v1=<hex>` where the hex is
HMAC-SHA256(secret, f"{t}.{body}") over the exact body bytes. Receivers recompute it,
compare in constant time and reject timestamps older than their tolerance (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Final

SIGNATURE_HEADER: Final = "onetoken-signature"
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (a public prefix)
DEFAULT_TOLERANCE_S: Final = 300


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def header_value(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={signature(secret, t, body)}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when `header` signs `body` with `secret` within the tolerance. Accepts several
    v1 entries (a receiver in the middle of a secret rotation)."""
    t_value: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            t_value = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if t_value is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - t_value) > tolerance_s:
        return False
    expected = signature(secret, t_value, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)
