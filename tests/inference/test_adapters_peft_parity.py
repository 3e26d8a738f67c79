"""Mixed-adapter batches against HF PEFT on the bundled SmolLM2-135M (fp32, CPU)."""

import pytest

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams
from support.adapters import peft_adapter
from support.engine_helpers import run_to_completion
from support.hf_reference import hf_greedy, load_hf

pytestmark = pytest.mark.slow

ADAPTERS = {
    "r1-qv": dict(r=1, targets=["q_proj", "v_proj"], b_std=0.3),
    "r8-attn": dict(r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r16-mlp": dict(r=16, targets=["gate_proj", "up_proj", "down_proj"]),
    "r32-all-rslora": dict(r=32, targets="all-linear", rslora=True, alpha=16),
    "r64-all": dict(r=64, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    b_std=0.01),
    "r4-k-down": dict(r=4, targets=["k_proj", "down_proj"], alpha=32),
}
PROMPTS = ["The weather today is", "My favourite food is", "def add(a, b):"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def peft_cases(bundled_checkpoint, tmp_path_factory):
    """Adapter directories and, per adapter and prompt, PEFT's greedy tokens; plus the base's."""
    base = load_hf(bundled_checkpoint)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundled_checkpoint))
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    base_tokens = [hf_greedy(base, ids, NEW_TOKENS) for ids in prompt_ids]
    dirs, expected = {}, {}
    for seed, (name, spec) in enumerate(ADAPTERS.items()):
        out = tmp_path_factory.mktemp(name)
        model = peft_adapter(base, out, seed=seed, **spec)
        expected[name] = [hf_greedy(model, ids, NEW_TOKENS) for ids in prompt_ids]
        base = model.unload()
        dirs[name] = out
    return prompt_ids, base_tokens, dirs, expected


def _run_mixed(engine, prompt_ids, dirs):
    for name, path in dirs.items():
        engine.adapters.register_dir(name, path)
    jobs = [(ids, None) for ids in prompt_ids[:2]]
    jobs += [(ids, name) for name in dirs for ids in prompt_ids]
    requests = []
    for ids, name in jobs:
        request = engine.request_from_ids(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True), None, name)
        engine.add(request)
        requests.append((request, ids, name))
    final = run_to_completion(engine)
    return [(final[r.request_id].token_ids, ids, name) for r, ids, name in requests]


def _check(results, prompt_ids, base_tokens, expected):
    for tokens, ids, name in results:
        index = prompt_ids.index(ids)
        want = base_tokens[index] if name is None else expected[name][index]
        assert tokens == want, f"adapter {name}, prompt {index}"


def test_adapters_change_outputs(peft_cases):
    prompt_ids, base_tokens, _dirs, expected = peft_cases
    differing = sum(expected[name][i] != base_tokens[i] for name in expected for i in range(len(prompt_ids)))
    assert differing >= len(expected) * len(prompt_ids) // 2


def test_one_mixed_batch_matches_peft(bundled_checkpoint, peft_cases):
    prompt_ids, base_tokens, dirs, expected = peft_cases
    engine = LLMEngine(bundled_checkpoint, EngineConfig(cpu_pool_bytes=512 << 20))
    results = _run_mixed(engine, prompt_ids, dirs)
    _check(results, prompt_ids, base_tokens, expected)
    assert engine.stats.batch_size_sum / engine.stats.steps > 4  # the adapters really shared steps
    assert engine.pool.occupancy().kv == 0


def test_matches_peft_with_evictions_and_reloads(bundled_checkpoint, peft_cases):
    prompt_ids, base_tokens, dirs, expected = peft_cases
    # host RAM holds about one large adapter; the pool holds a few adapters beside the KV cache
    page_bytes = 16 * 2 * 192 * 30 * 4
    engine = LLMEngine(bundled_checkpoint, EngineConfig(pool_bytes=140 * page_bytes, host_adapter_bytes=80 << 20, max_num_seqs=4))
    results = _run_mixed(engine, prompt_ids, dirs)
    _check(results, prompt_ids, base_tokens, expected)
    stats = engine.adapters.stats
    assert stats.device.evictions > 0 and stats.host.evictions > 0 and stats.device.loads > len(dirs)
    assert engine.pool.occupancy().kv == 0
