"""Outgoing webhook events for org callback addresses (docs/webhooks.md).

`emit` is the seam other domains call (billing: `balance_low`, `quota_exhausted`; the
security detectors: `key_risk`, `abnormal_calls`, ...). The process that runs the server
installs a `WebhookDispatcher` (`install`), which persists each event as one delivery per
subscribed endpoint and delivers it from a background thread: signed, retried with
backoff, logged. In a process without a dispatcher (CLI tools) events are counted in the
log and dropped: those processes raise none of the events the catalogue lists.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onetoken.webhooks.dispatcher import WebhookDispatcher

log = logging.getLogger("onetoken.webhooks")

_dispatcher: WebhookDispatcher | None = None


def install(dispatcher: WebhookDispatcher | None) -> None:
    """Make `dispatcher` the target of `emit` (None uninstalls)."""
    global _dispatcher
    _dispatcher = dispatcher


def current() -> WebhookDispatcher | None:
    return _dispatcher


def emit(org_id: str, kind: str, data: Mapping[str, Any]) -> None:
    """Queue event `kind` for the org's callback addresses (org_id "" = platform-wide,
    for operators' platform endpoints). `data` holds metadata only (ids, amounts,
    periods, counts), never request content: non-scalar values are dropped. Never raises
    into the caller."""
    try:
        from onetoken.webhooks.dispatcher import prepare

        normalized, clean = prepare(kind, dict(data))
        dispatcher = _dispatcher
        if dispatcher is None:
            log.warning("webhooks.no_dispatcher", extra={"org_id": org_id, "kind": normalized})
            return
        dispatcher.submit(org_id, normalized, clean)
    except Exception as exc:
        log.error("webhooks.emit_failed", extra={"exc_type": type(exc).__name__})
