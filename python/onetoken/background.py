"""Background jobs of a serving process beside the record pump: webhook delivery, risk
detection on the pumped records, the retention purge (and erasures whose ClickHouse part
had to wait)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from onetoken import webhooks
from onetoken.rights import erasure
from onetoken.rights.retention import RetentionWorker
from onetoken.security import detectors as detectors_mod
from onetoken.webhooks.dispatcher import WebhookDispatcher

if TYPE_CHECKING:
    from onetoken.deps import AppState
    from onetoken.gateway.supervisor import GatewaySupervisor

log = logging.getLogger("onetoken.background")


@dataclass
class Background:
    dispatcher: WebhookDispatcher
    detectors: detectors_mod.Detectors
    retention: RetentionWorker

    def stop(self) -> None:
        """After the supervisor stopped (its last batches may still raise events)."""
        self.retention.stop()
        self.dispatcher.stop()
        if webhooks.current() is self.dispatcher:
            webhooks.install(None)


def start(state: AppState, supervisor: GatewaySupervisor) -> Background:
    """Install the webhook dispatcher and the detectors before the supervisor starts
    (so the first batches are observed), and start their threads."""
    settings = state.settings
    dispatcher = WebhookDispatcher(settings, state.secrets, state.session_factory)
    webhooks.install(dispatcher)
    dispatcher.start()
    detectors = detectors_mod.attach(supervisor, settings, state.session_factory)
    retention = RetentionWorker(state.session_factory, settings)

    def finish_erasures() -> None:
        try:
            read = supervisor.sink.read  # type: ignore[attr-defined]
            erasure.complete_pending(state.session_factory, state.secrets, read)
        except Exception as exc:
            log.warning("rights.pending_failed", extra={"exc_type": type(exc).__name__})

    retention.extra_jobs.append(finish_erasures)
    retention.start()
    return Background(dispatcher, detectors, retention)
