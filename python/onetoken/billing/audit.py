"""Billing's seam to the security log: every order, code, refund, price and budget change
is recorded there (actor, org, kind, ids; never amounts typed as free text, never codes).

`onetoken.security.log` is the shared writer; until a deployment has it, the event goes to
the structured log instead (allow-listed fields only), so no change goes unrecorded.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("onetoken.billing.audit")


def record(
    kind: str,
    *,
    org_id: str | None,
    actor: str | None,
    target: str | None = None,
    severity: str = "info",  # info < low < medium < high < critical
    meta: dict[str, str | int] | None = None,
) -> None:
    """Record one billing state change. Never raises: the change is already committed."""
    try:
        from onetoken.security import log as security_log
    except ImportError:
        security_log = None  # type: ignore[assignment]
    if security_log is not None:
        try:
            _to_security_log(security_log, kind, org_id, actor, target, severity, meta or {})
            return
        except Exception as exc:
            log.warning("billing.audit_failed", extra={"exc_type": type(exc).__name__})
    log.info("billing.audit", extra={"kind": kind, "org_id": org_id, "account_id": actor})


def _to_security_log(
    module: Any,
    kind: str,
    org_id: str | None,
    actor: str | None,
    target: str | None,
    severity: str,
    meta: dict[str, str | int],
) -> None:
    module.record(
        module.SecurityEvent(
            kind=kind,
            severity=severity,
            org_id=org_id or "",
            actor_id=actor or "",
            subject_id=target or "",
            detail=dict(meta),
        )
    )
