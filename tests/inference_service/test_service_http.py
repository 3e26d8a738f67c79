"""The inference service over real HTTP: a uvicorn server hosting ``create_inference_app`` on a tiny
random Llama, driven through ``RemoteInference`` (and raw httpx where the wire itself is tested)."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

from inference import LLM, FinishReason, SamplingParams
from inference.adapters.object_store import LocalFolderStore
from inference.adapters.storage_keys import tenant_adapter_prefix
from inference.model_config import ModelConfig
from inference.service.app import create_inference_app
from inference.service.client import RemoteInference
from inference.service.core import GenerationStream, InferenceCore
from inference.service.events import GenerationEnded, GenerationFailed, GenerationStarted, TextDelta
from inference.service.protocol import SECRET_HEADER, AdapterSpec, GenerateRequest, InferenceError
from support.adapters import put_adapter, synthetic_adapter
from support.live_server import serve_app

SECRET = "test-inference-secret-0123456789"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LONG = 1500  # tokens: far more than a test waits for, so only an abort can end such a request early


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LocalFolderStore:
    return LocalFolderStore(tmp_path_factory.mktemp("objects"))


@pytest.fixture(scope="module")
def core(tiny_checkpoint, store):
    llm = LLM(str(tiny_checkpoint), adapter_store=store, page_tokens=4)
    yield InferenceCore(llm)
    llm.close()


@pytest.fixture(scope="module")
def base_url(core):
    with serve_app(create_inference_app(core, SECRET)) as url:
        yield url


@pytest.fixture
async def client(base_url):
    remote = RemoteInference(base_url, SECRET, timeout_s=30.0)
    yield remote
    await remote.aclose()


# --------------------------------------------------------------------------- helpers
def chat(text: str, **fields) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": text}], **fields)


def greedy(text: str, max_tokens: int = 8, **fields) -> GenerateRequest:
    return chat(text, max_tokens=max_tokens, temperature=0.0, **fields)


def long_request(seed: int) -> GenerateRequest:
    """Sampled (so that it does not settle into an early end-of-sequence) for LONG tokens."""
    return chat("Write a very long story.", max_tokens=LONG, temperature=1.0, seed=seed)


async def collect(events) -> list:
    return [event async for event in events]


async def until_delta(events) -> list:
    """Read events up to and including the first delta."""
    seen = []
    async for event in events:
        seen.append(event)
        if isinstance(event, TextDelta):
            return seen
    raise AssertionError(f"the stream ended before any delta: {seen}")


async def wait_idle(core: InferenceCore, timeout_s: float = 5.0) -> None:
    """Wait until the engine holds no request and no KV page."""
    deadline = time.monotonic() + timeout_s
    engine = core.engine
    while engine.num_running + engine.num_waiting or engine.pool.occupancy().kv:
        assert time.monotonic() < deadline, "the engine still holds requests or KV pages"
        await asyncio.sleep(0.02)


def in_process_text(core: InferenceCore, req: GenerateRequest, adapter: str | None = None) -> str:
    """The same greedy generation through ``LLM.chat`` (no service, no InferenceCore)."""
    messages = [m.model_dump() for m in req.messages]
    params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0)
    return core.llm.chat([messages], params, adapters=[adapter])[0].text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stored_adapter(tmp_path, store: LocalFolderStore, tiny_checkpoint, adapter_id: str) -> AdapterSpec:
    """A random rank-8 LoRA on every projection (weights large enough to change greedy text),
    put into ``store`` under platform-style keys."""
    path = synthetic_adapter(tmp_path / adapter_id, ModelConfig.from_checkpoint(tiny_checkpoint), r=8,
                             targets=ALL_TARGETS, alpha=16.0, seed=11, std=0.3)
    return put_adapter(store, path, adapter_id, tenant_adapter_prefix("t1", adapter_id))


# --------------------------------------------------------------------------- generation
async def test_streamed_generation_matches_in_process_chat(client, core):
    req = greedy("Tell me about otters.", max_tokens=10)
    events = await collect(await client.start(req))

    kinds = [type(e) for e in events]
    assert kinds[0] is GenerationStarted and kinds[-1] is GenerationEnded and set(kinds[1:-1]) <= {TextDelta}, kinds
    start, end = events[0], events[-1]
    deltas = "".join(e.text for e in events[1:-1])
    assert deltas == end.text
    expected = await asyncio.to_thread(in_process_text, core, req)
    assert expected and end.text == expected
    assert start.prompt_tokens == end.prompt_tokens == len(
        core.tokenizer.apply_chat_template([m.model_dump() for m in req.messages]))
    assert start.messages_used == 1
    assert end.finish_reason.value in ("length", "stop") and 0 < end.completion_tokens <= 10
    await wait_idle(core)


async def test_client_generate_returns_the_end_event(client, core):
    end = await client.generate(greedy("Hello there", max_tokens=4))
    assert isinstance(end, GenerationEnded) and end.completion_tokens <= 4


async def test_logprobs_and_penalties_cross_the_wire_unchanged(client, core):
    """The same request through the internal HTTP service and in-process: the same text and the
    same per-token logprobs, bytes and alternatives (penalties and a bias applied on both sides)."""
    req = greedy("Tell me about otters.", max_tokens=6, logprobs=2, presence_penalty=1.5, frequency_penalty=0.5,
                 repetition_penalty=1.3, logit_bias={42: -5.0})
    remote = await collect(await client.start(req))
    local = await collect(await core.start(req))
    assert remote[-1].text == local[-1].text

    def entries(events):
        return [e for d in events if isinstance(d, TextDelta) for e in d.logprobs]

    assert entries(remote) == entries(local) and len(entries(remote)) == remote[-1].completion_tokens
    assert all(len(e.top) == 2 for e in entries(remote))
    await wait_idle(core)


# --------------------------------------------------------------------------- secret, health
async def test_internal_routes_need_the_secret(base_url):
    body = greedy("hi", max_tokens=2).model_dump_json()
    async with httpx.AsyncClient(base_url=base_url) as raw:
        for headers in ({}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: SECRET + "x"}):
            response = await raw.post("/internal/generate", content=body, headers=headers)
            assert response.status_code == 401, headers
        # the secret is checked before the body is even parsed
        response = await raw.post("/internal/generate", content=b"{not json", headers={})
        assert response.status_code == 401
        assert (await raw.delete("/internal/adapters/x")).status_code == 401
        ok = await raw.post("/internal/generate", content=body,
                            headers={SECRET_HEADER: SECRET, "Content-Type": "application/json"})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/x-ndjson")
        assert [line for line in ok.text.splitlines() if line][-1].startswith('{"event": "end"')


async def test_health_and_readiness_need_no_secret(base_url, client):
    async with httpx.AsyncClient(base_url=base_url) as raw:
        assert (await raw.get("/healthz")).status_code == 200
        assert (await raw.get("/readyz")).json() == {"ready": True}
    assert await client.is_ready()


async def test_readyz_is_503_when_the_engine_stopped():
    stopped = SimpleNamespace(ready=lambda: False)
    app = create_inference_app(stopped, SECRET)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as raw:
        assert (await raw.get("/readyz")).status_code == 503
        assert (await raw.get("/healthz")).status_code == 200


def test_an_empty_secret_is_refused():
    with pytest.raises(ValueError, match="secret"):
        create_inference_app(SimpleNamespace(), "")


# --------------------------------------------------------------------------- refusals
async def _refusal(client, req) -> InferenceError:
    with pytest.raises(InferenceError) as info:
        await client.start(req)
    return info.value


async def test_bad_requests_are_422_naming_the_problem(client, core):
    error = await _refusal(client, greedy("hi", max_tokens=5000))
    assert error.status == 422 and "max_tokens" in str(error)

    error = await _refusal(client, greedy("a message that is certainly longer than three tokens",
                                          history_token_budget=3))
    assert error.status == 422 and "at most 3 fit" in str(error)

    bad_spec = AdapterSpec.model_construct(id="a", config_key="k/c.json", weights_key="k/w", sha256="not-a-sha")
    error = await _refusal(client, GenerateRequest.model_construct(
        **{**greedy("hi").__dict__, "adapter": bad_spec}))
    assert error.status == 422 and any("sha256" in p for p in error.problems)

    # every problem at once
    error = await _refusal(client, GenerateRequest.model_construct(
        **{**greedy("hi").__dict__, "temperature": -1.0, "top_p": 2.0}))
    assert error.status == 422 and len(error.problems) == 2
    assert any("temperature" in p for p in error.problems) and any("top_p" in p for p in error.problems)
    await wait_idle(core)


async def test_full_queue_is_429_with_retry_after(tiny_checkpoint):
    """One running sequence and a waiting queue of one: the third concurrent request is refused."""
    llm = LLM(str(tiny_checkpoint), page_tokens=4, max_num_seqs=1, max_waiting=1)
    small = InferenceCore(llm)
    try:
        with serve_app(create_inference_app(small, SECRET)) as url:
            remote = RemoteInference(url, SECRET, timeout_s=30.0)
            running = await remote.start(long_request(1))
            await until_delta(running)
            waiting = await remote.start(long_request(2))
            error = await _refusal(remote, long_request(3))
            assert error.status == 429 and error.retry_after == 1, error
            await running.aclose()
            await waiting.aclose()
            await wait_idle(small)
            await remote.aclose()
    finally:
        llm.close()


async def test_tools_and_tool_turns_cross_the_wire(tools_checkpoint):
    """Tools, a named choice and a history with an assistant's calls and a tool's result: the same
    events through the internal HTTP service as in-process, the start event naming the format."""
    llm = LLM(str(tools_checkpoint), page_tokens=4)
    tools_core = InferenceCore(llm)
    parameters = {"type": "object", "required": ["n"], "additionalProperties": False,
                  "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    messages = [{"role": "user", "content": "Count."},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "name": "count", "arguments": '{"n": 1}'}]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
                {"role": "user", "content": "Again."}]
    req = GenerateRequest(messages=messages, tools=[{"name": "count", "parameters": parameters}], tool_choice="count",
                          max_tokens=24, temperature=1.0, seed=5)
    try:
        with serve_app(create_inference_app(tools_core, SECRET)) as url:
            remote = RemoteInference(url, SECRET, timeout_s=30.0)
            over_http = await collect(await remote.start(req))
            await remote.aclose()
        local = await collect(await tools_core.start(req))
        assert over_http[1:] == local[1:]  # the request ids differ
        assert over_http[0].prompt_tokens == local[0].prompt_tokens and over_http[0].messages_used == 4
        assert over_http[0].tool_call_format == "hermes" and over_http[-1].finish_reason is FinishReason.STOP
        assert over_http[-1].text.startswith('<tool_call>\n{"name": "count", "arguments": {"n":')
    finally:
        llm.close()


async def test_unreachable_service_is_503_with_retry_after():
    remote = RemoteInference(f"http://127.0.0.1:{closed_port()}", SECRET, timeout_s=5.0)
    try:
        error = await _refusal(remote, greedy("hi"))
        assert error.status == 503 and error.retry_after == 5
        with pytest.raises(InferenceError) as info:
            await remote.drop_adapter("a")
        assert info.value.status == 503
        assert await remote.is_ready() is False
    finally:
        await remote.aclose()


# --------------------------------------------------------------------------- adapters
async def test_adapter_prefetch_generate_and_drop(client, core, store, tiny_checkpoint, tmp_path):
    spec = stored_adapter(tmp_path, store, tiny_checkpoint, "user-7-v1")
    assert await client.prefetch(spec) in ("host", "device")
    assert core.engine.adapters.registry.get(spec.id) is not None

    req = greedy("Tell me about otters.", max_tokens=10)
    base = (await client.generate(req)).text
    tuned = (await client.generate(req.model_copy(update={"adapter": spec}))).text
    assert tuned != base
    assert tuned == await asyncio.to_thread(in_process_text, core, req, spec.id)

    assert await client.drop_adapter(spec.id) is True
    assert core.engine.adapters.registry.get(spec.id) is None
    assert await client.drop_adapter(spec.id) is False
    await wait_idle(core)


async def test_an_adapter_missing_from_the_store_is_503(client, tiny_checkpoint):
    spec = AdapterSpec(id="ghost", config_key="tenants/t1/adapters/ghost/adapter_config.json",
                       weights_key="tenants/t1/adapters/ghost/adapter_model.safetensors", sha256="0" * 64)
    with pytest.raises(InferenceError) as info:
        await client.prefetch(spec)
    assert info.value.status == 503 and "ghost" in str(info.value)


# --------------------------------------------------------------------------- disconnects
@pytest.mark.parametrize("read_delta", [True, False], ids=["after-a-delta", "after-start"])
async def test_closing_the_stream_aborts_the_request(client, core, read_delta):
    tokens_before = core.engine.stats.generation_tokens
    events = await client.start(long_request(5))
    if read_delta:
        await until_delta(events)
    else:
        assert isinstance(await anext(events), GenerationStarted)
    await events.aclose()
    await wait_idle(core)
    assert core.engine.stats.generation_tokens - tokens_before < LONG
    # the connection pool and the service still work afterwards
    assert isinstance(await client.generate(greedy("hi", max_tokens=2)), GenerationEnded)


# --------------------------------------------------------------------------- a misbehaving service
def _mock_client(handler) -> RemoteInference:
    return RemoteInference("http://svc", SECRET, transport=httpx.MockTransport(handler))


START = b'{"event": "start", "request_id": "r", "prompt_tokens": 3, "messages_used": 1}\n'


@pytest.mark.parametrize("body, needle", [
    (START + b'{"event": "delta", "text": "a", "tokens": 1}\n', "without an end event"),
    (START + b"this is not json\n", "malformed"),
    (START + b'{"event": "surprise"}\n', "malformed"),
    (START + b'{"event": "end", "finish_reason": "stop"}\n', "malformed"),  # fields missing
])
async def test_broken_streams_end_with_an_error_event(body, needle):
    remote = _mock_client(lambda request: httpx.Response(200, content=body))
    events = await collect(await remote.start(greedy("hi")))
    assert isinstance(events[0], GenerationStarted) and isinstance(events[-1], GenerationFailed)
    assert needle in events[-1].message
    await remote.aclose()


@pytest.mark.parametrize("status, headers, expected_status, expected_retry", [
    (500, {}, 503, 5),
    (503, {"Retry-After": "9"}, 503, 9),
    (401, {}, 503, 5),  # a wrong shared secret is the platform's fault, not the caller's
    (429, {"Retry-After": "2"}, 429, 2),
])
async def test_error_statuses_map_to_inference_errors(status, headers, expected_status, expected_retry):
    remote = _mock_client(lambda request: httpx.Response(status, json={"detail": ["nope"]}, headers=headers))
    error = await _refusal(remote, greedy("hi"))
    assert (error.status, error.retry_after) == (expected_status, expected_retry)
    assert "nope" in str(error)
    await remote.aclose()


# --------------------------------------------------------------------------- the response itself
async def test_a_disconnect_before_the_events_resume_still_aborts():
    """ASGI 2.4 servers report a disconnect as an OSError from ``send``: the event iterator was
    never resumed after ``start``, so the response itself must close it, which aborts the request."""
    from inference.service.app import EventStreamResponse

    aborted = []

    async def events():
        yield TextDelta("never sent", 1)

    async def send(message):
        if message["type"] == "http.response.body":
            raise OSError("the client went away")

    async def receive():
        await asyncio.sleep(3600)

    stream = GenerationStream(events(), lambda: aborted.append("r1"))
    response = EventStreamResponse(GenerationStarted("r1", 1, 1), stream)
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(Exception):
        await response(scope, receive, send)
    assert aborted == ["r1"]


async def test_a_finished_stream_is_not_aborted():
    from inference.service.app import EventStreamResponse

    aborted, sent = [], []

    async def events():
        yield GenerationEnded(FinishReason.STOP, 1, 0, "")

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    response = EventStreamResponse(GenerationStarted("r2", 1, 1), GenerationStream(events(), lambda: aborted.append("r2")))
    await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
    body = b"".join(m.get("body", b"") for m in sent)
    assert body.count(b"\n") == 2 and b'"end"' in body and aborted == []
