"""Adapter tiers and life cycle on a tiny model: thousands registered, few resident, bad adapters,
versions, unregistering under load, cold adapters, store failures."""

import asyncio
import json
import random
import threading
import time

import pytest

from inference import LLM, SamplingParams
from inference.adapters.object_store import LocalFolderStore
from inference.adapters.peft_checkpoint import AdapterValidationError
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from support.adapters import synthetic_adapter
from support.engine_helpers import run_to_completion
from support.hf_reference import hf_greedy, load_hf

TARGET_SETS = [("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), ("k_proj", "o_proj")]


def _greedy(n=4):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_config(tiny_checkpoint):
    from inference.model_config import ModelConfig

    return ModelConfig.from_checkpoint(tiny_checkpoint)


def _make(tmp_path, tiny_config, name, seed, r=4, targets=TARGET_SETS[2], alpha=8.0, std=0.3):
    return synthetic_adapter(tmp_path / name, tiny_config, r=r, targets=targets, alpha=alpha, seed=seed, std=std)


def test_two_thousand_adapters_few_resident(tmp_path, tiny_checkpoint, tiny_config):
    rng = random.Random(random.getrandbits(64))  # from the seed the random_seed fixture prints
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    page_bytes = 4 * 2 * 32 * 2 * 4  # page_tokens 4, kv_size 32, 2 layers, fp32
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=150 * page_bytes,
                                                     host_adapter_bytes=2 << 20, max_num_seqs=16))
    specs = {}
    for i in range(2000):
        r = rng.choice([1, 2, 4, 8])
        targets = rng.choice(TARGET_SETS)
        path = _make(tmp_path, tiny_config, f"a{i}", seed + i, r=r, targets=targets)
        engine.adapters.register_dir(f"user-{i}", path)
        specs[f"user-{i}"] = path
    assert len(engine.adapters.registry) == 2000
    host_resident, device_resident = engine.adapters.resident_counts()
    assert host_resident < 400 and device_resident == 0
    # 120 requests across the adapters (power-law popularity) plus base rows
    popularity = [min(int(rng.paretovariate(1.0)) - 1, 1999) for _ in range(100)]
    chosen = popularity + [rng.randrange(2000) for _ in range(20)]
    requests = []
    for index in chosen:
        prompt = [rng.randrange(3, 49000) for _ in range(rng.randint(2, 10))]
        request = engine.request_from_ids(prompt, _greedy(), None, f"user-{index}")
        engine.add(request)
        requests.append((request, prompt, f"user-{index}"))
    peaks = [0]
    final = run_to_completion(engine, on_step=lambda e: peaks.append(e.adapters.resident_counts()[1]))
    peak_device = max(peaks)
    assert all(final[r.request_id].finish_reason.value == "length" for r, _, _ in requests), f"seed {seed}"
    assert peak_device < 100, "only a few adapters should be resident on the device at once"
    stats = engine.adapters.stats
    assert stats.device.evictions > 0 and stats.host.misses > 0 and stats.host.evictions > 0, f"seed {seed}"
    # spot-check a few requests against PEFT loading the same files on the HF model
    from peft import PeftModel

    hf = load_hf(tiny_checkpoint)
    for request, prompt, name in rng.sample(requests, 3):
        peft_model = PeftModel.from_pretrained(hf, str(specs[name]))
        assert final[request.request_id].token_ids == hf_greedy(peft_model, prompt, 4), f"{name} seed {seed}"
        hf = peft_model.unload()
    assert engine.pool.occupancy().kv == 0


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(tmp_path, tiny_checkpoint, tiny_config):
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=8 << 20) as llm:
        good = _make(tmp_path, tiny_config, "good", 1)
        cases = {}
        nan = _make(tmp_path, tiny_config, "nan", 2)
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(nan / "adapter_model.safetensors"))
        first = sorted(tensors)[0]
        tensors[first][0, 0] = float("nan")
        save_file(tensors, str(nan / "adapter_model.safetensors"))
        cases["nan"] = (nan, "NaN")
        truncated = _make(tmp_path, tiny_config, "trunc", 3)
        data = (truncated / "adapter_model.safetensors").read_bytes()
        (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        cases["truncated"] = (truncated, "safetensors")
        pickled = _make(tmp_path, tiny_config, "pickle", 4)
        (pickled / "adapter_model.safetensors").unlink()
        (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
        cases["pickle"] = (pickled, "pickle")
        for name, rank in (("rank0", 0), ("rank-huge", 4096)):
            path = _make(tmp_path, tiny_config, name, 5)
            config = json.loads((path / "adapter_config.json").read_text())
            config["r"] = rank
            (path / "adapter_config.json").write_text(json.dumps(config))
            cases[name] = (path, "r")
        dora = _make(tmp_path, tiny_config, "dora", 6)
        config = json.loads((dora / "adapter_config.json").read_text())
        config["use_dora"] = True
        (dora / "adapter_config.json").write_text(json.dumps(config))
        cases["dora"] = (dora, "DoRA")
        for name, (path, needle) in cases.items():
            with pytest.raises(AdapterValidationError, match=needle):
                llm.register_adapter(name, path)
            assert llm.engine.adapters.registry.get(name) is None
        llm.register_adapter("good", good)
        outs = llm.generate(["hi", "there"], _greedy(), adapters=["good", None])
        assert all(len(o.token_ids) == 4 for o in outs)
        with pytest.raises(ValueError, match="unknown adapter"):
            llm.generate(["hi"], _greedy(), adapters=["nan"])


def test_versions_and_identity(tmp_path, tiny_checkpoint, tiny_config):
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=8 << 20) as llm:
        v1 = _make(tmp_path, tiny_config, "v1", 10)
        v2 = _make(tmp_path, tiny_config, "v2", 11)
        first = llm.register_adapter("alice", v1)
        assert llm.register_adapter("alice", v1) is first  # same weights: idempotent
        with pytest.raises(ValueError, match="different weights"):
            llm.register_adapter("alice", v2)
        out1 = llm.generate(["hello"], _greedy(6), adapters=["alice"])[0].token_ids
        second = llm.register_adapter("alice", v2, new_version=True)
        assert second.version == 2 and second.sha256 != first.sha256
        out2 = llm.generate(["hello"], _greedy(6), adapters=["alice"])[0].token_ids
        llm.register_adapter("alice-copy", v2)
        assert llm.generate(["hello"], _greedy(6), adapters=["alice-copy"])[0].token_ids == out2
        assert out1 != out2


async def test_unregister_waits_for_in_flight_requests(tmp_path, tiny_checkpoint, tiny_config):
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=8 << 20) as llm:
        llm.register_adapter("bob", _make(tmp_path, tiny_config, "bob", 20))
        ref = llm.engine.adapters.registry.current("bob")
        store = llm.engine.adapters.store
        assert store.exists(ref.weights_key)
        stream = llm.stream("long story", SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), adapter="bob")
        first = await stream.__anext__()
        assert not first.finished
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(llm.unregister_adapter, "bob", 0.05)
        assert llm.engine.adapters.registry.get("bob") is not None  # still registered after a timeout
        done = threading.Event()
        errors = []

        def unregister():
            try:
                llm.unregister_adapter("bob", timeout=60)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
            done.set()

        thread = threading.Thread(target=unregister)
        thread.start()
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="unknown adapter"):
            llm.generate(["new"], _greedy(), adapters=["bob"])  # hidden at once
        assert not done.is_set()  # waiting for the stream
        outputs = [first] + [o async for o in stream]
        assert outputs[-1].finished and len(outputs[-1].token_ids) == 60
        await asyncio.to_thread(done.wait, 30)
        thread.join()
        assert not errors
        assert llm.engine.adapters.registry.get("bob") is None
        assert not store.exists(ref.weights_key)
        assert llm.engine.pool.occupancy().adapter == 0


