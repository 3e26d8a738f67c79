"""Per-user chat (chat or admin key): history + personal adapter, JSON or server-sent events;
and the user's message history (read in pages, erase)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.background import BackgroundTask

from api.deps import ChatDep, SessionDep, StateDep, is_id, not_found
from api.error_responses import errors
from api.generation import TenantEvents, collect, open_generation, scheduling, sse
from api.openai_schemas import response_format_spec
from api.routers.users import load_user
from api.schemas import ChatRequest, ChatResponse, MessagePage, MessagePublic, Usage
from api.state import AppState
from inference.service.events import GenerationEnded, GenerationStarted, TextDelta
from inference.service.protocol import ChatTurn, GenerateRequest
from tenants.conversations import ChatContext, erase_history, load_chat_context, message_page, record_exchange
from tenants.db import session_scope
from tenants.models import utcnow

log = logging.getLogger(__name__)
router = APIRouter(tags=["chat"])


def message_public(m) -> MessagePublic:
    return MessagePublic(id=m.id, role=m.role, content=m.content, created_at=m.created_at, adapter_id=m.adapter_id)


def _context(state: AppState, tenant_id: str, user_id: str) -> ChatContext:
    with session_scope(state.platform.session_factory) as session:
        user = load_user(session, tenant_id, user_id)
        return load_chat_context(session, tenant_id, user, state.settings.history_max_messages,
                                 state.settings.history_step_messages)


def _record(state: AppState, tenant_id: str, ctx: ChatContext, body: ChatRequest, end: GenerationEnded,
            asked_at: datetime, used: int) -> ChatResponse:
    with session_scope(state.platform.session_factory) as session:
        _question, answer = record_exchange(session, tenant_id, ctx.user_id, body.message, end.text,
                                            end.completion_tokens, asked_at, ctx.adapter.id if ctx.adapter else None)
        usage = Usage(prompt_tokens=end.prompt_tokens, completion_tokens=end.completion_tokens,
                      total_tokens=end.total_tokens)
        return ChatResponse(
            id=answer.id, conversation_id=answer.conversation_id, message=message_public(answer),
            adapter_id=ctx.adapter.id if ctx.adapter else None, adapter_version=ctx.adapter_version,
            finish_reason=end.finish_reason.value,
            history_messages_used=used, usage=usage,
        )


def _messages_used(start: GenerationStarted | None) -> int:
    return start.messages_used if start is not None else 0


def _max_tokens(state: AppState, requested: int | None) -> int:
    limit = state.settings.max_tokens_limit
    if requested is not None and requested > limit:
        raise HTTPException(422, [f"max_tokens must be at most {limit}, got {requested}"])
    return requested or state.settings.default_max_tokens


@router.post(
    "/v1/users/{user_id}/chat",
    response_model=ChatResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"},
               **errors(401, 404, 413, 422, 429, 503)},
)
async def chat(user_id: str, body: ChatRequest, caller: ChatDep, state: StateDep, http_request: Request):
    """Answer the user's message with their recent history as context and their personal adapter
    applied; store both messages. With ``"stream": true`` the answer is a stream of server-sent
    events: ``start``, ``delta`` (``{"text"}``) and a final ``done`` (the JSON answer) or ``error``."""
    asked_at = utcnow()
    max_tokens = _max_tokens(state, body.max_tokens)
    ctx = await asyncio.to_thread(_context, state, caller.tenant_id, user_id)
    request = GenerateRequest(
        messages=[*ctx.history, ChatTurn(role="user", content=body.message)],
        system_prompt=ctx.system_prompt,
        history_token_budget=state.settings.history_token_budget,
        history_trim_step_tokens=state.settings.history_trim_step_tokens,
        adapter=ctx.adapter,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        response_format=response_format_spec(body.response_format),
        **scheduling(caller, state.settings, body.ttft_slo_s),
    )
    events = await open_generation(state, http_request, request, tenant_id=caller.tenant_id)
    if not body.stream:
        start, end = await collect(events)
        return await asyncio.to_thread(_record, state, caller.tenant_id, ctx, body, end, asked_at, _messages_used(start))
    return StreamingResponse(_chat_frames(state, caller.tenant_id, ctx, body, asked_at, events),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(events.aclose))  # also when the body never started


async def _chat_frames(state: AppState, tenant_id: str, ctx: ChatContext, body: ChatRequest, asked_at: datetime,
                       events: TenantEvents) -> AsyncIterator[str]:
    """The SSE frames of a streamed chat: ``start``, ``delta``, then ``done`` (the stored answer)
    or ``error``."""
    start = None
    async with _closing(events):
        async for event in events:
            if isinstance(event, GenerationStarted):
                start = event
                yield sse("start", {"adapter_id": ctx.adapter.id if ctx.adapter else None,
                                    "adapter_version": ctx.adapter_version,
                                    "history_messages_used": event.messages_used})
            elif isinstance(event, TextDelta):
                yield sse("delta", {"text": event.text})
            elif isinstance(event, GenerationEnded):
                try:
                    answer = await asyncio.to_thread(_record, state, tenant_id, ctx, body, event, asked_at,
                                                     _messages_used(start))
                except SQLAlchemyError as exc:  # the headers are gone: say so in the stream
                    log.warning("storing the exchange of user %s failed: %s", ctx.user_id, type(exc).__name__)
                    yield sse("error", {"message": "the answer could not be stored (database unavailable); "
                                                   "nothing was saved, retry later"})
                    return
                yield sse("done", answer.model_dump(mode="json"))
            else:
                yield sse("error", {"message": event.message})


class _closing:
    """``async with`` that closes an async generator (aborting the generation) on any exit."""

    def __init__(self, agen):
        self.agen = agen

    async def __aenter__(self):
        return self.agen

    async def __aexit__(self, *exc):
        await self.agen.aclose()


@router.get("/v1/users/{user_id}/messages", response_model=MessagePage, responses=errors(401, 404, 429, 503))
def list_messages(
    user_id: str,
    caller: ChatDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[str | None, Query(description="a message id: return the page before it")] = None,
) -> MessagePage:
    """The user's messages, oldest first within a page; pages go back in time via ``before``."""
    load_user(session, caller.tenant_id, user_id)
    page = message_page(session, caller.tenant_id, user_id, limit, before) if before is None or is_id(before) else None
    if page is None:
        raise not_found("message", before)
    messages, next_before = page
    return MessagePage(data=[message_public(m) for m in messages], next_before=next_before)


@router.delete("/v1/users/{user_id}/messages", status_code=204, responses=errors(401, 404, 429, 503))
def delete_messages(user_id: str, caller: ChatDep, session: SessionDep) -> Response:
    """Erase the user's whole history."""
    load_user(session, caller.tenant_id, user_id)
    erase_history(session, caller.tenant_id, user_id)
    return Response(status_code=204)

