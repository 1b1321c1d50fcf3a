"""AppState: what one control process holds open (settings, secrets, the control DB) and
hands to the web layer, the CLI and the background jobs. Built by onetoken.control."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from onetoken.db.session import SessionFactory
from onetoken.kit.crypto import Secrets
from onetoken.kit.events import EventBus
from onetoken.kit.logging import POLLED_ROUTES
from onetoken.kit.metrics import RequestStats
from onetoken.settings import Settings

if TYPE_CHECKING:
    from onetoken.gateway.snapshot import SnapshotSource
    from onetoken.gateway.supervisor import ControlRuntime
    from onetoken.ingest.caps import CapPublisher


@dataclass
class AppState:
    settings: Settings
    secrets: Secrets
    db_engine: Engine
    session_factory: SessionFactory
    # Ingestion and upkeep of a serving control process; None in tools and tests.
    runtime: ControlRuntime | None
    # What gateways poll over the gateway channel (onetoken.web.routes.gateway).
    snapshots: SnapshotSource
    # The gateway channel's bearer token (kit.channel.GATEWAY).
    gateway_token: str
    # The process's event bus: security events and ingested batches to their consumers.
    events: EventBus
    # The money caps in Redis (ONETOKEN_REDIS_URL); None without Redis and outside serving.
    caps: CapPublisher | None = None
    # The control API's requests, counted for the metrics listener (control.py).
    requests: RequestStats = field(
        default_factory=lambda: RequestStats("onetoken_control", long_polls=POLLED_ROUTES)
    )

    def commit_change(self, session: Session) -> None:
        """Commit a change gateways must see (it bumped the config revision), then answer
        their waiting snapshot polls."""
        session.commit()
        self.config_changed()

    def config_changed(self) -> None:
        """Called after a change that gateways must see has been committed (it bumped the
        config revision with it): answers the gateways' waiting snapshot polls now."""
        self.snapshots.changed()
