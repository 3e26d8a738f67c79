"""The public LLM interface: bad input, the engine loop surviving it, streaming, cancellation, CLI."""

import asyncio
import json
import time

import pytest

from api.cli import main as cli_main
from inference import LLM, SamplingParams
from inference.engine_loop import QueueFullError


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    instance = LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=16 << 20, max_model_len=256)
    yield instance
    instance.close()


def _ok(llm) -> None:
    out = llm.generate(["hello there"], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", SamplingParams(max_tokens=4), "prompt is empty"),
        ([], SamplingParams(max_tokens=4), "prompt is empty"),
        ("hi " * 300, SamplingParams(max_tokens=4), "beyond the context window"),
        ("hi", SamplingParams(max_tokens=300), "beyond the context window"),
        ([1, 2, 10**9], SamplingParams(max_tokens=4), "token ids"),
        (12345, SamplingParams(max_tokens=4), "prompt must be"),
    ],
)
def test_bad_requests_raise_before_scheduling_and_the_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], params)
    assert not llm.engine.has_unfinished()
    _ok(llm)


def test_one_bad_prompt_schedules_nothing(llm):
    before = llm.engine.stats.finished_requests
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert llm.engine.stats.finished_requests == before


def test_bad_sampling_values_raise():
    for kwargs in ({"max_tokens": 0}, {"temperature": float("nan")}, {"temperature": -0.5}, {"top_p": 0}, {"top_p": 1.01}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_unknown_model_and_broken_checkpoints(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown model"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="config.json is missing"):
        LLM(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_checkpoint / name).read_bytes())
    with pytest.raises(ValueError, match="no .safetensors"):
        LLM(str(broken))
    (broken / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read weights"):
        LLM(str(broken))
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["hidden_act"] = "relu"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act"):
        LLM(str(broken))


def test_wrong_weight_shapes_are_named(tmp_path, tiny_checkpoint):
    target = tmp_path / "ckpt"
    target.mkdir()
    for f in tiny_checkpoint.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["intermediate_size"] = 128
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong shapes .*mlp"):
        LLM(str(target))


def test_generate_and_chat(llm):
    outs = llm.generate(["a", "bb bb", "c c c c"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5, 5]
    reply = llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert reply.finished and 1 <= len(reply.token_ids) <= 4
    with pytest.raises(ValueError, match="role"):
        llm.chat([[{"role": "wizard", "content": "hi"}]])


async def test_stream_yields_incremental_deltas(llm):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    chunks = [out async for out in llm.stream("stream me", params)]
    final = chunks[-1]
    assert final.finished and len(chunks) >= 2
    assert "".join(c.delta_text for c in chunks) == final.text
    assert sum(len(c.new_token_ids) for c in chunks) == len(final.token_ids) == 12
    blocking = llm.generate(["stream me"], params)[0]
    assert blocking.token_ids == final.token_ids


async def test_concurrent_streams_and_cancellation_frees_pages(llm):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def consume(n_outputs):
        seen = 0
        async for _ in llm.stream("cancel me please", params):
            seen += 1
            if seen == n_outputs:
                break  # closing the iterator aborts the request
        return seen

    async def full():
        outs = [o async for o in llm.stream("keep going", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))]
        return outs[-1]

    results = await asyncio.gather(consume(3), consume(5), full())
    assert results[:2] == [3, 5] and len(results[2].token_ids) == 20
    deadline = time.monotonic() + 5
    while llm.engine.pool.occupancy().kv and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert llm.engine.pool.occupancy().kv == 0
    assert not llm.engine.has_unfinished()


async def test_task_cancellation_aborts(llm):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    started = asyncio.Event()

    async def run():
        async for _ in llm.stream("cancel the task", params):
            started.set()

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 5
    while llm.engine.has_unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not llm.engine.has_unfinished() and llm.engine.pool.occupancy().kv == 0


def test_bounded_queue_refuses_overload(tiny_checkpoint):
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=4 << 20, max_waiting=2, max_num_seqs=1) as small:
        engine = small.engine
        params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        requests = [engine.make_request("x y z", params) for _ in range(6)]
        accepted, refused = 0, 0
        for request in requests:
            try:
                small._loop.submit(request, lambda out: None)
                accepted += 1
            except QueueFullError:
                refused += 1
        assert refused >= 1 and accepted >= 2


def test_engine_loop_survives_a_failing_step(llm, monkeypatch):
    original = llm.engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return original(*args, **kwargs)

    monkeypatch.setattr(llm.engine.model, "forward", flaky)
    from inference import GenerationError

    with pytest.raises(GenerationError, match="simulated device fault"):
        llm.generate(["boom"], SamplingParams(max_tokens=3))
    assert llm.engine.pool.occupancy().kv == 0
    _ok(llm)


def test_cli_generate_and_prepare(llm, tiny_checkpoint, capsys):
    expected = llm.generate(["Hello"], SamplingParams(max_tokens=6, temperature=0.0))[0].text
    assert cli_main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Hello", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert cli_main(["models", "prepare"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert cli_main(["generate", "--model", str(tiny_checkpoint), "--prompt", "", "--max-tokens", "4"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


async def test_the_engine_loop_stream_is_the_one_place_that_aborts(llm, monkeypatch):
    """Closing an output stream before its last output aborts the request exactly once, even when
    nothing was read; closing it again, or after the last output, aborts nothing."""
    loop = llm.loop
    aborted = []
    real_abort = loop.abort
    monkeypatch.setattr(loop, "abort", lambda request_id: aborted.append(request_id) or real_abort(request_id))
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    unread = loop.open_stream(llm.engine.make_request("never read", params, request_id="unread"))
    unread.close()
    unread.close()
    assert aborted == ["unread"]
    assert [o async for o in unread] == []  # a closed stream yields nothing more

    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    done = loop.open_stream(llm.engine.make_request("read to the end", short, request_id="done"))
    outputs = [o async for o in done]
    assert outputs[-1].finished and len(outputs[-1].token_ids) == 2
    await done.aclose()
    assert aborted == ["unread"]
    deadline = time.monotonic() + 5
    while llm.engine.has_unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not llm.engine.has_unfinished() and llm.engine.pool.occupancy().kv == 0
