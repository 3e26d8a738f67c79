"""``InferenceCore``: the engine as the platform uses it, without any web framework.

The embedded default calls it in-process; the inference service's HTTP API is a thin layer over
it. It renders a chat history with the model's template (trimming the oldest turns to a token
budget), registers platform adapters from the shared object store on first use, streams typed
events (``inference.service.events``) and turns every refusal into an ``InferenceError``.

Aborting a request whose reader went away is owned by the engine loop's
:class:`~inference.engine_loop.OutputStream`: closing it before its last output aborts the request
(once). Every layer above only closes the stream it holds: :class:`GenerationStream` closes the
engine's stream (and counts the abandoned request), the internal HTTP app, the remote client and
the public API close the ``GenerationStream``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable

from inference.adapters.peft_checkpoint import AdapterValidationError
from inference.adapters.registry import AdapterRef
from inference.engine_loop import OutputStream, QueueFullError
from inference.llm import LLM
from inference.request import FinishReason, RequestOutput
from inference.sampling import SamplingParams
from inference.service.chat_prompt import RenderedPrompt, render_chat
from inference.service.events import (
    GenerationEnded,
    GenerationEvent,
    GenerationFailed,
    GenerationStarted,
    TextDelta,
    TokenLogprobs,
    TopLogprob,
    is_terminal,
    run_to_end,
)
from inference.service.metrics import InferenceMetrics
from inference.service.protocol import AdapterSpec, GenerateRequest, InferenceError
from inference.service.worker_supervisor import WorkerSupervisor
from inference.structured import StructuredOutput
from inference.tool_calls import FORMATS, ToolCallFormat, tool_grammar

log = logging.getLogger(__name__)
UNLIKELY_LOGPROB = -9999.0  # reported for a logprob that is not finite (as OpenAI does)


class GenerationStream:
    """The events of one generation.

    ``aclose()`` before the last event (ended or failed), even before iterating at all, calls
    ``abandon`` exactly once (the core counts the request and closes the engine's output stream,
    which aborts it); closing twice, or after the last event, abandons nothing.
    """

    def __init__(self, events: AsyncIterator[GenerationEvent], abandon: Callable[[], None]):
        self._events = events
        self._abandon = abandon
        self._finished = False
        self._closed = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        event = await self._events.__anext__()
        if is_terminal(event):
            self._finished = True
        return event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self._finished:
                self._abandon()
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


class InferenceCore:
    """Wraps an ``LLM`` (engine plus loop thread) for the platform."""

    def __init__(self, llm: LLM, *, prefetch_reserve_fraction: float = 0.25):
        self.llm = llm
        self.engine = llm.engine
        self.metrics = InferenceMetrics(llm.engine)
        self.tokenizer = llm.tokenizer
        self.prefetch_reserve_fraction = prefetch_reserve_fraction
        self._adapter_locks: dict[str, asyncio.Lock] = {}  # one per adapter id: one fetch at a time
        self.started_at = time.time()
        # a tensor-parallel engine's workers: watched, restarted when one dies (not ready meanwhile)
        self.supervisor = WorkerSupervisor(llm.loop) if llm.engine.workers is not None else None

    # ------------------------------------------------------------------ health
    def ready(self) -> bool:
        """The engine thread is alive and accepting work (and every tensor-parallel worker runs)."""
        return self.llm.loop.alive and (self.supervisor is None or self.supervisor.healthy())

    async def is_ready(self) -> bool:
        """``ready()`` for callers that treat every backend alike (the remote client is async)."""
        return self.ready()

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        self.llm.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------------ adapters
    async def ensure_adapter(self, spec: AdapterSpec) -> AdapterRef:
        """Register ``spec`` with the engine if it is not yet (fetching and validating it from the
        object store in a worker thread); the engine loop never waits for this."""
        registry = self.engine.adapters.registry
        ref = registry.get(spec.id)
        if ref is not None and ref.sha256 == spec.sha256:
            return ref
        lock = self._adapter_locks.setdefault(spec.id, asyncio.Lock())
        async with lock:
            ref = registry.get(spec.id)
            if ref is not None and ref.sha256 == spec.sha256:
                return ref
            try:
                return await asyncio.to_thread(
                    self.engine.adapters.register_stored,
                    spec.id,
                    spec.config_key,
                    spec.weights_key,
                    spec.sha256,
                    ref is not None,
                )
            except AdapterValidationError as exc:
                raise InferenceError.invalid([f"adapter {spec.id}: {p}" for p in exc.problems]) from exc
            except Exception as exc:  # store outage, missing object, checksum mismatch
                log.warning("loading adapter %s failed: %s", spec.id, exc)
                raise InferenceError.unavailable(f"adapter {spec.id} could not be loaded: {exc}") from exc

    async def prefetch(self, spec: AdapterSpec) -> str:
        """Bring an adapter into host RAM and, when the pool has room to spare, into device pages.
        Returns the tier it reached: ``device`` or ``host``."""
        ref = await self.ensure_adapter(spec)
        reserve = int(self.engine.pool.num_pages * self.prefetch_reserve_fraction)

        def page_in(engine) -> str:
            engine.adapters.prefetch([ref], reserve)
            return "device" if engine.adapters.resident(ref.uid) is not None else "host"

        return await asyncio.to_thread(self.llm.loop.call, page_in, 30.0)

    async def drop_adapter(self, adapter_id: str, timeout: float | None = 60.0) -> bool:
        """Forget an adapter once its in-flight requests finish; False when it was not loaded."""
        if self.engine.adapters.registry.get(adapter_id) is None:
            return False
        await asyncio.to_thread(self.llm.unregister_adapter, adapter_id, timeout)
        return True

    # ------------------------------------------------------------------ generation
    def _tool_setup(self, req: GenerateRequest) -> tuple[list[dict] | None, ToolCallFormat | None]:
        """The tools to render (OpenAI tool objects, or None) and the format their calls are
        constrained to (None: no calls). A template that does not render tools is a 422 unless the
        choice is ``none`` (then the tools are left out), and so are tool calls or results in the
        messages for it; so is a template whose call format Tailor does not know
        (``inference.tool_calls``)."""
        if not self.tokenizer.renders_tools and any(m.role == "tool" or m.tool_calls for m in req.messages):
            raise InferenceError.invalid("messages: the model's chat template does not support tools, so it cannot "
                                         "render tool calls or tool results")
        if not req.tools:
            return None, None
        if not self.tokenizer.renders_tools:
            if req.tool_choice == "none":
                return None, None
            raise InferenceError.invalid("tools: the model's chat template does not support tools (it has no place "
                                         "for them), so this model cannot call functions")
        entries = [t.function().template_entry() for t in req.tools]
        fmt = self.tokenizer.tool_call_format
        if fmt is None and req.tool_choice != "none":
            raise InferenceError.invalid("tools: the model's chat template renders tools, but its tool-call format is "
                                         "not one Tailor can constrain and parse (it knows "
                                         f"{', '.join(FORMATS)})")
        return entries, fmt

    def _sampling(self, req: GenerateRequest, tool_format: ToolCallFormat | None = None) -> SamplingParams:
        """The engine's sampling parameters; with ``tool_format`` the output is constrained to
        ``req``'s tool choice in that format."""
        structured = req.response_format.structured() if req.response_format is not None else None
        if tool_format is not None and req.tools:
            grammar = tool_grammar(tool_format, [t.function() for t in req.tools], req.tool_choice,
                                   req.parallel_tool_calls, self.tokenizer.added_token_ids(tool_format.markers))
            structured = StructuredOutput.lark(grammar, "tools")
        try:
            return SamplingParams(
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=req.seed,
                stop=tuple(req.stop),
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                logit_bias=req.logit_bias,
                logprobs=req.logprobs,
                structured=structured,
            )
        except ValueError as exc:
            raise InferenceError.invalid(str(exc)) from exc

    async def start(self, req: GenerateRequest) -> GenerationStream:
        """Validate, render and submit ``req``; return the stream of its events.

        Everything that can be refused is refused here, before the first event: InferenceError
        422 (bad request), 429 (queue full) or 503 (engine stopped, adapter unavailable). A request
        with a first-token deadline (``ttft_slo_s``) may also be refused by the engine while it is
        queued (early abort), so for it ``start`` returns only once the first token is there, or
        raises ``InferenceError.deadline`` (503 with ``Retry-After``): the refusal still comes
        before any byte of a 200, and the first token is not delayed (it is what ends the wait).
        Requests without a deadline return at once. Closing the returned stream early aborts the
        request.
        """
        if not self.ready():
            raise InferenceError.unavailable("the engine is not running")
        tools, tool_format = self._tool_setup(req)
        params = self._sampling(req, tool_format)
        room = self.engine.max_model_len - req.max_tokens
        if room < 1:
            raise InferenceError.invalid(
                f"max_tokens ({req.max_tokens}) leaves no room for a prompt in the context window "
                f"of {self.engine.max_model_len} tokens"
            )
        limit = min(room, req.history_token_budget or room)
        ref = await self.ensure_adapter(req.adapter) if req.adapter is not None else None
        messages = [m.template_message() for m in req.messages]
        rendered = await asyncio.to_thread(render_chat, self.tokenizer, req.system_prompt, messages, limit,
                                           req.history_trim_step_tokens, tools)
        request_id = req.request_id or uuid.uuid4().hex
        if params.structured is not None:  # compile (once per schema, cached) off the event loop
            await asyncio.to_thread(self.engine.grammars.problems, params.structured)
        started = time.monotonic()
        try:
            request = self.engine.request_from_ids(
                rendered.token_ids, params, request_id, ref.adapter_id if ref is not None else None,
                tenant=req.tenant, tenant_weight=req.tenant_weight, ttft_slo_s=req.ttft_slo_s,
            )
            outputs = self.llm.loop.open_stream(request)
        except QueueFullError as exc:
            raise InferenceError.overloaded(str(exc)) from exc
        except ValueError as exc:
            raise InferenceError.invalid(str(exc)) from exc
        except RuntimeError as exc:  # the loop stopped between the check and the submit
            raise InferenceError.unavailable(str(exc)) from exc
        first = await self._first_output(outputs, started) if req.ttft_slo_s is not None else None
        calls_from = tool_format.name if tool_format is not None and req.tool_choice != "none" else None
        events = self._events(request_id, rendered, outputs, started, first, req.logprobs is not None, calls_from)
        return GenerationStream(events, lambda: self._abandon(outputs))

    async def _first_output(self, outputs: OutputStream, started: float) -> RequestOutput:
        """The request's first output (its first token, or its end); an early abort for its
        deadline (``FinishReason.DEADLINE``) is counted and raised as ``InferenceError.deadline``
        with the engine's message and ``Retry-After`` (its estimate, rounded up to whole seconds).
        Cancelled while waiting (the caller went away): the request is aborted."""
        try:
            first = await anext(outputs)
        except BaseException:
            self._abandon(outputs)
            raise
        if first.finish_reason is FinishReason.DEADLINE:
            self.metrics.on_finish(first, time.monotonic() - started, None)
            await outputs.aclose()  # its last output was read: nothing to abort
            retry_after = math.ceil(first.retry_after_s) if first.retry_after_s is not None else 1
            raise InferenceError.deadline(first.error or "the first token could not arrive within its deadline",
                                          retry_after)
        return first

    def _abandon(self, outputs: OutputStream) -> None:
        """The reader closed the stream before the end: count it, and close the engine's stream,
        which aborts the request (frees its pages)."""
        self.metrics.finished.labels("abort").inc()
        outputs.close()

    async def _events(self, request_id: str, rendered: RenderedPrompt, outputs: OutputStream, started: float,
                      first: RequestOutput | None = None, logprobs: bool = False,
                      tool_call_format: str | None = None) -> AsyncIterator[GenerationEvent]:
        """The engine's outputs (``first`` when it was read already, then the rest) as typed
        events, and the request's metrics on the way; ``started``: when it was submitted. With
        ``logprobs`` every step that produced tokens yields a delta carrying theirs; the start
        event names ``tool_call_format``."""
        prompt_tokens = len(rendered.token_ids)
        first_token_at: float | None = None
        stream = _outputs_after(first, outputs)
        try:
            yield GenerationStarted(request_id, prompt_tokens, rendered.messages_used, tool_call_format)
            async for output in stream:
                if output.new_token_ids and first_token_at is None:
                    first_token_at = time.monotonic() - started
                    self.metrics.on_first_token(first_token_at)
                token_logprobs = self._new_logprobs(output) if logprobs else None
                if output.delta_text or token_logprobs:
                    yield TextDelta(output.delta_text, len(output.new_token_ids), token_logprobs)
                if output.finished:
                    self.metrics.on_finish(output, time.monotonic() - started, first_token_at)
                    yield _last_event(output, prompt_tokens)
        finally:
            await stream.aclose()
            await outputs.aclose()

    def _new_logprobs(self, output: RequestOutput) -> tuple[TokenLogprobs, ...]:
        """The logprobs of the tokens ``output`` added, with each token's (and alternative's)
        text and bytes; a non-finite logprob is reported as -9999 (JSON has no infinity)."""
        new = (output.logprobs or [])[len(output.token_ids) - len(output.new_token_ids):]
        ids = [e.token_id for e in new] + [t for e in new for t, _ in e.top]
        pieces = dict(zip(ids, self.tokenizer.token_pieces(ids)))

        def entry(token_id: int, logprob: float) -> TopLogprob:
            text, raw = pieces[token_id]
            return TopLogprob(text, tuple(raw), logprob if math.isfinite(logprob) else UNLIKELY_LOGPROB)

        out = []
        for e in new:
            head = entry(e.token_id, e.logprob)
            out.append(TokenLogprobs(head.token, head.bytes, head.logprob, tuple(entry(t, lp) for t, lp in e.top)))
        return tuple(out)

    async def generate(self, req: GenerateRequest) -> GenerationEnded:
        """Run ``req`` to the end and return its ``GenerationEnded`` (or raise InferenceError(503)
        with the engine's message if it failed)."""
        return await run_to_end(await self.start(req))


async def _outputs_after(first: RequestOutput | None, outputs: OutputStream) -> AsyncIterator[RequestOutput]:
    """``first`` (when not None), then the rest of ``outputs`` unless ``first`` was the last."""
    if first is not None:
        yield first
        if first.finished:
            return
    async for output in outputs:
        yield output


def _last_event(output: RequestOutput, prompt_tokens: int) -> GenerationEnded | GenerationFailed:
    if output.finish_reason in (FinishReason.ERROR, FinishReason.DEADLINE):  # a deadline: refused in start()
        return GenerationFailed(output.error or "generation failed")
    return GenerationEnded(output.finish_reason, prompt_tokens, len(output.token_ids), output.text)
