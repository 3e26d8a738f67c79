"""InferenceCore in-process (the embedded default's path): closing a generation early, at any
point, aborts it and frees its pages; history trimming keeps the newest turns that fit."""

from __future__ import annotations

import asyncio
import time

import pytest

from inference import LLM
from inference.request import FinishReason
from inference.service.core import InferenceCore, render_chat
from inference.service.events import GenerationEnded
from inference.service.protocol import GenerateRequest, InferenceError


@pytest.fixture(scope="module")
def core(tiny_checkpoint):
    c = InferenceCore(LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=16 << 20))
    yield c
    c.close()


def _long_request() -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": "count"}], max_tokens=1500, temperature=0.0,
                           stop=[], top_p=1.0)


async def _wait_idle(core: InferenceCore, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while core.engine.num_running + core.engine.num_waiting:
        assert time.monotonic() < deadline, "the request was not aborted"
        await asyncio.sleep(0.01)
    occupancy = core.engine.pool.occupancy()
    assert occupancy.kv == 0


@pytest.mark.parametrize("read", [0, 1, 3])
async def test_closing_early_aborts_at_any_point(core, read):
    generated_before = core.engine.stats.generation_tokens
    aborted_before = core.metrics.finished.labels("abort")._value.get()
    events = await core.start(_long_request())
    for _ in range(read):
        await events.__anext__()
    await events.aclose()
    await _wait_idle(core)
    assert core.engine.stats.generation_tokens - generated_before < 1000
    assert core.metrics.finished.labels("abort")._value.get() == aborted_before + 1
    await events.aclose()  # twice is harmless


async def test_a_finished_generation_is_not_counted_as_aborted(core):
    aborted_before = core.metrics.finished.labels("abort")._value.get()
    end = await core.generate(GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=3))
    assert isinstance(end, GenerationEnded) and end.completion_tokens <= 3
    assert end.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert core.metrics.finished.labels("abort")._value.get() == aborted_before


def test_render_chat_keeps_the_newest_turns_that_fit(core):
    tok = core.tokenizer
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x " * 20} for i in range(9)]
    full = len(tok.apply_chat_template(turns))
    limit = full // 2
    rendered = render_chat(tok, "Be brief.", turns, limit)
    assert len(rendered.token_ids) <= limit and rendered.messages_used < len(turns)
    kept = turns[len(turns) - rendered.messages_used:]
    assert kept[0]["role"] == "user"  # never opens with half an exchange
    assert rendered.token_ids == tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *kept])
    # one more (older) message would not have fitted, unless it is the assistant turn skipped above
    start = len(turns) - rendered.messages_used
    longer = [{"role": "system", "content": "Be brief."}, *turns[start - 2:]]
    assert len(tok.apply_chat_template(longer)) > limit
    with pytest.raises(InferenceError) as info:
        render_chat(tok, None, [{"role": "user", "content": "y " * 500}], 50)
    assert info.value.status == 422


async def test_the_tenant_and_its_weight_reach_the_engine(core, monkeypatch):
    seen = []
    submit = core.engine.request_from_ids

    def recording(*args, **kwargs):
        request = submit(*args, **kwargs)
        seen.append((request.tenant, request.tenant_weight))
        return request

    monkeypatch.setattr(core.engine, "request_from_ids", recording)
    await core.generate(GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        tenant="t-1", tenant_weight=2.5))
    await core.generate(GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=2))
    assert seen == [("t-1", 2.5), (None, 1.0)]


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_a_bad_tenant_weight_is_refused_by_the_protocol(weight):
    with pytest.raises(ValueError, match="tenant_weight"):
        GenerateRequest(messages=[{"role": "user", "content": "hi"}], tenant_weight=weight)


async def test_logprobs_and_penalties_reach_the_engine(core):
    """Each generated token arrives once with its logprob, its text and bytes, and the requested
    number of alternatives (best first, the chosen one among them when greedy); a penalty changes
    the greedy answer."""
    request = dict(messages=[{"role": "user", "content": "count to ten"}], max_tokens=6, temperature=0.0)
    events = await core.start(GenerateRequest(**request, logprobs=3))
    deltas, end = [], None
    async for event in events:
        if isinstance(event, GenerationEnded):
            end = event
        elif hasattr(event, "logprobs"):
            deltas.append(event)
    entries = [e for d in deltas for e in d.logprobs]
    assert end is not None and len(entries) == end.completion_tokens == sum(d.tokens for d in deltas)
    for entry in entries:
        assert len(entry.top) == 3 and [a.logprob for a in entry.top] == sorted((a.logprob for a in entry.top), reverse=True)
        assert entry.top[0].token == entry.token and entry.top[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and entry.token == bytes(entry.bytes).decode("utf-8", "replace")
    plain = await core.generate(GenerateRequest(**request))
    penalised = await core.generate(GenerateRequest(**request, repetition_penalty=10.0, presence_penalty=2.0,
                                                    frequency_penalty=2.0))
    assert plain.text == end.text
    assert penalised.text != plain.text
    with pytest.raises(InferenceError) as refused:
        await core.start(GenerateRequest(**request, logit_bias={10**6: 1.0}))
    assert refused.value.status == 422 and "logit_bias" in refused.value.problems[0]
