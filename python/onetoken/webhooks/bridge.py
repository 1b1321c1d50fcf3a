"""Security-log events that are also webhook events: abnormal sign-ins and permission
changes, recorded by the accounts and keys code, reach the org's callback addresses
through `forward`, which the composition root (onetoken.control) subscribes to the security
events published on the process's event bus. (The risk detectors emit their own
webhooks.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from onetoken.security.log import SecurityEvent

WEBHOOK_KIND: Final[dict[str, str]] = {
    "auth.login_abnormal": "abnormal_login",
    "auth.login_rate_abnormal": "abnormal_login",
    "auth.lockout": "abnormal_login",
    "admin.role_changed": "permission_change",
    "admin.account_changed": "permission_change",
    "admin.key_scope_changed": "permission_change",
    "admin.key_changed": "permission_change",
    "admin.key_revoked": "permission_change",
    "admin.key_rotated": "permission_change",
    # A key moved between applications falls under other limits.
    "admin.key_application_changed": "permission_change",
    "admin.application_changed": "permission_change",
    "admin.totp_reset": "permission_change",
}
# Before/after values forwarded for these fields only: settings, never personal data
# (an account change may also carry email or name changes, which stay in the log).
_FORWARDED_FIELDS: Final = frozenset(
    {
        "role", "status", "allowed_models", "allowed_ips", "expires_at", "not_before",
        "rpm", "tpm", "concurrency", "budget_day", "budget_month", "scope", "reason",
        "ua_family", "net", "attempts", "failures", "lock_seconds", "application_id",
    }
)


def forward(event: SecurityEvent) -> None:
    """Emit the webhook for `event` when its kind is one (never raises)."""
    kind = WEBHOOK_KIND.get(event.kind)
    if kind is None:
        return
    from onetoken import webhooks

    if webhooks.current() is None:
        return
    data: dict[str, Any] = {
        "security_kind": event.kind,
        "severity": event.severity,
        "actor_id": event.actor_id,
        "subject_id": event.subject_id,
    }
    for key, value in event.detail.items():
        field = key.rsplit(".", 1)[0]
        if key == "changed" or field in _FORWARDED_FIELDS:
            data[key] = value
    webhooks.emit(event.org_id, kind, data)
