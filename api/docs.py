"""The interactive API docs (``/docs``) served entirely from the installation.

FastAPI's default page loads Swagger UI's script and stylesheet from a CDN, so on a machine
without internet access it stays blank. Here the page is FastAPI's own (``get_swagger_ui_html``)
with the assets of the Swagger UI distribution that the ``fastapi-swagger`` package ships (Swagger
UI 5, which renders OpenAPI 3.1), served under ``/docs/assets/``. ReDoc (``/redoc``) would load
from a CDN too and is not offered.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
ASSET_PACKAGE = "fastapi_swagger.resources"
ASSETS = {  # file name -> media type
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"


def _asset(name: str) -> bytes:
    return (resources.files(ASSET_PACKAGE) / name).read_bytes()


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` from the installed assets (``app`` made with
    ``docs_url=None, redoc_url=None``). The assets are read once, when the app is built, so a
    missing asset stops the start instead of blanking the page."""
    assets = {name: _asset(name) for name in ASSETS}

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
            oauth2_redirect_url=OAUTH2_REDIRECT_URL,
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def swagger_ui_asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, f"no docs asset {name!r}")
        return Response(assets[name], media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})