class SlowStore(LocalFolderStore):
    """A real local store with injected latency (a slow S3 cannot be summoned on demand)."""

    delay = 0.0
    fail = False

    def get(self, key):
        time.sleep(self.delay)
        if self.fail:
            raise OSError("object store unreachable")
        return super().get(key)


def test_cold_adapter_costs_its_request_not_the_batch(tmp_path, tiny_checkpoint, tiny_config):
    store = SlowStore(tmp_path / "store")
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20), adapter_store=store)
    engine.adapters.register_dir("cold", _make(tmp_path, tiny_config, "cold", 30))
    ref = engine.adapters.registry.current("cold")
    engine.adapters.host.discard(ref.uid)  # as if evicted from host RAM
    store.delay = 0.5
    cold = engine.request_from_ids([5, 6, 7], _greedy(3), None, "cold")
    base = engine.request_from_ids([8, 9], _greedy(3), None, None)
    engine.add(cold)
    engine.add(base)
    final = run_to_completion(engine)
    assert list(final) == [base.request_id, cold.request_id]  # finish order
    assert engine.adapters.stats.host.misses >= 1


def test_store_failure_fails_only_that_request(tmp_path, tiny_checkpoint, tiny_config, monkeypatch):
    store = SlowStore(tmp_path / "store")
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20), adapter_store=store)
    engine.adapters.register_dir("flaky", _make(tmp_path, tiny_config, "flaky", 40))
    ref = engine.adapters.registry.current("flaky")
    engine.adapters.host.discard(ref.uid)
    store.fail = True
    bad = engine.request_from_ids([5, 6], _greedy(), None, "flaky")
    good = engine.request_from_ids([7, 8], _greedy(), None, None)
    engine.add(bad)
    engine.add(good)
    final = run_to_completion(engine, timeout_s=30)
    assert final[bad.request_id].finish_reason.value == "error"
    assert "object store unreachable" in final[bad.request_id].error
    assert final[good.request_id].finish_reason.value == "length"
    assert engine.adapters.registry.users(ref.uid) == 0
    store.fail = False
    follow_up = engine.request_from_ids([5, 6], _greedy(), None, "flaky")
    engine.add(follow_up)
    final = run_to_completion(engine, timeout_s=30)
    assert final[follow_up.request_id].finish_reason.value == "error"  # within the retry delay: fails fast
    import inference.adapters.host_tier as host_tier

    monkeypatch.setattr(host_tier, "FETCH_RETRY_SECONDS", 0.0)  # the delay has passed: fetch again
    retry = engine.request_from_ids([5, 6], _greedy(), None, "flaky")
    engine.add(retry)
    final = run_to_completion(engine, timeout_s=30)
    assert final[retry.request_id].finish_reason.value == "length"


