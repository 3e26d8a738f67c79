"""The public API: ``create_app(settings)`` builds the FastAPI application.

The lifespan builds the platform (database sessions, object store), the inference backend
(in-process ``InferenceCore`` in the embedded default, else a router over the inference replicas)
and the task queue (a thread, or Celery), and tears them down on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from api import limits
from api.admission import TenantConcurrencyLimit
from api.docs import install_docs
from api.errors import install_error_handlers
from api.metrics import ApiMetrics, MetricsMiddleware
from api.metrics import router as metrics_router
from api.prefetch import prefetch_from_thread
from api.rate_limit import make_rate_limiter
from api.routers import adapters, api_keys, chat, health, openai_compat, tenants, training_data, trainings, users
from api.state import AppState
from tenants.cleanup import PeriodicCleanup, cleanup_job
from tenants.platform import Platform
from tenants.settings import Settings

log = logging.getLogger(__name__)

OPERATOR_TOKEN_FILE = "operator-token"


def resolve_operator_token(settings: Settings) -> tuple[str, bool]:
    """``(token, newly_made)``: TAILOR_OPERATOR_TOKEN, else the one saved under the data dir, else
    a new random token saved there (mode 0600) so that restarts keep it (development only;
    production settings refuse to start without the variable)."""
    if settings.operator_token is not None:
        return settings.operator_token.get_secret_value(), False
    path = Path(settings.data_dir) / OPERATOR_TOKEN_FILE
    if path.is_file():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "op_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, True


async def build_inference(settings: Settings, store) -> object:
    """The in-process engine (embedded), or a router over the inference replicas (remote:
    ``api.replicas``; ``TAILOR_INFERENCE_URLS``, or the one ``TAILOR_INFERENCE_URL`` as a ring of
    one); it starts probing them here."""
    if settings.inference_mode == "remote":
        from api.replicas import ReplicaRouter

        router = ReplicaRouter.from_urls(settings.inference_replicas, settings.inference_secret.get_secret_value(),
                                         settings.inference_timeout_s,
                                         load_factor=settings.router_load_factor,
                                         probe_interval_s=settings.inference_probe_interval_s)
        router.start_probing()
        return router
    from inference import LLM
    from inference.service.core import InferenceCore

    llm = await asyncio.to_thread(lambda: LLM(settings.model, adapter_store=store, **settings.engine_options()))
    return InferenceCore(llm)


def create_app(settings: Settings | None = None, *, inference: object | None = None,
               platform: Platform | None = None) -> FastAPI:
    """The api application. ``inference`` / ``platform`` may be given (tests share them); what
    the app builds itself it also closes."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from tenants.task_queue import make_task_queue

        own_platform = platform or Platform.from_settings(settings)
        ensure_bucket = getattr(own_platform.store, "ensure_bucket", None)
        if settings.object_store == "s3" and settings.s3_create_bucket and ensure_bucket is not None:
            await asyncio.to_thread(ensure_bucket)
        backend = inference or await build_inference(settings, own_platform.store)
        loop = asyncio.get_running_loop()
        hook = lambda spec: prefetch_from_thread(loop, backend, spec)  # noqa: E731
        own_platform.ready_hooks.append(hook)
        tasks = make_task_queue(settings, own_platform)
        cleaner = None
        if settings.task_mode == "inprocess":  # with Celery, the worker's beat schedules it
            cleaner = PeriodicCleanup(lambda: cleanup_job(own_platform, tasks.submit_validation,
                                                          requeue_after_s=settings.pending_requeue_s,
                                                          give_up_after_s=settings.pending_timeout_s),
                                      settings.cleanup_interval_s).start()
        token, _new = resolve_operator_token(settings)
        limiter = make_rate_limiter(settings)
        slots = TenantConcurrencyLimit(settings.max_concurrent_per_tenant)
        app.state.tailor = AppState(settings, own_platform, backend, tasks, token, limiter, slots)
        try:
            yield
        finally:
            if cleaner is not None:
                cleaner.stop()
            tasks.close()
            own_platform.ready_hooks.remove(hook)
            if inference is None:
                await backend.aclose()
            if platform is None:
                own_platform.close()

    app = FastAPI(
        title="Tailor",
        version="0.1.0",
        description="Multi-tenant personalization backend: per-user LoRA adapters and chat history on one base model.",
        lifespan=lifespan,
        docs_url=None,  # install_docs: Swagger UI from the installed assets, not a CDN
        redoc_url=None,  # ReDoc would load from a CDN
    )
    install_docs(app)
    install_error_handlers(app)
    for module in (health, tenants, api_keys, users, adapters, chat, openai_compat, training_data, trainings):
        app.include_router(module.router)
    app.include_router(metrics_router)
    app.state.metrics = ApiMetrics()
    app.add_middleware(
        limits.BodyLimitMiddleware,
        default_limit=settings.max_body_bytes,
        upload_limit=settings.max_upload_bytes + (1 << 20),  # room for the multipart framing
        upload_routes={("POST", "/v1/adapters")},
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: sees 413s too
    return app
