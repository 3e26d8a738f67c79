"""Starting a generation on the inference backend and turning its events into HTTP answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import HTTPException

from api.metrics import ApiMetrics
from api.state import AppState
from inference.service.protocol import GenerateRequest, InferenceError


def inference_http_error(exc: InferenceError) -> HTTPException:
    """422 with every problem, 429 / 503 with Retry-After."""
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    detail = exc.problems if exc.status == 422 else "; ".join(exc.problems)
    return HTTPException(exc.status, detail, headers=headers)


async def open_generation(state: AppState, metrics: ApiMetrics, request: GenerateRequest, *, tenant_id: str) -> AsyncIterator[dict]:
    """Submit ``request``; refusals become HTTPExceptions before any byte of the answer is sent.
    The tenant's prompt and completion tokens are counted when the generation ends."""
    try:
        events = await state.inference.start(request)
    except InferenceError as exc:
        raise inference_http_error(exc) from None
    return _CountingEvents(events, metrics, tenant_id)


class _CountingEvents:
    """Passes events through, counting the tenant's tokens at the end; ``aclose`` closes (and so
    aborts, when unfinished) the generation underneath, even if it was never iterated."""

    def __init__(self, events, metrics: ApiMetrics, tenant_id: str):
        self._events, self._metrics, self._tenant_id = events, metrics, tenant_id

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        event = await self._events.__anext__()
        if event["event"] == "end":
            self._metrics.count_tokens(self._tenant_id, event["prompt_tokens"], event["completion_tokens"])
        return event

    async def aclose(self) -> None:
        await self._events.aclose()


async def collect(events: AsyncIterator[dict]) -> tuple[dict, dict]:
    """Run a generation to its end: ``(start event, end event)``; an engine error is a 503."""
    start: dict = {}
    try:
        async for event in events:
            if event["event"] == "start":
                start = event
            elif event["event"] == "end":
                return start, event
            elif event["event"] == "error":
                raise HTTPException(503, f"generation failed: {event.get('message')}", headers={"Retry-After": "1"})
    finally:
        await events.aclose()
    raise HTTPException(503, "the generation ended without an answer", headers={"Retry-After": "1"})


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
