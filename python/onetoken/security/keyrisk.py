"""Key-risk events from the gateway's call records (metadata only): a revoked or expired
key still in use, or a key used from outside its allowed addresses.

Runs in the record pump on every drained batch; one event per (key, risk, source
address) per batch, carrying how many requests it covers, so a client retrying in a
loop does not flood the log.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from onetoken.security.log import SecurityEvent, Severity, record

#: record error_code -> (event kind, severity)
KEY_RISKS: Final[dict[str, tuple[str, Severity]]] = {
    "key_revoked": ("key.revoked_used", "medium"),
    "key_expired": ("key.expired_used", "low"),
    "key_ip_not_allowed": ("key.ip_not_allowed", "high"),
}


def observe(batch: dict[str, list[Any]]) -> int:
    """Record the batch's key-risk events; returns how many were recorded."""
    codes = batch.get("error_code")
    if not codes:
        return 0
    hits = [i for i, code in enumerate(codes) if code in KEY_RISKS]
    if not hits:
        return 0

    def col(name: str, i: int) -> str:
        values = batch.get(name)
        return str(values[i]) if values is not None and i < len(values) else ""

    groups: Counter[tuple[str, str, str, str]] = Counter()
    sample: dict[tuple[str, str, str, str], int] = {}
    for i in hits:
        key = (str(codes[i]), col("key_id", i), col("org_id", i), col("source_ip", i))
        groups[key] += 1
        sample.setdefault(key, i)
    for key, count in groups.items():
        code, key_id, org_id, source_ip = key
        kind, severity = KEY_RISKS[code]
        i = sample[key]
        record(
            SecurityEvent(
                kind=kind,
                severity=severity,
                org_id=org_id,
                actor_id=key_id,
                subject_id=key_id,
                source_ip=source_ip,
                user_agent=col("user_agent", i),
                detail={
                    "requests": count,
                    "error_code": code,
                    "path": col("path", i),
                    "first_request_id": col("request_id", i),
                },
            )
        )
    return len(groups)
