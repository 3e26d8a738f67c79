"""Greedy tokens and logits of the engine against HF transformers on the bundled SmolLM2-135M (fp32, CPU)."""

import pytest

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams

from support.engine_helpers import prompt_logits, run_to_completion
from support.hf_reference import hf_greedy, hf_last_logits, load_hf

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Once upon a time",
    "def quicksort(arr):\n    ",
    "The mitochondria is",
    "Translate to French: I like apples.",
    "1, 2, 3, 5, 8, 13,",
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote, previously "
    "unexplored valley in the Andes Mountains. Even more surprising to the researchers was the fact that "
    "the unicorns spoke perfect English. The lead scientist, Dr. Jorge Pérez, said that",
    "Q: Why is the sky blue?\nA:",
    "¿Dónde está la biblioteca? 東京は",
]
MAX_NEW = [12, 20, 16, 8, 14, 18, 10, 16, 12]


@pytest.fixture(scope="module")
def hf_model(bundled_checkpoint):
    return load_hf(bundled_checkpoint)


@pytest.fixture(scope="module")
def engine(bundled_checkpoint):
    return LLMEngine(bundled_checkpoint, EngineConfig(cpu_pool_bytes=256 << 20))


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids, n) for ids, n in zip(prompt_ids, MAX_NEW)]


def _params(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_prompts_are_varied(prompt_ids):
    lengths = sorted(len(p) for p in prompt_ids)
    assert len(prompt_ids) >= 8 and lengths[0] < 8 and lengths[-1] > 40


def test_one_at_a_time_matches_hf(engine, prompt_ids, expected):
    for ids, n, want in zip(prompt_ids, MAX_NEW, expected):
        request = engine.request_from_ids(ids, _params(n), None, None)
        engine.add(request)
        out = run_to_completion(engine)[request.request_id]
        assert out.token_ids == want
    assert engine.pool.occupancy().kv == 0


def test_batched_mixed_lengths_match_hf(engine, prompt_ids, expected):
    requests = [engine.request_from_ids(ids, _params(n), None, None) for ids, n in zip(prompt_ids, MAX_NEW)]
    for request in requests:
        engine.add(request)
    final = run_to_completion(engine)
    assert [final[r.request_id].token_ids for r in requests] == expected
    assert engine.pool.occupancy().kv == 0


def test_preemption_under_a_tiny_pool_keeps_outputs(bundled_checkpoint, prompt_ids, expected):
    # 10 pages of 8 tokens = 80 tokens of KV in all: the batch cannot all fit, so requests are
    # preempted and recomputed; chunked prefill with a budget of 16 tokens per step as well
    page_bytes = 8 * 2 * 192 * 30 * 4
    small = LLMEngine(bundled_checkpoint, EngineConfig(page_tokens=8, pool_bytes=10 * page_bytes, max_num_batched_tokens=16))
    assert small.pool.num_pages == 10
    requests = [small.request_from_ids(ids, _params(n), None, None) for ids, n in zip(prompt_ids, MAX_NEW)]
    for request in requests:
        small.add(request)
    final = run_to_completion(small)
    assert small.scheduler.num_preemptions > 0
    assert [final[r.request_id].token_ids for r in requests] == expected
    occupancy = small.pool.occupancy()
    assert occupancy.kv == 0 and occupancy.free + occupancy.cached == small.pool.num_pages


def test_last_position_logits_within_1e4(engine, hf_model, prompt_ids):
    ours = prompt_logits(engine, prompt_ids)
    for row, ids in enumerate(prompt_ids):
        ref = hf_last_logits(hf_model, ids)
        rel = (ours[row] - ref).norm() / ref.norm()
        assert rel < 1e-4, f"prompt {row}: relative error {rel:.2e}"


def test_chat_template_answer(engine):
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    request = engine.request_from_ids(ids, SamplingParams(max_tokens=16, temperature=0.0), None, None)
    engine.add(request)
    out = run_to_completion(engine)[request.request_id]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason.value == "stop"
