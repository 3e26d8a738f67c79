"""OpenAI-compatible chat completions (chat or admin key): the ``openai`` client works against
Tailor. ``model`` is ``base`` or the name of one of the tenant's ready adapters (its newest ready
version). The caller sends the whole conversation; nothing is stored."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from api.deps import ChatDep, SessionDep, StateDep
from api.error_responses import errors
from api.generation import TenantEvents, collect, open_generation, scheduling
from api.state import AppState
from inference.service.events import GenerationEnded, GenerationFailed, TextDelta
from inference.service.protocol import AdapterSpec, ChatTurn, GenerateRequest
from tenants.db import session_scope
from tenants.platform import adapter_spec
from tenants.repositories import latest_ready_adapter, ready_adapter_names

router = APIRouter(tags=["openai"])
BASE_MODEL = "base"


OPENAI_TYPES = ConfigDict(strict=True, allow_inf_nan=False)  # like OpenAI: "42" is not a number, "yes" no boolean
MAX_CONTENT_CHARS = 1_000_000
# A length bound also makes pydantic check that the text is valid Unicode (a lone surrogate is not)
Text = Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)]


class TextPart(BaseModel):
    model_config = OPENAI_TYPES

    type: Literal["text"]
    text: Text


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", **OPENAI_TYPES)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = Field(None, max_length=255)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", **OPENAI_TYPES)  # unknown OpenAI options are ignored, as OpenAI-compatible servers do

    model: str = Field(min_length=1, max_length=200)
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Annotated[str, StringConstraints(max_length=500)] | list[Annotated[str, StringConstraints(max_length=500)]] | None = None
    n: int | None = Field(None, ge=1, le=1)
    user: str | None = Field(None, max_length=255)


def _resolve_model(state: AppState, tenant_id: str, model: str) -> AdapterSpec | None:
    if model == BASE_MODEL:
        return None
    with session_scope(state.platform.session_factory) as session:
        adapter = latest_ready_adapter(session, tenant_id, model)
        if adapter is None:
            raise HTTPException(404, f"no model {model!r}: use 'base' or the name of a ready adapter")
        return adapter_spec(adapter)


def _chunk(completion_id: str, created: int, model: str, delta: dict, finish_reason: str | None) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@router.post("/v1/chat/completions", responses=errors(401, 404, 413, 422, 429, 503))
async def chat_completions(body: ChatCompletionRequest, caller: ChatDep, state: StateDep, http_request: Request):
    """Create a chat completion (``stream`` gives OpenAI-style ``chat.completion.chunk`` events
    ending with ``data: [DONE]``)."""
    spec = await asyncio.to_thread(_resolve_model, state, caller.tenant_id, body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens or state.settings.default_max_tokens
    if max_tokens > state.settings.max_tokens_limit:
        raise HTTPException(422, [f"max_tokens must be at most {state.settings.max_tokens_limit}, got {max_tokens}"])
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop) or len(stop) > 16:
        raise HTTPException(422, ["stop must hold at most 16 non-empty strings"])
    request = GenerateRequest(
        messages=[ChatTurn(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages],
        adapter=spec,
        history_trim_step_tokens=state.settings.history_trim_step_tokens,  # when it outgrows the context
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stop,
        **scheduling(caller, state.settings),  # the tenant's default SLO, else TAILOR_TTFT_SLO_S
    )
    events = await open_generation(state, http_request, request, tenant_id=caller.tenant_id)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        _start, end = await collect(events)
        return _completion(completion_id, created, body.model, end)
    return StreamingResponse(_completion_chunks(completion_id, created, body.model, events),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(events.aclose))  # also when the body never started


def _completion(completion_id: str, created: int, model: str, end: GenerationEnded) -> dict:
    usage = {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
             "total_tokens": end.total_tokens}
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": end.text},
                     "finish_reason": end.finish_reason.value, "logprobs": None}],
        "usage": usage,
    }


async def _completion_chunks(completion_id: str, created: int, model: str, events: TenantEvents) -> AsyncIterator[str]:
    """OpenAI's ``chat.completion.chunk`` frames, then ``data: [DONE]``."""
    try:
        yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None)
        async for event in events:
            if isinstance(event, TextDelta):
                yield _chunk(completion_id, created, model, {"content": event.text}, None)
            elif isinstance(event, GenerationEnded):
                yield _chunk(completion_id, created, model, {}, event.finish_reason.value)
            elif isinstance(event, GenerationFailed):
                yield f"data: {json.dumps({'error': {'message': event.message, 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


@router.get("/v1/models", responses=errors(401, 429, 503))
def list_models(caller: ChatDep, session: SessionDep) -> dict:
    """``base`` plus the names of the tenant's ready adapters."""
    names = ready_adapter_names(session, caller.tenant_id)
    created = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "tailor"}
                                       for n in [BASE_MODEL, *names]]}
