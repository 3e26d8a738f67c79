"""A request's adapter version is resolved when the request is made and acquired when it is added
(engine thread). What happens to a request made before its adapter changes and added after:
re-registered as a new version, it runs with the new version and finishes; unregistered (or being
unregistered), it gets a clear error and holds no count on any version."""

from __future__ import annotations

import threading
import time

import pytest

from inference import LLM, SamplingParams
from inference.adapters.registry import UnknownAdapterError
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from support.adapters import synthetic_adapter
from support.engine_helpers import run_to_completion

PROMPT = [5, 6, 7, 8]


def _greedy(n=6):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_config(tiny_checkpoint):
    from inference.model_config import ModelConfig

    return ModelConfig.from_checkpoint(tiny_checkpoint)


def _make(tmp_path, config, name, seed):
    return synthetic_adapter(tmp_path / name, config, r=4, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
                             alpha=8.0, seed=seed, std=0.3)


def _engine(tiny_checkpoint):
    return LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20))


def _run_one(engine, request):
    engine.add(request)
    return run_to_completion(engine)[request.request_id]


def test_made_before_a_new_version_and_added_after_runs_with_the_new_version(tmp_path, tiny_checkpoint, tiny_config):
    engine = _engine(tiny_checkpoint)
    manager = engine.adapters
    v1 = manager.register_dir("x", _make(tmp_path, tiny_config, "v1", 10))
    with_v1 = _run_one(engine, engine.make_request(PROMPT, _greedy(), None, "x")).token_ids
    early = engine.make_request(PROMPT, _greedy(), None, "x")
    assert early.adapter is v1
    v2 = manager.register_dir("x", _make(tmp_path, tiny_config, "v2", 11), new_version=True)
    assert not manager.registry.knows(v1.uid) and not manager.host.contains(v1.uid)  # nobody used v1
    out = _run_one(engine, early)
    assert early.adapter is v2 and out.finish_reason.value == "length" and out.error is None
    assert out.token_ids == _run_one(engine, engine.make_request(PROMPT, _greedy(), None, "x")).token_ids
    assert out.token_ids != with_v1
    assert manager.registry.users(v2.uid) == 0 and manager.registry.current("x") is v2
    assert engine.pool.occupancy().kv == 0


def test_made_before_a_new_version_while_the_old_one_is_in_use_keeps_the_old_one(tmp_path, tiny_checkpoint, tiny_config):
    engine = _engine(tiny_checkpoint)
    manager = engine.adapters
    v1 = manager.register_dir("x", _make(tmp_path, tiny_config, "v1", 10))
    holder = engine.make_request(PROMPT, _greedy(12), None, "x")
    engine.add(holder)
    engine.step()
    early = engine.make_request(PROMPT, _greedy(), None, "x")
    v2 = manager.register_dir("x", _make(tmp_path, tiny_config, "v2", 11), new_version=True)
    engine.add(early)
    assert early.adapter is v1 and manager.registry.users(v1.uid) == 2
    final = run_to_completion(engine)
    assert all(final[r.request_id].finish_reason.value == "length" for r in (holder, early))
    assert not manager.registry.knows(v1.uid) and manager.resident(v1.uid) is None  # freed after its last user
    assert manager.registry.current("x") is v2 and engine.pool.occupancy().adapter == 0


def test_made_before_unregistering_and_added_after_is_refused(tmp_path, tiny_checkpoint, tiny_config):
    engine = _engine(tiny_checkpoint)
    manager = engine.adapters
    path = _make(tmp_path, tiny_config, "y", 20)
    ref = manager.register_dir("y", path)
    early = engine.make_request(PROMPT, _greedy(), None, "y")
    manager.unregister("y", lambda fn: fn(), timeout=0)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'y'"):
        engine.add(early)
    assert not engine.has_unfinished()
    assert manager.registry.users(ref.uid) == 0 and not manager.registry.knows(ref.uid)
    assert not manager.store.exists(ref.weights_key) and not manager.host.contains(ref.uid)
    again = manager.register_dir("y", path)  # the id is free again; the same weights get a new uid
    assert again.uid != ref.uid
    late = engine.make_request(PROMPT, _greedy(), None, "y")
    assert _run_one(engine, late).finish_reason.value == "length"
    assert manager.registry.users(again.uid) == 0


async def test_added_while_its_adapter_is_being_unregistered_gets_an_error_and_leaks_no_count(
    tmp_path, tiny_checkpoint, tiny_config
):
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=8 << 20) as llm:
        manager = llm.engine.adapters
        ref = llm.register_adapter("z", _make(tmp_path, tiny_config, "z", 30))
        stream = llm.stream("a long story", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
                            adapter="z")
        first = await stream.__anext__()
        early = llm.engine.make_request(PROMPT, _greedy(), None, "z")
        errors: list[BaseException] = []

        def unregister():
            try:
                llm.unregister_adapter("z", timeout=60)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=unregister)
        thread.start()
        deadline = time.monotonic() + 10
        while True:  # wait until the id is hidden (the unregister is waiting for the stream)
            try:
                manager.lookup("z")
            except UnknownAdapterError:
                break
            assert time.monotonic() < deadline
            time.sleep(0.005)
        outputs, done = [], threading.Event()
        llm.loop.submit(early, lambda out: (outputs.append(out), out.finished and done.set()))
        assert done.wait(30)
        assert outputs[-1].finish_reason.value == "error" and "unknown adapter 'z'" in outputs[-1].error
        assert manager.registry.users(ref.uid) == 1  # only the stream
        rest = [o async for o in stream]
        assert (rest[-1] if rest else first).finished
        thread.join(30)
        assert not thread.is_alive() and not errors  # no leaked count kept it waiting
        assert not manager.registry.knows(ref.uid) and manager.registry.users(ref.uid) == 0
        assert llm.engine.pool.occupancy().adapter == 0


def test_a_version_is_wanted_while_it_can_still_serve_a_request():
    """What a fetch finishing late asks the registry: a version being unregistered is wanted only
    while a request still uses it (the fetch's result is then kept), not once none does."""
    from inference.adapters.registry import AdapterRef, AdapterRegistry

    registry = AdapterRegistry()
    ref = AdapterRef("w", 1, "0" * 64, AdapterRegistry.new_uid("w", 1), 4, ("q_proj",), (("q_proj", 4),),
                     128, 2.0, "k/c", "k/w")
    assert not registry.wanted(ref.uid)
    registry.publish(ref)
    assert registry.wanted(ref.uid)
    registry.acquire_ref(ref)
    refs = registry.begin_unregister("w")
    assert registry.wanted(ref.uid)  # hidden, but a request still needs it
    registry.release(ref)
    assert not registry.wanted(ref.uid) and registry.knows(ref.uid)
    registry.cancel_unregister("w")
    assert registry.wanted(ref.uid)
    registry.begin_unregister("w")
    registry.forget("w", refs)
    assert not registry.wanted(ref.uid) and not registry.knows(ref.uid)
