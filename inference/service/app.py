"""The inference service's internal HTTP API: a thin layer over ``InferenceCore``.

Routes (every ``/internal/*`` route needs the shared secret in ``X-Tailor-Inference-Secret``):

* ``POST /internal/generate`` (``GenerateRequest``) -> ``application/x-ndjson``: one event per line
  (see ``inference.service.protocol``). Refusals come back before streaming as JSON
  ``{"detail": [problem, ...]}`` with status 422, 429 or 503 (and ``Retry-After``); a request with
  a first-token deadline is answered once its first token is there, or refused with 503,
  ``Retry-After`` and ``"reason": "deadline"`` when the engine dropped it from the queue.
* ``POST /internal/adapters/prefetch`` (``PrefetchRequest``) -> ``{"adapter_id", "tier"}``.
* ``DELETE /internal/adapters/{adapter_id}?timeout_s=`` -> ``{"dropped": bool}``; 409 when its
  in-flight requests did not finish in time.
* ``GET /healthz`` (the process answers) and ``GET /readyz`` (the engine runs): no secret.

A client that disconnects mid-stream has its request aborted, so its pages are freed within a step:
the response closes the core's ``GenerationStream``, which owns the abort. Events become JSON here
(``inference.service.events.to_wire``) and nowhere else on the service side.
``run_inference_service(settings, adapter_store)`` builds the engine from settings and serves this
app (the caller, ``tailor serve inference``, makes the platform's object store: nothing under
``inference/`` imports ``tenants/``).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from inference.adapters.object_store import ObjectStore
from inference.service.core import GenerationStream, InferenceCore
from inference.service.events import GenerationEvent, GenerationFailed, GenerationStarted, is_terminal, to_wire
from inference.service.protocol import SECRET_HEADER, GenerateRequest, InferenceError, PrefetchRequest
from inference.service.shutdown import install_drain, is_draining, serve

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
INTERNAL_PREFIX = "/internal/"
GENERATE_PATH = "/internal/generate"
DRAINING_BODY = {"detail": ["the inference service is shutting down; retry on another replica"]}


# --------------------------------------------------------------------------- authentication
class SharedSecretMiddleware:
    """Answers 401 to any ``/internal/*`` request whose secret header differs from ``secret``.

    A plain ASGI middleware (not a dependency) so that the check runs before the body is read or
    parsed: an unauthenticated caller learns nothing from validation errors.
    """

    def __init__(self, app: ASGIApp, secret: str):
        self.app = app
        self._secret = secret.encode()
        self._header = SECRET_HEADER.lower().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(INTERNAL_PREFIX.rstrip("/")):
            supplied = next((value for name, value in scope["headers"] if name == self._header), b"")
            if not hmac.compare_digest(supplied, self._secret):
                response = JSONResponse({"detail": [f"missing or wrong {SECRET_HEADER} header"]}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- streaming
def _line(event: GenerationEvent) -> bytes:
    """One NDJSON line (UTF-8, newline-terminated)."""
    return (json.dumps(to_wire(event), ensure_ascii=False) + "\n").encode()


class EventStreamResponse(StreamingResponse):
    """Streams generation events as NDJSON and closes the generation with the response.

    ``first`` is the already-read start event, ``events`` the rest. Whatever way the response
    ends (finished, client disconnected, server shutting down), ``events`` is closed, even when it
    was never resumed after the start; closing a stream before its last event aborts the request
    (``GenerationStream`` owns that), so the engine frees its pages.
    """

    def __init__(self, first: GenerationStarted, events: GenerationStream):
        self._events = events
        super().__init__(self._lines(first), media_type=NDJSON, headers={"Cache-Control": "no-store"})

    async def _lines(self, first: GenerationStarted) -> AsyncIterator[bytes]:
        yield _line(first)
        try:
            async for event in self._events:
                yield _line(event)
                if is_terminal(event):
                    return
        except Exception as exc:  # a bug below us: end the stream with an error event, not a cut
            log.exception("generation stream failed")
            yield _line(GenerationFailed(f"generation failed: {exc}"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()

    async def _release(self) -> None:
        try:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        finally:
            await self._events.aclose()


# --------------------------------------------------------------------------- the app
def _error_response(exc: InferenceError) -> JSONResponse:
    """``{"detail": [problems]}`` (and ``"reason"`` when the error has one, e.g. ``"deadline"``)
    with the error's status and, when set, ``Retry-After``."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    body = {"detail": exc.problems, **({"reason": exc.reason} if exc.reason is not None else {})}
    return JSONResponse(body, status_code=exc.status, headers=headers)


def create_inference_app(core: InferenceCore, secret: str) -> FastAPI:
    """The internal API over ``core``; ``secret`` is the shared secret callers must send to
    ``/internal/*`` (``/healthz``, ``/readyz`` and ``/metrics`` need none)."""
    if not secret:
        raise ValueError("the inference service needs a non-empty shared secret")
    app = FastAPI(title="Tailor inference (internal)", version="0.1.0", docs_url=None, redoc_url=None)
    app.add_middleware(SharedSecretMiddleware, secret=secret)

    @app.exception_handler(InferenceError)
    async def on_inference_error(_request: Request, exc: InferenceError) -> JSONResponse:
        return _error_response(exc)

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is up (no secret needed)."""
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text format: the engine's registry and the process-wide one (no secret:
        Prometheus scrapes it; keep the port on the internal network)."""
        body = generate_latest(core.metrics.registry) + generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """200 while the engine thread runs and the process is not draining for shutdown, else
        503 (no secret needed)."""
        draining = is_draining(request.app)
        ready = core.ready() and not draining
        body = {"ready": ready, **({"draining": True} if draining else {})}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post(GENERATE_PATH, response_class=StreamingResponse)
    async def generate(req: GenerateRequest) -> StreamingResponse:
        """Validate and submit ``req``, then stream its events as NDJSON."""
        events = await core.start(req)
        try:
            first = await anext(events)  # the start event: yielded at once, names the request
        except BaseException:
            await events.aclose()
            raise
        return EventStreamResponse(first, events)

    _add_adapter_routes(app, core)
    return app


def _add_adapter_routes(app: FastAPI, core: InferenceCore) -> None:
    """``POST /internal/adapters/prefetch`` and ``DELETE /internal/adapters/{adapter_id}``."""

    @app.post("/internal/adapters/prefetch")
    async def prefetch(body: PrefetchRequest) -> dict:
        """Load an adapter into host RAM (and device pages when there is room); returns the tier."""
        tier = await core.prefetch(body.adapter)
        return {"adapter_id": body.adapter.id, "tier": tier}

    @app.delete("/internal/adapters/{adapter_id}")
    async def drop_adapter(
        adapter_id: str = Path(min_length=1, max_length=200),
        timeout_s: float = Query(60.0, gt=0, le=600),
    ) -> JSONResponse:
        """Forget an adapter once its in-flight requests finish (409 if they take over
        ``timeout_s`` seconds); ``dropped`` is False when it was not loaded."""
        try:
            dropped = await core.drop_adapter(adapter_id, timeout_s)
        except TimeoutError as exc:
            return JSONResponse({"detail": [str(exc)]}, status_code=409)
        return JSONResponse({"dropped": dropped})


# --------------------------------------------------------------------------- the process
def run_inference_service(settings, adapter_store: ObjectStore) -> None:
    """Load the model, then serve the internal API on ``settings.host:settings.port`` until
    SIGTERM/SIGINT; then drain (``inference.service.shutdown``: readiness 503, new generations
    refused, in-flight streams get ``TAILOR_DRAIN_TIMEOUT_S`` seconds), stop the engine and return.

    ``settings``: the platform's settings (``model``, ``engine_options()``, ``inference_secret``,
    ``drain_timeout_s``, ``host``, ``port``); ``adapter_store``: the shared object store the
    platform writes adapters to."""
    from inference.llm import LLM

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(settings.model, adapter_store=adapter_store, **settings.engine_options())
    core = InferenceCore(llm)
    try:
        app = create_inference_app(core, settings.inference_secret.get_secret_value())
        drain = install_drain(app, settings.drain_timeout_s, _is_generation, DRAINING_BODY)
        serve(app, host=settings.host, port=settings.port, drain=drain)
    finally:
        core.close()
        log.info("engine stopped")


def _is_generation(method: str, path: str) -> bool:
    return method == "POST" and path == GENERATE_PATH
