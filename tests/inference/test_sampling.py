"""Sampling options: greedy, temperature, top-k, top-p, seeds, stop strings and ids, logprobs."""

import math
import random

import pytest
import torch

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams, sample
from support.engine_helpers import prompt_logits, run_to_completion


def _draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    logits = logits_row.expand(n, -1).contiguous()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return torch.tensor(sample(logits, [params] * n, [None] * n).token_ids), gen


def _empirical(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 5, [None] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    logits = torch.randn(8, dtype=torch.float64).float()
    tokens, _ = _draw(logits, SamplingParams(temperature=temperature), 40000, random.randrange(1 << 30))
    expected = torch.softmax(logits.double() / temperature, -1)
    assert (_empirical(tokens, 8) - expected).abs().max() < 0.015


def test_top_k_keeps_only_the_k_best_and_renormalises():
    logits = torch.randn(12)
    tokens, _ = _draw(logits, SamplingParams(temperature=1.0, top_k=3), 30000, random.randrange(1 << 30))
    top3 = set(logits.topk(3).indices.tolist())
    assert set(tokens.tolist()) <= top3
    expected = torch.zeros(12, dtype=torch.float64)
    idx = torch.tensor(sorted(top3))
    expected[idx] = torch.softmax(logits.double()[idx], -1)
    assert (_empirical(tokens, 12) - expected).abs().max() < 0.015


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.randn(10) * 2
    top_p = 0.7
    probs = torch.softmax(logits.double(), -1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    keep = order[: int((cum < top_p).sum()) + 1]  # smallest prefix whose mass reaches top_p
    tokens, _ = _draw(logits, SamplingParams(temperature=1.0, top_p=top_p), 30000, random.randrange(1 << 30))
    assert set(tokens.tolist()) == set(keep.tolist())
    expected = torch.zeros(10, dtype=torch.float64)
    expected[keep] = probs[keep] / probs[keep].sum()
    assert (_empirical(tokens, 10) - expected).abs().max() < 0.015


def test_seeded_rows_are_independent_of_the_batch():
    logits = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits, [params], [torch.Generator().manual_seed(42)]).token_ids[0] for _ in range(1)]
    batch_logits = torch.cat([torch.randn(3, 100), logits])
    gens = [None, None, None, torch.Generator().manual_seed(42)]
    mixed = sample(batch_logits, [SamplingParams(temperature=1.0)] * 3 + [params], gens).token_ids[3]
    assert alone[0] == mixed


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"logprobs": 21}, {"stop": [""]}, {"seed": -1},
])
def test_invalid_params_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as info:
        SamplingParams(max_tokens=0, temperature=-1, top_p=2)
    assert all(word in str(info.value) for word in ("max_tokens", "temperature", "top_p"))


# ----------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=16 << 20))


def _generate(engine, prompt, params):
    request = engine.request_from_ids(prompt, params, None, None)
    engine.add(request)
    return run_to_completion(engine)[request.request_id]


def test_same_seed_same_text_different_seed_differs(engine):
    prompt = [100, 200, 300]
    a = _generate(engine, prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True))
    b = _generate(engine, prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True))
    c = _generate(engine, prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=8, ignore_eos=True))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_seed_survives_batching_and_preemption(tiny_checkpoint, engine):
    prompt = [100, 200, 300]
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=123, ignore_eos=True)
    alone = _generate(engine, prompt, params)
    tight = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=9 * 2048))
    target = tight.request_from_ids(prompt, params, None, None)
    tight.add(target)
    for i in range(4):
        tight.add(tight.request_from_ids([7 + i] * 5, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), None, None))
    final = run_to_completion(tight)
    assert tight.scheduler.num_preemptions > 0
    assert final[target.request_id].token_ids == alone.token_ids


def test_max_tokens_and_length_reason(engine):
    out = _generate(engine, [5, 6], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason.value == "length"


def test_stop_token_ids_end_generation(engine):
    free = _generate(engine, [11, 12, 13], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    out = _generate(engine, [11, 12, 13], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]))
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason.value == "stop"


def test_stop_string_truncates_text(engine):
    free = _generate(engine, [21, 22, 23], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    text = free.text
    assert len(text) > 12
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = _generate(engine, [21, 22, 23], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason.value == "stop"


def test_logprobs_match_log_softmax_of_the_logits(engine):
    prompt = [31, 32, 33, 34]
    logits = prompt_logits(engine, [prompt])[0].double()
    out = _generate(engine, prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=5))
    first = out.logprobs[0]
    ref = torch.log_softmax(logits, -1)
    assert first.token_id == out.token_ids[0]
    assert math.isclose(first.logprob, float(ref[first.token_id]), abs_tol=1e-4)
    top_ids = [t for t, _ in first.top]
    assert top_ids == ref.topk(5).indices.tolist()
    assert len(out.logprobs) == 3


def test_incremental_text_equals_a_full_decode(engine):
    # the random tiny model emits arbitrary byte-level tokens, including partial UTF-8 sequences
    for seed in range(3):
        out = _generate(engine, [40, 41, 42], SamplingParams(max_tokens=150, temperature=1.0, seed=seed, ignore_eos=True))
        assert out.text == engine.tokenizer.decode(out.token_ids)
    free = _generate(engine, [40, 41, 42], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    stop_id = free.token_ids[25]
    out = _generate(engine, [40, 41, 42], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]))
    assert out.token_ids[-1] == stop_id
    assert out.text == engine.tokenizer.decode(out.token_ids[:-1])
