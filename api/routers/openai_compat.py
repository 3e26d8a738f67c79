"""OpenAI-compatible chat completions (chat or admin key): the ``openai`` client works against
Tailor. ``model`` is ``base`` or the name of one of the tenant's ready adapters (its newest ready
version). The caller sends the whole conversation; nothing is stored.

Every request field is honoured or refused with a 422 naming it (``api.openai_schemas``). The
answer is OpenAI's ``chat.completion``, or with ``stream`` its ``chat.completion.chunk`` frames
ending with ``data: [DONE]`` (and, with ``stream_options.include_usage``, a last chunk with the
usage and no choices). ``n`` asks for several choices: the first is started alone and the others
once its first token is there, so that they find the prompt's full KV pages in the prefix cache
(same tenant, adapter and prompt) and compute only its last partial page; choice i samples with
``seed + i``, and the usage counts the prompt once. ``logprobs`` gives each token's logprob, bytes and ``top_logprobs``
alternatives; ``response_format`` ``json_object`` / ``json_schema`` constrains the output to JSON
(of the schema); ``tools`` / ``tool_choice`` give OpenAI ``tool_calls`` (``api.openai_tool_calls``)
where the model's chat template supports tools, and 422 where it does not; ``user`` (or ``safety_identifier``) is logged with the completion's id, which is
also the engine's request id."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from api.deps import Caller, ChatDep, SessionDep, StateDep
from api.error_responses import errors
from api.generation import TenantEvents, open_generation, scheduling
from api.openai_tool_calls import ChoiceToolCalls, plain_message
from api.openai_schemas import ChatCompletionRequest, Message, message_text, response_format_spec
from api.state import AppState
from inference.service.events import (GenerationEnded, GenerationEvent, GenerationFailed, GenerationStarted,
                                      TextDelta, TokenLogprobs, is_terminal)
from inference.service.protocol import AdapterSpec, ChatTurn, GenerateRequest, ToolCallTurn, ToolSpec
from tenants.db import session_scope
from tenants.platform import adapter_spec
from tenants.repositories import latest_ready_adapter, ready_adapters

log = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])
BASE_MODEL = "base"


def _resolve_model(state: AppState, tenant_id: str, model: str) -> AdapterSpec | None:
    if model == BASE_MODEL:
        return None
    with session_scope(state.platform.session_factory) as session:
        adapter = latest_ready_adapter(session, tenant_id, model)
        if adapter is None:
            raise HTTPException(404, f"no model {model!r}: use 'base' or the name of a ready adapter")
        return adapter_spec(adapter)


def _check_limits(state: AppState, body: ChatCompletionRequest) -> int:
    """The completion's token budget (``max_completion_tokens``, its alias ``max_tokens``, else
    the default); 422 when it is over ``TAILOR_MAX_TOKENS_LIMIT``."""
    requested = body.max_completion_tokens or body.max_tokens
    limit = state.settings.max_tokens_limit
    if requested is not None and requested > limit:
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise HTTPException(422, [{"type": "less_than_equal", "loc": ["body", field],
                                   "msg": f"{field} must be at most {limit}, got {requested}"}])
    return requested or state.settings.default_max_tokens


def _turn(message: Message) -> ChatTurn:
    """The engine's turn for an OpenAI message (``developer`` is ``system``)."""
    calls = [ToolCallTurn(id=c.id, name=c.function.name, arguments=c.function.arguments)
             for c in message.tool_calls] if message.tool_calls else None
    return ChatTurn(role="system" if message.role == "developer" else message.role, content=message_text(message),
                    tool_calls=calls, tool_call_id=message.tool_call_id)


def generate_request(body: ChatCompletionRequest, completion_id: str, spec: AdapterSpec | None, max_tokens: int,
                     state: AppState, caller: Caller) -> GenerateRequest:
    """The engine request for ``body``: every honoured sampling field mapped (unset ones at the
    engine's neutral values), the tenant's scheduling, ``completion_id`` as the request id."""
    return GenerateRequest(
        request_id=completion_id,
        messages=[_turn(m) for m in body.messages],
        adapter=spec,
        history_trim_step_tokens=state.settings.history_trim_step_tokens,  # when it outgrows the context
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop=body.stop_strings(),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
        logprobs=body.top_logprob_count(),
        response_format=response_format_spec(body.response_format),
        tools=[ToolSpec(name=t.function.name, description=t.function.description, parameters=t.function.parameters,
                        strict=t.function.strict is True) for t in body.tools] if body.tools else None,
        tool_choice=body.tool_choice_name(),
        parallel_tool_calls=body.parallel_tool_calls is not False,
        **scheduling(caller, state.settings),  # the tenant's default SLO, else TAILOR_TTFT_SLO_S
    )


