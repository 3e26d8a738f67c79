"""Running the api: the embedded default (``tailor serve``) and the api service alone."""

from __future__ import annotations

import logging
import re
import shlex

from api.app import create_app, resolve_operator_token
from inference.service import shutdown
from tenants import migrate
from tenants.settings import Settings

log = logging.getLogger(__name__)

GENERATION_PATHS = re.compile(r"/v1/users/[^/]+/chat|/v1/chat/completions")
DRAINING_BODY = {"detail": "the server is shutting down; retry the request (on another instance)"}


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
    schema is migrated to the newest revision first (unless ``TAILOR_MIGRATE_ON_START=false``)."""
    settings.check_for("embedded")
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    _migrate(settings)
    token, new = resolve_operator_token(settings)
    print(_banner(settings, token, new), flush=True)
    _run(settings)


def serve_api(settings: Settings) -> None:
    """The api alone (inference and the worker run as their own services). Like the embedded
    default it migrates the schema first unless ``TAILOR_MIGRATE_ON_START=false``; several api
    processes may start at once (``migrate.upgrade`` serializes them on PostgreSQL)."""
    settings.check_for("api")
    _migrate(settings)
    _run(settings)


def _migrate(settings: Settings) -> None:
    if settings.migrate_on_start:
        migrate.upgrade(settings.resolved_database_url)
    else:
        log.info("TAILOR_MIGRATE_ON_START is off: the schema is not migrated at start")


def is_generation(method: str, path: str) -> bool:
    """Whether a request starts a generation (refused with 503 while the process drains)."""
    return method == "POST" and GENERATION_PATHS.fullmatch(path) is not None


def _run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then drain (``inference.service.shutdown``) and return."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    drain = shutdown.install_drain(app, settings.drain_timeout_s, is_generation, DRAINING_BODY)
    shutdown.serve(app, host=settings.host, port=settings.port, drain=drain)
