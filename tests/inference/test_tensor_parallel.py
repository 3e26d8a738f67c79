"""Tensor parallelism on the CPU with gloo: the same greedy tokens as one process.

Each test runs one mixed batch twice, with ``tensor_parallel_size`` 1 and N: base-model rows and
adapters of different ranks and target sets (MLP included) in the same steps, prefill chunks next
to decode tokens, and a pool small enough that requests are preempted.
"""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.synthetic_adapters import synthetic_adapter
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.llm import LLM
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry
from inference.sampling import SamplingParams
from inference.tensor_parallel.partition import TensorParallelConfigError, TensorParallelLayout
from support.engine_helpers import run_to_completion

ADAPTERS = {  # name: (rank, targets)
    "r4-attn": (4, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "r8-mlp": (8, ("v_proj", "gate_proj", "up_proj", "down_proj")),
    "r2-down": (2, ("o_proj", "down_proj")),
}


def _adapters(root, config: ModelConfig, std: float) -> dict:
    return {name: synthetic_adapter(root / name, config, r=r, targets=targets, alpha=2 * r, seed=i, std=std)
            for i, (name, (r, targets)) in enumerate(ADAPTERS.items())}


def _run(checkpoint, tp: int, num_pages: int, adapters: dict, prompts: list, max_tokens: int,
         budget: int) -> tuple[list[list[int]], dict]:
    """Greedy tokens of every prompt (adapters round-robin, None first) and what the run saw."""
    config = ModelConfig.from_checkpoint(checkpoint)
    rank_config = TensorParallelLayout(config, tp).rank_config()
    page_bytes = PageGeometry.for_model(rank_config, 4, torch.float32).page_bytes
    engine = LLMEngine(checkpoint, EngineConfig(page_tokens=4, pool_bytes=num_pages * page_bytes,
                                                max_num_batched_tokens=budget, enable_prefix_cache=False,
                                                tensor_parallel_size=tp))
    seen = {"mixed_steps": 0, "adapters_in_a_step": 0}
    try:
        assert engine.pool.num_pages == num_pages
        for name, path in adapters.items():
            engine.adapters.register_dir(name, path)
        names = [None, *adapters]
        run = engine.runner.run

        def observe(plan):  # what the step mixes, read before the real run
            prefill = any(c.num_tokens > 1 for c in plan.chunks)
            decode = any(c.num_tokens == 1 and c.start >= len(c.request.prompt_token_ids) for c in plan.chunks)
            seen["mixed_steps"] += prefill and decode
            used = {c.request.adapter.uid for c in plan.chunks if c.request.adapter is not None}
            seen["adapters_in_a_step"] = max(seen["adapters_in_a_step"], len(used))
            return run(plan)

        engine.runner.run = observe
        requests = []
        for i, prompt in enumerate(prompts):
            request = engine.request_from_ids(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                     ignore_eos=True), None, names[i % len(names)])
            engine.add(request)
            requests.append(request)
        final = run_to_completion(engine)
        seen["preemptions"] = engine.scheduler.num_preemptions
        return [final[r.request_id].token_ids for r in requests], seen
    finally:
        engine.close()


def _check(tokens_1, tokens_n, seen_n):
    assert all(len(t) > 0 for t in tokens_1)
    mismatched = [i for i, (a, b) in enumerate(zip(tokens_1, tokens_n)) if a != b]
    assert not mismatched, f"prompts {mismatched} differ: {[(tokens_1[i], tokens_n[i]) for i in mismatched]}"
    assert seen_n["preemptions"] > 0, "the pool was never tight: no preemption"
    assert seen_n["mixed_steps"] > 0, "no step mixed prefill and decode"
    assert seen_n["adapters_in_a_step"] >= 2, "no step mixed adapters"


def test_tiny_llama_tp2_matches_tp1(tmp_path, tiny_checkpoint):
    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    adapters = _adapters(tmp_path, config, std=0.1)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(6, 30))] for _ in range(8)]
    tokens_1, seen_1 = _run(tiny_checkpoint, 1, 64, adapters, prompts, 8, budget=48)
    tokens_2, seen_2 = _run(tiny_checkpoint, 2, 64, adapters, prompts, 8, budget=48)
    print("tp1", seen_1, "tp2", seen_2)
    _check(tokens_1, tokens_2, seen_2)


