"""The control API: create_app(settings, runtime) -> FastAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI

from onetoken import __version__, docs_pages
from onetoken.analytics.router import router as analytics_router
from onetoken.billing.router import router as billing_router
from onetoken.db.migrate import upgrade
from onetoken.db.session import make_engine, make_session_factory
from onetoken.deps import AppState
from onetoken.gateway.router import router as gateway_channel_router
from onetoken.gateway.snapshot import SnapshotSource
from onetoken.keys.router import router as keys_router
from onetoken.kit import channel
from onetoken.kit.channel import channel_token
from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import ERROR_RESPONSES, install_error_handlers
from onetoken.kit.logging import AccessLogMiddleware
from onetoken.ops.router import router as ops_router
from onetoken.orgs.router import router as orgs_router
from onetoken.providers.router import router as providers_router
from onetoken.rights.router import router as rights_router
from onetoken.security import log as security_log
from onetoken.security.permissions import PublicDep
from onetoken.security.router import router as security_router
from onetoken.settings import Settings
from onetoken.webhooks.router import router as webhooks_router
from onetoken.webhooks.router import stop_test_sender

if TYPE_CHECKING:
    from onetoken.gateway.supervisor import ControlRuntime


def build_state(
    settings: Settings, runtime: ControlRuntime | None = None, *, migrate: bool = True
) -> AppState:
    """Open the control DB (migrating it to head) and derive the secrets."""
    settings.ensure_dirs()
    db_engine = make_engine(settings.database_url)
    if migrate:
        upgrade(db_engine)
    # record() anywhere in this process queues here; the ingestor's flush (or exit) writes.
    security_log.install(security_log.SecurityLog(settings.spool_dir))
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
        gateway_token=channel_token(settings.secret_key_bytes(), channel.GATEWAY),
    )


def create_app(
    settings: Settings,
    runtime: ControlRuntime | None = None,
    *,
    state: AppState | None = None,
) -> FastAPI:
    """The control API, with the gateway channel. `runtime` (ingestion, see serve.py) is
    what the call-log readers use; without one (tests, tools) they have no ClickHouse."""
    app_state = state or build_state(settings, runtime)
    if runtime is not None:
        app_state.runtime = runtime

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        stop_test_sender(app_state)
        # The runtime belongs to whoever started it (serve.py); only the pool is ours.
        if state is None:
            app_state.db_engine.dispose()

    app = FastAPI(
        title="onetoken control API",
        version=__version__,
        openapi_url="/api/openapi.json",
        # Served by docs_pages from the package's own assets (never from a CDN).
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.onetoken = app_state
    install_error_handlers(app)
    if settings.api_docs:
        docs_pages.install(app)
    app.add_middleware(AccessLogMiddleware)

    api = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)
    api.include_router(orgs_router)
    api.include_router(keys_router)
    api.include_router(providers_router)
    api.include_router(billing_router)
    api.include_router(analytics_router)
    api.include_router(webhooks_router)
    api.include_router(rights_router)
    api.include_router(security_router)
    app.include_router(api)
    # The gateways' snapshots and config; the gateway channel token, not a session.
    app.include_router(gateway_channel_router)
    # The CLI's reads while the server holds chDB; the ops channel token, not a session.
    app.include_router(ops_router)

    @app.get("/healthz", include_in_schema=False, dependencies=[PublicDep])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
