"""First-token deadlines on the inference side: in process (``InferenceCore``) and over the internal
HTTP API (``RemoteInference`` against ``create_inference_app`` served by uvicorn).

The engine here has one seat (``max_num_seqs=1``): while a long generation runs, every other
request waits in the queue, which is a real overload without any timing luck. A request queued
behind it with a deadline of 0.3 s passes its deadline there and is refused by the engine (early
abort); ``start`` raises that as ``InferenceError`` 503 with ``Retry-After`` before any event, in
both shapes, and the long generation goes on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from inference import LLM
from inference.service.app import create_inference_app
from inference.service.client import RemoteInference
from inference.service.core import InferenceCore
from inference.service.events import GenerationEnded, GenerationStarted, TextDelta
from inference.service.protocol import SECRET_HEADER, GenerateRequest, InferenceError
from support.live_server import serve_app

SECRET = "deadline-test-secret-0123456789"
QUEUED_SLO_S = 0.3
LONG = 1500  # tokens: far more than a test waits for; only a close ends it early


@pytest.fixture(scope="module")
def core(tiny_checkpoint):
    core = InferenceCore(LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=16 << 20, max_num_seqs=1))
    yield core
    core.close()


@pytest.fixture(scope="module")
def base_url(core):
    with serve_app(create_inference_app(core, SECRET)) as url:
        yield url


@pytest.fixture(params=["in-process", "remote"])
async def backend(request, core, base_url) -> AsyncIterator:
    if request.param == "in-process":
        yield core
        return
    remote = RemoteInference(base_url, SECRET, timeout_s=60.0)
    yield remote
    await remote.aclose()


def chat(text: str, **fields) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": text}], **fields)


def finished(core: InferenceCore, reason: str) -> float:
    return core.metrics.finished.labels(reason)._value.get()


async def wait_until(predicate, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def start_long(core: InferenceCore):
    """A long generation that holds the engine's only seat; returned once it produces text."""
    events = await core.start(chat("Write a very long story.", max_tokens=LONG, temperature=1.0, seed=5))
    async for event in events:
        if isinstance(event, TextDelta):
            return events
    raise AssertionError("the long generation ended before its first text")


async def wait_idle(core: InferenceCore) -> None:
    await wait_until(lambda: core.engine.num_running + core.engine.num_waiting == 0 and not core.engine.pool.occupancy().kv,
                     "an idle engine")


# --------------------------------------------------------------------------- early abort
async def test_a_request_queued_past_its_deadline_is_refused_before_any_event(core, backend):
    long = await start_long(core)
    try:
        before = finished(core, "deadline"), finished(core, "abort")
        asked = time.monotonic()
        with pytest.raises(InferenceError) as info:
            await backend.start(chat("Hello?", max_tokens=4, ttft_slo_s=QUEUED_SLO_S, tenant="t-late"))
        waited = time.monotonic() - asked
        error = info.value
        assert (error.status, error.is_deadline) == (503, True), error.problems
        assert isinstance(error.retry_after, int) and error.retry_after >= 1
        assert "deadline" in "; ".join(error.problems)
        assert waited >= QUEUED_SLO_S  # it really waited in the queue until the deadline passed
        assert (finished(core, "deadline"), finished(core, "abort")) == (before[0] + 1, before[1])
        assert core.engine.deadlines.by_tenant["t-late"].early_aborts >= 1
        assert core.engine.num_waiting == 0  # refused, not left behind
        more = await anext(long)  # the long generation goes on
        assert isinstance(more, TextDelta), more
    finally:
        await long.aclose()
    await wait_idle(core)


async def test_the_wire_says_503_retry_after_and_deadline(core, base_url):
    long = await start_long(core)
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            body = chat("Hello?", max_tokens=4, ttft_slo_s=QUEUED_SLO_S).model_dump(mode="json")
            r = await client.post("/internal/generate", json=body, headers={SECRET_HEADER: SECRET})
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["reason"] == "deadline" and "deadline" in r.json()["detail"][0], r.text
    finally:
        await long.aclose()
    await wait_idle(core)


async def test_closing_the_wait_for_the_first_token_aborts_the_queued_request(core):
    """A caller that goes away while its request waits for its first token (here: the task is
    cancelled) leaves nothing queued behind."""
    long = await start_long(core)
    try:
        aborts = finished(core, "abort")
        task = asyncio.create_task(core.start(chat("Hello?", max_tokens=4, ttft_slo_s=600.0)))
        await wait_until(lambda: core.engine.num_waiting == 1, "the request in the queue")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: core.engine.num_waiting == 0, "the queued request's abort")
        assert finished(core, "abort") == aborts + 1
        assert isinstance(await anext(long), TextDelta)
    finally:
        await long.aclose()
    await wait_idle(core)


# --------------------------------------------------------------------------- deadlines that are met
async def test_a_deadline_that_is_met_changes_nothing_but_when_start_returns(backend, core):
    """The same greedy request with and without a generous deadline: the same events; with the
    deadline ``start`` returns once the first token is there (the engine has produced it), so the
    first events follow at once."""
    plain = [e async for e in await backend.start(chat("Tell me about otters.", max_tokens=8, temperature=0.0))]
    attained = core.engine.deadlines.counts("t-ok").attained
    events = await backend.start(chat("Tell me about otters.", max_tokens=8, temperature=0.0, ttft_slo_s=600.0,
                                      tenant="t-ok"))
    assert core.engine.deadlines.counts("t-ok").attained == attained + 1  # counted before start returned
    timed = [e async for e in events]
    assert timed[1:] == plain[1:] and timed[0].prompt_tokens == plain[0].prompt_tokens  # (request ids differ)
    assert isinstance(timed[0], GenerationStarted) and isinstance(timed[-1], GenerationEnded)
    await wait_idle(core)


async def test_the_deadline_reaches_the_engine_request(core, monkeypatch):
    seen = []
    submit = core.engine.request_from_ids

    def recording(*args, **kwargs):
        request = submit(*args, **kwargs)
        seen.append(request.ttft_slo_s)
        return request

    monkeypatch.setattr(core.engine, "request_from_ids", recording)
    await core.generate(chat("hi", max_tokens=2, ttft_slo_s=45.5))
    await core.generate(chat("hi", max_tokens=2))
    assert seen == [45.5, None]


@pytest.mark.parametrize("slo", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_a_bad_deadline_is_refused_by_the_protocol(slo):
    with pytest.raises(ValueError, match="ttft_slo_s"):
        chat("hi", ttft_slo_s=slo)
