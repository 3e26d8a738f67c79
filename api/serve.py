"""Running the api: the embedded default (``tailor serve``) and the api service alone."""

from __future__ import annotations

import logging
import shlex

import uvicorn

from api.app import create_app, resolve_operator_token
from tenants import migrate
from tenants.settings import Settings

GRACEFUL_SHUTDOWN_S = 30


def _banner(settings: Settings, token: str, new: bool) -> str:
    base = f"http://{settings.host}:{settings.port}"
    origin = "generated and saved to " + str(settings.data_dir / "operator-token") if new else "from settings or the data dir"
    create = shlex.quote('{"name": "acme"}')
    return "\n".join([
        "",
        f"Tailor is starting on {base} (docs: {base}/docs)",
        f"Operator token ({origin}):",
        f"  {token}",
        "Create a tenant (the answer holds its admin key):",
        f"  curl -s -X POST {base}/v1/tenants -H 'Authorization: Bearer {token}' "
        f"-H 'Content-Type: application/json' -d {create}",
        "",
    ])


def serve_embedded(settings: Settings) -> None:
    """One process: api, engine, in-process tasks; SQLite and a local folder by default. The
    schema is migrated to the newest revision first."""
    settings.check_for("embedded")
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    token, new = resolve_operator_token(settings)
    print(_banner(settings, token, new), flush=True)
    _run(settings)


def serve_api(settings: Settings) -> None:
    """The api alone (inference and the worker run as their own services)."""
    settings.check_for("api")
    _run(settings)


def _run(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_level="info")
