"""Key-risk events from the gateway's call records (metadata only): a revoked or expired
key still in use, or a key used from outside its allowed addresses.

Runs on every ingested batch (its call groups); one event per (key, risk, source
address) per batch, carrying how many requests it covers, so a client retrying in a
loop does not flood the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from onetoken.security.log import SecurityEvent, Severity, record

if TYPE_CHECKING:
    from onetoken.ingest.batch import Batch, FailureGroup

#: record error_code -> (event kind, severity)
KEY_RISKS: Final[dict[str, tuple[str, Severity]]] = {
    "key_revoked": ("key.revoked_used", "medium"),
    "key_expired": ("key.expired_used", "low"),
    "key_ip_not_allowed": ("key.ip_not_allowed", "high"),
}


def observe(batch: Batch) -> int:
    """Record the batch's key-risk events, one per code, key, org and source; returns how
    many were recorded."""
    groups: dict[tuple[str, str, str, str], list[FailureGroup]] = {}
    for c in batch.failures:
        if c.error_code in KEY_RISKS:
            groups.setdefault((c.error_code, c.key_id, c.org_id, c.source_ip), []).append(c)
    for (code, key_id, org_id, source_ip), calls in groups.items():
        kind, severity = KEY_RISKS[code]
        # batch.failures is in order of first appearance: the first group holds the
        # first request of these.
        first = calls[0]
        record(
            SecurityEvent(
                kind=kind,
                severity=severity,
                org_id=org_id,
                actor_id=key_id,
                subject_id=key_id,
                source_ip=source_ip,
                user_agent=first.first_user_agent,
                detail={
                    "requests": sum(c.calls for c in calls),
                    "error_code": code,
                    "path": first.first_path,
                    "first_request_id": first.first_request_id,
                },
            )
        )
    return len(groups)
