"""The composition root of the control process: the one place where the AppState, the
control API, the event bus and the background jobs are built and wired together. serve.py,
the CLI and the tests build through here.

The event bus (AppState.events) carries recorded security events to the webhooks bridge
and the e-mail alerts, and every batch ingestion took to the key-risk check and the risk detectors.

Background jobs of a serving control process beside ingestion: webhook delivery, e-mail
(with ONETOKEN_SMTP_URL), risk detection on the ingested records, the retention purge, the
queued ClickHouse part of account erasures, the names in ClickHouse's dimension tables, and
with Redis the money cap publisher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

# Every domain's tables mapped (and their cross-domain foreign keys resolvable) before the
# first query of this process.
import onetoken.registry  # noqa: F401
from onetoken import mail, siem, webhooks
from onetoken.db.migrate import upgrade
from onetoken.db.session import SessionFactory, make_engine, make_session_factory
from onetoken.gateway.snapshot import SnapshotSource
from onetoken.ingest.batch import Batch
from onetoken.ingest.caps import CapPublisher
from onetoken.ingest.dimensions import DimensionSync
from onetoken.ingest.metrics import ingestor_metrics, journal_metrics
from onetoken.kit import channel, telemetry
from onetoken.kit.crypto import Secrets
from onetoken.kit.events import EventBus
from onetoken.kit.metrics import Metric, Registry
from onetoken.mail import notices
from onetoken.mail.outbox import MailWorker
from onetoken.mail.smtp import SmtpSender
from onetoken.rights import erasure
from onetoken.rights.retention import RetentionWorker
from onetoken.risk import detectors as detectors_mod
from onetoken.risk import keyrisk
from onetoken.security import log as security_log
from onetoken.security.log import SecurityEvent
from onetoken.settings import Settings
from onetoken.siem.forwarder import Forwarder
from onetoken.state import AppState
from onetoken.webhooks import bridge
from onetoken.webhooks.dispatcher import WebhookDispatcher

if TYPE_CHECKING:
    from onetoken.gateway.supervisor import ControlRuntime
    from onetoken.ingest.ingestor import Ingestor


def new_event_bus() -> EventBus:
    """The process's event bus with the subscribers every process has: the recorded
    security events that are also webhook events (abnormal sign-ins, permission changes)
    go to the webhooks bridge."""
    events = EventBus()
    events.subscribe(SecurityEvent, bridge.forward)
    events.subscribe(SecurityEvent, notices.on_security_event)
    return events


def build_state(
    settings: Settings, runtime: ControlRuntime | None = None, *, migrate: bool = True
) -> AppState:
    """Open the control DB (migrating it to head) and derive the secrets."""
    settings.ensure_dirs()
    db_engine = make_engine(settings.database_url)
    if migrate:
        upgrade(db_engine)
    events = new_event_bus()
    # record() anywhere in this process queues here; the ingestor's flush (or exit) writes.
    security_log.install(security_log.SecurityLog(settings.spool_dir, events=events))
    secrets = Secrets.from_settings(settings)
    session_factory = make_session_factory(db_engine)
    return AppState(
        settings=settings,
        secrets=secrets,
        db_engine=db_engine,
        session_factory=session_factory,
        runtime=runtime,
        # A serving process replaces it with one sharing the ingestor's mark lock.
        snapshots=SnapshotSource(secrets, session_factory),
        gateway_token=channel.channel_token(settings.secret_key_bytes(), channel.GATEWAY),
        events=events,
    )


def create_app(
    settings: Settings,
    runtime: ControlRuntime | None = None,
    *,
    state: AppState | None = None,
) -> FastAPI:
    """The control API, with the gateway channel. `runtime` (ingestion, see serve.py) is
    what the call-log readers use; without one (tests, tools) they have no ClickHouse.
    Without `state` the app builds its own and disposes its DB pool at shutdown."""
    # Here, not at the top: the web layer is most of this module's import time, and the
    # processes that only build state (`onetoken ingest` on every gateway machine, the
    # CLI's commands) never serve it.
    from onetoken.web.app import build_app

    app_state = state or build_state(settings, runtime)
    if runtime is not None:
        app_state.runtime = runtime
    app = build_app(app_state, owns_engine=state is None)
    if settings.otel_endpoint is not None:
        telemetry.instrument(app, app_state.db_engine, telemetry.Export(
            endpoint=settings.otel_endpoint,
            ratio=settings.otel_ratio,
            service_name=f"{settings.otel_service_name}-control",
            interval_ms=settings.otel_export_interval_ms,
        ))
    return app


def wire_ingestion(events: EventBus, ingestor: Any) -> None:
    """Every ingestion cycle flushes the security log; every batch ingestion took goes out
    on `events`, where the key-risk check (and the detectors, start_background) take it."""
    security_log.attach_to_supervisor(ingestor)
    ingestor.batch_observers.append(events.publish)
    events.subscribe(Batch, keyrisk.observe)


@dataclass
class Background:
    dispatcher: WebhookDispatcher
    detectors: detectors_mod.Detectors
    retention: RetentionWorker
    erasures: erasure.ErasureWorker
    caps: CapPublisher | None = None
    dimensions: DimensionSync | None = None
    mailer: MailWorker | None = None
    siem: Forwarder | None = None

    def stop(self) -> None:
        """After ingestion stopped (its last batches may still raise events)."""
        if self.siem is not None:
            self.siem.stop()
            if siem.current() is self.siem:
                siem.install(None)
        if self.mailer is not None:
            self.mailer.stop()
            if mail.current() is self.mailer:
                mail.install(None)
        if self.dimensions is not None:
            self.dimensions.stop()
        if self.caps is not None:
            self.caps.stop()
        self.retention.stop()
        self.erasures.stop()
        erasure.install(None)
        self.dispatcher.stop()
        if webhooks.current() is self.dispatcher:
            webhooks.install(None)


def start_background(state: AppState, ingestor: Ingestor) -> Background:
    """Install the webhook dispatcher, the security log's flush and the batch consumers
    before the ingestor starts (so the first batches are observed), and start their
    threads."""
    settings = state.settings
    dispatcher = WebhookDispatcher(settings, state.secrets, state.session_factory)
    webhooks.install(dispatcher)
    dispatcher.start()
    wire_ingestion(state.events, ingestor)
    detectors = detectors_mod.attach(state.events, ingestor, settings, state.session_factory)
    retention = RetentionWorker(state.session_factory, settings)
    retention.start()
    erasures = erasure.make_worker(state, ingestor)  # started by serve after the ingestor
    # Through the sink's client: the one this process may hold on an embedded chDB path.
    dimensions = DimensionSync(state.session_factory, lambda query: ingestor.sink.read(query))
    dimensions.start()
    caps = None
    if settings.redis_url:
        # Listens for money moved by this process's commits from here on, and publishes
        # every org's cap first.
        caps = state.caps = CapPublisher(settings, state.session_factory)
        caps.start()
    # The security log to SIEM receivers, read through the same client.
    forwarder = Forwarder(settings, state.session_factory, lambda query: ingestor.sink.read(query))
    siem.install(forwarder)
    forwarder.start()
    return Background(dispatcher, detectors, retention, erasures, caps, dimensions,
                      start_mail(state), forwarder)


def start_mail(state: AppState) -> MailWorker | None:
    """The e-mail worker, installed and started when ONETOKEN_SMTP_URL is set."""
    sender = SmtpSender.from_settings(state.settings)
    if sender is None:
        return None
    worker = MailWorker(state.settings, state.secrets, state.session_factory, sender)
    mail.install(worker)
    worker.start()
    return worker


def _security_log_metrics() -> list[Metric]:
    writer = security_log.current()
    return writer.metrics() if writer is not None else []


def ingest_metrics(
    settings: Settings, session_factory: SessionFactory, ingestor: Ingestor
) -> Registry:
    """What every ingesting process serves on its metrics listener (`onetoken ingest
    --metrics-listen`): the journals in its spool dir behind their cursors, its ingestor
    and ClickHouse sink, and its security log's queue and spool."""
    registry = Registry()
    registry.register("journal", lambda: journal_metrics(settings.spool_dir, session_factory))
    registry.register("ingest", lambda: ingestor_metrics(ingestor))
    registry.register("security_log", _security_log_metrics)
    return registry


def control_metrics(state: AppState, ingestor: Ingestor) -> Registry:
    """The control process's (ONETOKEN_CONTROL_METRICS_LISTEN): an ingesting process's,
    the control API's requests and, with Redis, the cap publisher."""
    registry = ingest_metrics(state.settings, state.session_factory, ingestor)
    registry.register("control_api", state.requests.metrics)
    if state.caps is not None:
        registry.register("cap_publisher", state.caps.metrics)
    forwarder = siem.current()
    if forwarder is not None:
        registry.register("siem", forwarder.metrics)
    return registry
