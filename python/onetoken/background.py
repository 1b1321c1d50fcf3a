"""Background jobs of a serving control process beside ingestion: webhook delivery, risk
detection on the ingested records, the retention purge, and the queued ClickHouse part of
account erasures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from onetoken import webhooks
from onetoken.rights import erasure
from onetoken.rights.retention import RetentionWorker
from onetoken.security import detectors as detectors_mod
from onetoken.webhooks.dispatcher import WebhookDispatcher

if TYPE_CHECKING:
    from onetoken.deps import AppState
    from onetoken.ingest import Ingestor


@dataclass
class Background:
    dispatcher: WebhookDispatcher
    detectors: detectors_mod.Detectors
    retention: RetentionWorker
    erasures: erasure.ErasureWorker

    def stop(self) -> None:
        """After ingestion stopped (its last batches may still raise events)."""
        self.retention.stop()
        self.erasures.stop()
        erasure.install(None)
        self.dispatcher.stop()
        if webhooks.current() is self.dispatcher:
            webhooks.install(None)


def start(state: AppState, ingestor: Ingestor) -> Background:
    """Install the webhook dispatcher and the detectors before the ingestor starts (so
    the first batches are observed), and start their threads."""
    settings = state.settings
    dispatcher = WebhookDispatcher(settings, state.secrets, state.session_factory)
    webhooks.install(dispatcher)
    dispatcher.start()
    detectors = detectors_mod.attach(ingestor, settings, state.session_factory)
    retention = RetentionWorker(state.session_factory, settings)
    retention.start()
    erasures = erasure.make_worker(state, ingestor)  # started by serve after the ingestor
    return Background(dispatcher, detectors, retention, erasures)
