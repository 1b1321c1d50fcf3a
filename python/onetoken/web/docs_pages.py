"""The API documentation pages (Swagger UI at /api/docs) served from the package.

The Swagger UI assets come from the fastapi-offline wheel and are served by the control
API itself, so the pages work on networks without Internet access and never make the
browser fetch code from a third-party host. ONETOKEN_API_DOCS=false leaves only
/api/openapi.json.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/api/docs"
ASSETS_URL = "/api/docs/assets"
# Swagger UI checks documents against validator.swagger.io unless told not to.
_SWAGGER_PARAMETERS = {"validatorUrl": None}


def assets_dir() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


def install(app: FastAPI) -> None:
    """Mount the assets and the page; the app must be created with docs_url=None."""
    openapi_url = app.openapi_url
    oauth2_redirect_url = f"{DOCS_URL}/oauth2-redirect"
    if openapi_url is None:
        return
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    # Plain routes, as FastAPI adds its own docs pages: public pages outside the API's
    # permission model (docs/permissions.md lists API endpoints only).
    async def swagger_ui(_: Request) -> HTMLResponse:
        # Relative to the host the browser used: nothing here names another host.
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=oauth2_redirect_url,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=_SWAGGER_PARAMETERS,
        )

    async def swagger_ui_redirect(_: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    app.add_route(oauth2_redirect_url, swagger_ui_redirect, include_in_schema=False)