@router.post("/v1/chat/completions", responses=errors(401, 404, 413, 422, 429, 503))
async def chat_completions(body: ChatCompletionRequest, caller: ChatDep, state: StateDep, http_request: Request):
    """Create a chat completion (``stream`` gives OpenAI-style ``chat.completion.chunk`` events
    ending with ``data: [DONE]``). Every field is honoured or refused with a 422 naming it: see
    the README's table."""
    max_tokens = _check_limits(state, body)
    spec = await asyncio.to_thread(_resolve_model, state, caller.tenant_id, body.model)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.user is not None or body.safety_identifier is not None:
        log.info("completion %s: tenant %s, key %s, user %r, safety_identifier %r", completion_id, caller.tenant_id,
                 caller.key_id, body.user, body.safety_identifier)
    request = generate_request(body, completion_id, spec, max_tokens, state, caller)
    choices = await _open_choices(state, http_request, request, body.n or 1, caller.tenant_id)
    frame = _Frames(completion_id, created, body.model, body.logprobs is True)
    if not body.stream:
        return await _completion(frame, choices)
    include_usage = body.stream_options is not None and body.stream_options.include_usage is True
    return StreamingResponse(_completion_chunks(frame, choices, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(_close_all, choices))  # also when the body never started


class _Choice:
    """One choice's events: those already read (the first choice's, up to its first token) and the
    rest of its stream."""

    def __init__(self, index: int, events: TenantEvents):
        self.index, self.events, self.read = index, events, []

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        for event in self.read:
            yield event
        async for event in self.events:
            yield event


async def _close_all(choices: list[_Choice]) -> None:
    for choice in choices:
        await choice.events.aclose()


def _sibling(request: GenerateRequest, index: int) -> GenerateRequest:
    """Choice ``index``'s engine request: its own id and, with a seed, ``seed + index``."""
    seed = None if request.seed is None else (request.seed + index) % 2**63
    return request.model_copy(update={"request_id": f"{request.request_id}-{index}", "seed": seed})


async def _open_choices(state: AppState, http_request: Request, request: GenerateRequest, n: int,
                        tenant_id: str) -> list[_Choice]:
    """Submit the ``n`` choices: the first at once, the others after its first token or its end
    (when the first failed, the others are not started). A refusal of any closes the ones already
    open and is raised."""
    choices = [_Choice(0, await open_generation(state, http_request, request, tenant_id=tenant_id))]
    if n == 1:
        return choices
    try:
        first = choices[0]
        async for event in first.events:
            first.read.append(event)
            if isinstance(event, TextDelta) or is_terminal(event):
                break
        if not first.read or isinstance(first.read[-1], GenerationFailed):
            return choices
        for index in range(1, n):
            choices.append(_Choice(index, await open_generation(state, http_request, _sibling(request, index),
                                                                tenant_id=tenant_id)))
    except BaseException:
        await _close_all(choices)
        raise
    return choices


def _logprob_entry(entry: TokenLogprobs) -> dict:
    """OpenAI's ``ChatCompletionTokenLogprob``."""
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes),
            "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in entry.top]}