def test_refuses_kv_heads_that_do_not_divide(tiny_checkpoint):
    config = ModelConfig.from_checkpoint(tiny_checkpoint)  # 4 query heads, 2 KV heads
    with pytest.raises(TensorParallelConfigError, match="num_key_value_heads 2 does not divide by 3"):
        TensorParallelLayout(config, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_timeout_s must be a finite number > 0"):
        EngineConfig(tensor_parallel_timeout_s=0)


def test_an_idle_group_outlives_its_timeout(tiny_checkpoint):
    """The workers wait for the next step without the data group's timeout: idle for longer than
    it, the same group (same worker processes) still serves, with the same tokens as TP=1."""
    import time

    prompt = [5, 9, 11, 7, 3, 20, 13]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=2 << 20) as single:
        expected = single.generate([prompt], params)[0].token_ids
    with LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=2 << 20, tensor_parallel_size=2,
             tensor_parallel_timeout_s=3.0) as llm:
        workers = llm.engine.workers
        pids = [p.pid for p in workers.processes]
        time.sleep(5.0)  # idle for longer than the 3 s timeout, right after start-up
        assert llm.generate([prompt], params)[0].token_ids == expected
        time.sleep(5.0)  # and idle again between requests
        assert workers.failure() is None
        assert llm.generate([prompt], params)[0].token_ids == expected
        assert llm.engine.workers is workers and [p.pid for p in workers.processes] == pids


SMOL_PROMPTS = [
    "What is the capital of France? Answer in one sentence, please.",
    "Write a short poem about the sea and the wind that moves over it.",
    "List three colours of the rainbow and explain where rainbows come from.",
    "Explain in simple words why the sky is blue during the day.",
    "Give me a recipe for a quick breakfast with eggs and bread.",
    "Tell me a fact about the planet Mars and its two small moons.",
]


def test_smollm2_tp3_matches_tp1(tmp_path, bundled_checkpoint):
    """SmolLM2-135M: 9 query heads and 3 KV heads, one KV head per rank."""
    from inference.tokenizer import Tokenizer

    config = ModelConfig.from_checkpoint(bundled_checkpoint)
    adapters = _adapters(tmp_path, config, std=0.02)
    tokenizer = Tokenizer(bundled_checkpoint)
    prompts = [tokenizer.encode(p + " " + p) for p in SMOL_PROMPTS]  # about 30 tokens each
    tokens_1, seen_1 = _run(bundled_checkpoint, 1, 80, adapters, prompts, 8, budget=32)
    tokens_3, seen_3 = _run(bundled_checkpoint, 3, 80, adapters, prompts, 8, budget=32)
    print("tp1", seen_1, "tp3", seen_3)
    _check(tokens_1, tokens_3, seen_3)