def test_running_adapters_are_never_evicted_under_pressure(tmp_path, tiny_checkpoint, tiny_config):
    page_bytes = 4 * 2 * 32 * 2 * 4
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=40 * page_bytes, max_num_seqs=8))
    names = []
    for i in range(6):
        engine.adapters.register_dir(f"p{i}", _make(tmp_path, tiny_config, f"p{i}", 50 + i, r=8))
        names.append(f"p{i}")
    requests = [engine.request_from_ids([10 + i] * 6, _greedy(12), None, names[i % 6]) for i in range(12)]
    for r in requests:
        engine.add(r)

    def check(e):
        for request in e.scheduler.running:
            assert e.adapters.resident(request.adapter.uid) is not None
        resident_pages = sum(len(e.adapters.resident(uid).pages) for uid in e.adapters.resident_uids())
        assert e.pool.occupancy().adapter == resident_pages

    run_to_completion(engine, on_step=check)
    assert engine.adapters.stats.device.evictions > 0


def test_superseded_versions_are_freed_after_their_last_request(tmp_path, tiny_checkpoint, tiny_config):
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20))
    engine.adapters.register_dir("carol", _make(tmp_path, tiny_config, "c1", 60))
    old = engine.adapters.registry.current("carol")
    in_flight = engine.request_from_ids([5, 6, 7], _greedy(20), None, "carol")
    engine.add(in_flight)
    engine.step()  # v1 is now resident and used by a running request
    new = engine.adapters.register_dir("carol", _make(tmp_path, tiny_config, "c2", 61), new_version=True)
    assert engine.adapters.resident(old.uid) is not None and engine.adapters.host.contains(old.uid)
    run_to_completion(engine)
    assert engine.adapters.resident(old.uid) is None and not engine.adapters.host.contains(old.uid)
    assert engine.adapters.registry.users(old.uid) == 0 and engine.adapters.registry.current("carol") is new
    assert engine.pool.occupancy().adapter == 0
    # a version nobody uses is dropped from host RAM at once when superseded
    third = engine.adapters.register_dir("carol", _make(tmp_path, tiny_config, "c3", 62), new_version=True)
    assert not engine.adapters.host.contains(new.uid) and engine.adapters.host.contains(third.uid)