def _usage(ends: list[GenerationEnded]) -> dict:
    """The completion's usage: the prompt once (the choices share it), the completion tokens of
    every choice."""
    completion = sum(end.completion_tokens for end in ends)
    return {"prompt_tokens": ends[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": ends[0].prompt_tokens + completion}


class _Frames:
    """The identity every object of one completion repeats, and whether it carries logprobs."""

    def __init__(self, completion_id: str, created: int, model: str, logprobs: bool):
        self.id, self.created, self.model, self.logprobs = completion_id, created, model, logprobs

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "service_tier": "default", "system_fingerprint": None}

    def chunk(self, index: int, delta: dict, finish_reason: str | None, logprobs: list[dict] | None = None,
              usage: bool = False) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None}
        body = {**self.head("chat.completion.chunk"), "choices": [choice], **({"usage": None} if usage else {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _choice_result(frame: _Frames, choice: _Choice) -> tuple[dict, GenerationEnded]:
    """Run one choice to its end: its ``choices[]`` entry (tool calls parsed out of the text when
    the start event names their format) and its end (503 if it failed)."""
    logprobs: list[dict] = []
    calls: ChoiceToolCalls | None = None
    async for event in choice:
        if isinstance(event, GenerationStarted) and event.tool_call_format is not None:
            calls = ChoiceToolCalls(event.tool_call_format)
        elif isinstance(event, TextDelta) and event.logprobs:
            logprobs.extend(_logprob_entry(e) for e in event.logprobs)
        elif isinstance(event, GenerationFailed):
            raise HTTPException(event.status, f"generation failed: {event.message}", headers={"Retry-After": "1"})
        elif isinstance(event, GenerationEnded):
            message = calls.message(event.text) if calls is not None else plain_message(event.text)
            reason = calls.finish_reason(event.finish_reason) if calls is not None else event.finish_reason.value
            return {"index": choice.index, "message": message, "finish_reason": reason,
                    "logprobs": {"content": logprobs, "refusal": None} if frame.logprobs else None}, event
    raise HTTPException(503, "the generation ended without an answer", headers={"Retry-After": "1"})


async def _completion(frame: _Frames, choices: list[_Choice]) -> dict:
    """Run every choice to its end: OpenAI's ``chat.completion`` (503 if one failed)."""
    try:
        results = await asyncio.gather(*(_choice_result(frame, c) for c in choices))
    finally:
        await _close_all(choices)
    return {**frame.head("chat.completion"), "choices": [choice for choice, _end in results],
            "usage": _usage([end for _choice, end in results])}


async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Every choice's events as they come, as ``(choice index, event)``: one choice is read
    directly; several through a queue fed by a task each (cancelled when this is closed)."""
    if len(choices) == 1:
        async for event in choices[0]:
            yield choices[0].index, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | None]] = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            async for event in choice:
                await queue.put((choice.index, event))
        finally:
            queue.put_nowait((choice.index, None))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        running = len(choices)
        while running:
            index, event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _completion_chunks(frame: _Frames, choices: list[_Choice], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's ``chat.completion.chunk`` frames of every choice as they come (each names its
    choice's ``index``), then (``include_usage``) one with the usage and no choices, then
    ``data: [DONE]``. With ``include_usage`` every other chunk has ``usage: null``. A choice whose
    start event names a tool-call format streams its calls as ``tool_calls`` deltas
    (``api.openai_tool_calls``); a delta's logprobs ride on its first chunk."""
    events = _merged(choices)
    try:
        for choice in choices:
            yield frame.chunk(choice.index, {"role": "assistant", "content": ""}, None,
                              [] if frame.logprobs else None, include_usage)
        ends: dict[int, GenerationEnded] = {}
        calls: dict[int, ChoiceToolCalls] = {}
        async for index, event in events:
            if isinstance(event, GenerationStarted) and event.tool_call_format is not None:
                calls[index] = ChoiceToolCalls(event.tool_call_format)
            elif isinstance(event, TextDelta):
                entries = [_logprob_entry(e) for e in event.logprobs or ()] if frame.logprobs else None
                deltas = calls[index].feed(event.text) if index in calls else [{"content": event.text}]
                if not deltas and entries:
                    deltas = [{}]  # the text is held back (it may open a call), its logprobs are not
                for i, delta in enumerate(deltas):
                    yield frame.chunk(index, delta, None, entries if i == 0 else None, include_usage)
            elif isinstance(event, GenerationEnded):
                ends[index] = event
                parsed = calls.get(index)
                for delta in parsed.finish() if parsed is not None else ():
                    yield frame.chunk(index, delta, None, None, include_usage)
                reason = parsed.finish_reason(event.finish_reason) if parsed is not None else event.finish_reason.value
                yield frame.chunk(index, {}, reason, None, include_usage)
            elif isinstance(event, GenerationFailed):
                yield f"data: {json.dumps({'error': {'message': event.message, 'type': 'server_error'}})}\n\n"
        if include_usage and len(ends) == len(choices):
            body = {**frame.head("chat.completion.chunk"), "choices": [],
                    "usage": _usage([ends[i] for i in sorted(ends)])}
            yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
        await _close_all(choices)


PROCESS_STARTED = int(time.time())


@router.get("/v1/models", responses=errors(401, 429, 503))
def list_models(caller: ChatDep, session: SessionDep, state: StateDep) -> dict:
    """``base`` and the tenant's ready adapters (each name's newest ready version: its creation
    time; ``parent`` ``base``; ``root`` the base model), in OpenAI's list format."""
    root = Path(state.settings.model).name
    base = {"id": BASE_MODEL, "object": "model", "created": PROCESS_STARTED, "owned_by": "tailor", "root": root,
            "parent": None}
    adapters = [{"id": a.name, "object": "model", "created": int(a.created_at.timestamp()), "owned_by": "tenant",
                 "root": root, "parent": BASE_MODEL, "version": a.version}
                for a in ready_adapters(session, caller.tenant_id)]
    return {"object": "list", "data": [base, *adapters]}
