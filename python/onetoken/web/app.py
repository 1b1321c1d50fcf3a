"""The control API as a FastAPI app over an AppState (the composition root, onetoken.control,
builds the state and calls build_app)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request

from onetoken import __version__
from onetoken.kit.errors import ERROR_RESPONSES, install_error_handlers
from onetoken.kit.logging import AccessLogMiddleware
from onetoken.state import AppState
from onetoken.web import console, docs_pages
from onetoken.web.deps import PublicDep
from onetoken.web.routes import (
    analytics,
    applications,
    billing,
    gateway,
    keys,
    ops,
    orgs,
    pools,
    providers,
    rights,
    security,
    siem,
    sso,
    tickets,
    webhooks,
)


def include_routes(app: FastAPI) -> None:
    """Every route of the control process (the permissions doc reads them from here)."""
    api = APIRouter(prefix="/api/v1", responses=ERROR_RESPONSES)
    for module in (orgs, pools, keys, applications, providers, billing, analytics, webhooks,
                   rights, security, siem, tickets, sso):
        api.include_router(module.router)
    app.include_router(api)
    # The gateways' snapshots and config; the gateway channel token, not a session.
    app.include_router(gateway.router)
    # The CLI's reads while the server holds chDB; the ops channel token, not a session.
    app.include_router(ops.router)

    @app.get("/healthz", include_in_schema=False, dependencies=[PublicDep])
    def healthz(request: Request) -> dict[str, str]:
        out = {"status": "ok"}
        caps = request.app.state.onetoken.caps
        if caps is not None:
            # "failing" while rounds fail (Redis down or slow): gateways lease against
            # caps that miss the money moved since (docs/scale-out.md).
            out["cap_publisher"] = caps.health()
        return out


def build_app(state: AppState, *, owns_engine: bool) -> FastAPI:
    """The control API over `state`; with `owns_engine` its shutdown disposes the DB pool
    (the runtime belongs to whoever started it)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        webhooks.stop_test_sender(state)
        if owns_engine:
            state.db_engine.dispose()

    app = FastAPI(
        title="onetoken control API",
        version=__version__,
        openapi_url="/api/openapi.json",
        # Served by docs_pages from the package's own assets (never from a CDN).
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.onetoken = state
    install_error_handlers(app)
    if state.settings.api_docs:
        docs_pages.install(app)
    app.add_middleware(AccessLogMiddleware, observe=state.requests.observe)
    include_routes(app)
    console.install(app)
    return app
