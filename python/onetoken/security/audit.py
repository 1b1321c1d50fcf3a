"""The admin audit trail: every admin action lands in the security log.

Services record precise events with before/after values (`change`); the permission
dependency records a generic `admin.action` for any unsafe request that recorded nothing
more precise, and `access.denied` for refused ones. Before/after values are settings
(roles, statuses, scopes, limits), never secrets: callers pass only such fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import orjson
from starlette.requests import Request

from onetoken.kit.logging import route_template
from onetoken.security.log import Scalar, SecurityEvent, Severity, record


class Actor(Protocol):
    """Who acts: a Principal of the control API, or a CLI operator (`CliActor`)."""

    @property
    def account_id(self) -> str: ...
    @property
    def org_id(self) -> str: ...
    @property
    def source_ip(self) -> str: ...
    @property
    def user_agent(self) -> str: ...
    @property
    def audit_marks(self) -> list[str]: ...


class CliActor:
    """The operator at a shell: no account, no address."""

    def __init__(self, org_id: str = "", account_id: str = "") -> None:
        self.account_id = account_id
        self.org_id = org_id
        self.source_ip = ""
        self.user_agent = "onetoken-cli"
        self.audit_marks: list[str] = []


def _scalar(value: Any) -> Scalar:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Scalar]:
    """`field.before` / `field.after` for every field whose value changed."""
    out: dict[str, Scalar] = {}
    changed = [k for k in after if before.get(k) != after.get(k)]
    for name in changed:
        out[f"{name}.before"] = _scalar(before.get(name))
        out[f"{name}.after"] = _scalar(after.get(name))
    if changed:
        out["changed"] = ",".join(changed)
    return out


def event(
    actor: Actor,
    kind: str,
    severity: Severity,
    *,
    subject_id: str = "",
    org_id: str | None = None,
    detail: Mapping[str, Scalar] | None = None,
) -> None:
    record(
        SecurityEvent(
            kind=kind,
            severity=severity,
            org_id=actor.org_id if org_id is None else org_id,
            actor_id=actor.account_id,
            subject_id=subject_id,
            source_ip=actor.source_ip,
            user_agent=actor.user_agent,
            detail=dict(detail or {}),
        )
    )
    actor.audit_marks.append(kind)


def change(
    actor: Actor,
    kind: str,
    *,
    subject_id: str,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    severity: Severity = "medium",
    org_id: str | None = None,
    extra: Mapping[str, Scalar] | None = None,
) -> None:
    """Record a change with the before and after value of every field that changed
    (nothing when nothing changed)."""
    detail = diff(before, after)
    if not detail:
        return
    event(
        actor, kind, severity, subject_id=subject_id, org_id=org_id,
        detail={**detail, **(extra or {})},
    )


def access_denied(request: Request, actor: Actor, permission: str) -> None:
    event(
        actor,
        "access.denied",
        "low",
        detail={
            "method": request.method,
            "route": route_template(request.scope),
            "permission": permission,
        },
    )


def request_done(request: Request, actor: Actor, *, outcome: str, error_code: str) -> None:
    if actor.audit_marks:
        return
    event(
        actor,
        "admin.action",
        "info" if outcome == "ok" else "low",
        detail={
            "method": request.method,
            "route": route_template(request.scope),
            "outcome": outcome,
            "error_code": error_code or None,
        },
    )