def test_the_shards_recompose_the_layers_they_split(tiny_checkpoint):
    """Column-parallel outputs concatenate, row-parallel partial outputs (LoRA included) sum, and
    a vocabulary that does not divide is padded with zero rows."""
    import dataclasses

    from inference.adapters.lora_weights import LoraModuleWeights

    config = dataclasses.replace(ModelConfig.from_checkpoint(tiny_checkpoint), vocab_size=10)
    layout = TensorParallelLayout(config, 2)
    gen = torch.Generator().manual_seed(0)
    h, inter = config.hidden_size, config.intermediate_size
    x, mid = torch.randn(5, h, generator=gen), torch.randn(5, inter, generator=gen)
    weights = {"model.layers.0.mlp.up_proj.weight": torch.randn(inter, h, generator=gen),
               "model.layers.0.mlp.down_proj.weight": torch.randn(h, inter, generator=gen),
               "model.embed_tokens.weight": torch.randn(10, h, generator=gen)}
    shards = [layout.shard_weights(weights, r) for r in range(2)]
    up = torch.cat([x @ s["model.layers.0.mlp.up_proj.weight"].T for s in shards], dim=1)
    torch.testing.assert_close(up, x @ weights["model.layers.0.mlp.up_proj.weight"].T)
    down = sum(mid[:, r * inter // 2:(r + 1) * inter // 2] @ s["model.layers.0.mlp.down_proj.weight"].T
               for r, s in enumerate(shards))
    torch.testing.assert_close(down, mid @ weights["model.layers.0.mlp.down_proj.weight"].T)
    assert shards[1]["model.embed_tokens.weight"].shape == (5, h) and layout.vocab_range(1) == (5, 10)
    assert layout.vocab_shard == 5
    padded = TensorParallelLayout(dataclasses.replace(config, vocab_size=9), 2).shard_weights(
        {"model.embed_tokens.weight": weights["model.embed_tokens.weight"][:9]}, 1)["model.embed_tokens.weight"]
    assert padded.shape == (5, h) and not padded[4].any()
    lora = {"up_proj": LoraModuleWeights(torch.randn(1, 3, h, generator=gen), torch.randn(1, 3, inter, generator=gen)),
            "down_proj": LoraModuleWeights(torch.randn(1, 3, inter, generator=gen), torch.randn(1, 3, h, generator=gen))}
    parts = [layout.shard_lora(lora, r) for r in range(2)]
    up_lora = torch.cat([(x @ p["up_proj"].a[0].T) @ p["up_proj"].b_t[0] for p in parts], dim=1)
    torch.testing.assert_close(up_lora, (x @ lora["up_proj"].a[0].T) @ lora["up_proj"].b_t[0])
    down_lora = sum((mid[:, r * inter // 2:(r + 1) * inter // 2] @ p["down_proj"].a[0].T) @ p["down_proj"].b_t[0]
                    for r, p in enumerate(parts))
    torch.testing.assert_close(down_lora, (mid @ lora["down_proj"].a[0].T) @ lora["down_proj"].b_t[0])


def test_a_worker_whose_communicator_fails_reports_it(monkeypatch):
    """The worker's process groups (NCCL's init on CUDA) are built inside the start-up report: the
    driver reads the cause instead of waiting for the store to time out."""
    import datetime

    import torch.distributed as dist

    from inference.tensor_parallel import worker as worker_module

    def failing(*args, **kwargs):
        raise RuntimeError("no communicator today")

    monkeypatch.setattr(worker_module, "Communicator", failing)
    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    spec = worker_module.WorkerSpec("/nonexistent", 1, 2, "127.0.0.1", store.port, "cpu", "float32", 8, 4, None,
                                    False, 8, torch.get_num_threads(), 10.0)
    with pytest.raises(RuntimeError, match="no communicator today"):
        worker_module.worker_main(spec)
    status = store.get(worker_module.READY_KEY.format(rank=1)).decode()
    assert status.startswith("error: ") and "no communicator today" in status


def test_a_failed_start_closes_the_drivers_communicator(monkeypatch, tmp_path):
    """A worker that cannot load its checkpoint fails the start with its cause, and the driver's
    process groups are closed, not leaked."""
    from inference.tensor_parallel import group as group_module

    closed = []

    class Recording(group_module.Communicator):
        def close(self):
            closed.append(self.rank)
            super().close()

    monkeypatch.setattr(group_module, "Communicator", Recording)
    with pytest.raises(group_module.WorkerGroupError, match="rank 1 failed to start"):
        group_module.WorkerGroup(str(tmp_path / "missing"), 2, torch.device("cpu"), torch.float32, 8, 4, None,
                                 False, 8, timeout_s=30.0, start_timeout_s=60.0)
    assert closed == [0]


def test_a_step_of_an_aborted_group_fails(tiny_checkpoint):
    """Once the supervisor aborted the data group (a worker died; on NCCL the logits are then
    garbage), the step in flight fails instead of sampling from them."""
    from inference.tensor_parallel.group import WorkerGroupError

    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=2 << 20, tensor_parallel_size=2))
    try:
        engine.add_request([5, 9, 11, 7], SamplingParams(max_tokens=4, temperature=0.0))
        engine.abort_tensor_parallel()  # gloo: only marked (its collectives fail on a closed peer)
        with pytest.raises(WorkerGroupError, match="aborted"):
            engine.step()
        assert engine.stats.generation_tokens == 0
    finally:
        engine.close()
