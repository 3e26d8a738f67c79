"""Starting a generation on the inference backend and turning its typed events
(``inference.service.events``) into HTTP answers: JSON bodies and server-sent events are made
here and in the chat routers, nowhere below.

Aborting a generation whose client went away is not this layer's job: the routes close the
events they hold (on every exit, also when the body never started), and the inference core's
``GenerationStream`` aborts the engine request if it had not finished."""

from __future__ import annotations

import json
from fastapi import HTTPException, Request

from api.admission import RETRY_AFTER_S
from api.deps import Caller
from api.metrics import ApiMetrics
from api.state import AppState
from inference.service.backend import GenerationEvents
from inference.service.events import GenerationEnded, GenerationEvent, GenerationFailed, GenerationStarted
from inference.service.protocol import GenerateRequest, InferenceError
from tenants.settings import Settings


def scheduling(caller: Caller, settings: Settings, ttft_slo_s: float | None = None) -> dict:
    """The ``GenerateRequest`` fields that schedule a caller's generation: its tenant, the tenant's
    fair-share weight, and the first-token SLO in effect: ``ttft_slo_s`` of the request when
    given, else the tenant's default, else ``TAILOR_TTFT_SLO_S`` (None: no deadline)."""
    if ttft_slo_s is None:
        ttft_slo_s = caller.tenant_ttft_slo_s if caller.tenant_ttft_slo_s is not None else settings.ttft_slo_s
    return {"tenant": caller.tenant_id, "tenant_weight": caller.tenant_weight, "ttft_slo_s": ttft_slo_s}


def inference_http_error(exc: InferenceError) -> HTTPException:
    """422 with every problem, 429 / 503 with Retry-After."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    detail = exc.problems if exc.status == 422 else "; ".join(exc.problems)
    return HTTPException(exc.status, detail, headers=headers)


async def open_generation(state: AppState, http_request: Request, request: GenerateRequest, *,
                          tenant_id: str) -> TenantEvents:
    """Submit ``request``; refusals become HTTPExceptions before any byte of the answer is sent:
    429 when the tenant already has its share of generations in flight (``TenantConcurrencyLimit``)
    or the engine queue is full, 422 or 503 from the engine, and 503 with ``Retry-After`` when a
    request with a first-token deadline was dropped from the engine's queue (for such a request
    the backend returns only once its first token is there). The tenant's slot is held until the
    returned events are closed; its prompt and completion tokens are counted at the end."""
    slots = state.generation_slots
    if not slots.try_acquire(tenant_id):
        http_request.state.reject_reason = "tenant_concurrency"
        raise HTTPException(429, f"this tenant already has {slots.limit} generations in flight; retry shortly",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        events = await state.inference.start(request)
    except BaseException as exc:
        slots.release(tenant_id)
        if isinstance(exc, InferenceError):
            if exc.is_deadline:
                http_request.state.reject_reason = "deadline"
            raise inference_http_error(exc) from None
        raise
    return TenantEvents(events, http_request.app.state.metrics, tenant_id, lambda: slots.release(tenant_id))


class TenantEvents:
    """Passes events through, counting the tenant's tokens at the end; ``aclose`` closes the
    generation underneath (which aborts it when unfinished), even if it was never iterated, and
    gives the tenant's slot back (once)."""

    def __init__(self, events: GenerationEvents, metrics: ApiMetrics, tenant_id: str, release):
        self._events, self._metrics, self._tenant_id = events, metrics, tenant_id
        self._release = release

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenerationEvent:
        event = await self._events.__anext__()
        if isinstance(event, GenerationEnded):
            self._metrics.count_tokens(self._tenant_id, event.prompt_tokens, event.completion_tokens)
        return event

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


async def collect(events: TenantEvents) -> tuple[GenerationStarted | None, GenerationEnded]:
    """Run a generation to its end: ``(start, end)``; an engine failure is a 503."""
    start: GenerationStarted | None = None
    try:
        async for event in events:
            if isinstance(event, GenerationStarted):
                start = event
            elif isinstance(event, GenerationEnded):
                return start, event
            elif isinstance(event, GenerationFailed):
                raise HTTPException(event.status, f"generation failed: {event.message}", headers={"Retry-After": "1"})
    finally:
        await events.aclose()
    raise HTTPException(503, "the generation ended without an answer", headers={"Retry-After": "1"})


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
