"""Presence, frequency and repetition penalties and logit bias in the batched sampler: the
vectorised code against a plain per-row, per-token loop on random inputs; rows that ask for
nothing stay bit-for-bit untouched in a penalised batch; through the engine, with adapters and in a
mixed batch, every sampled token is the argmax of the reference applied to that step's logits and
that step's history."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

import inference.engine as engine_module
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams, apply_logit_adjustments, sample
from support.adapters import synthetic_adapter
from support.engine_helpers import run_to_completion


@dataclass
class History:
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)


def reference(row: torch.Tensor, params: SamplingParams, history: History) -> torch.Tensor:
    """One row, token by token, in float64: bias, then repetition (prompt and output tokens),
    then frequency (per occurrence in the output) and presence (once per output token)."""
    out = row.double().clone()
    for token, bias in params.logit_bias:
        out[token] += bias
    for token in set(history.prompt_token_ids) | set(history.output_token_ids):
        if out[token] > 0:
            out[token] = out[token] / params.repetition_penalty
        else:
            out[token] = out[token] * params.repetition_penalty
    for token in set(history.output_token_ids):
        out[token] -= params.frequency_penalty * history.output_token_ids.count(token)
        out[token] -= params.presence_penalty
    return out


def _random_params(rng: random.Random, vocab: int) -> SamplingParams:
    kind = rng.choice(["none", "presence", "frequency", "repetition", "bias", "all"])
    values: dict = {"temperature": rng.choice([0.0, 0.8])}
    if kind in ("presence", "all"):
        values["presence_penalty"] = rng.uniform(-2, 2)
    if kind in ("frequency", "all"):
        values["frequency_penalty"] = rng.uniform(-2, 2)
    if kind in ("repetition", "all"):
        values["repetition_penalty"] = rng.uniform(0.5, 2.0)
    if kind in ("bias", "all"):
        values["logit_bias"] = {t: rng.uniform(-100, 100) for t in rng.sample(range(vocab), rng.randint(1, 6))}
    return SamplingParams(**values)


def _random_history(rng: random.Random, vocab: int) -> History:
    return History([rng.randrange(vocab) for _ in range(rng.randint(1, 30))],
                   [rng.randrange(vocab) for _ in range(rng.randint(0, 30))])


@pytest.mark.parametrize("trial", range(20))
def test_vectorised_adjustments_match_the_loop(trial):
    rng = random.Random(random.getrandbits(64))
    vocab, rows = rng.choice([7, 50, 300]), rng.randint(1, 12)
    logits = torch.randn(rows, vocab) * 4
    params = [_random_params(rng, vocab) for _ in range(rows)]
    histories = [_random_history(rng, vocab) for _ in range(rows)]
    before = logits.clone()
    adjusted = apply_logit_adjustments(logits, params, histories)
    assert torch.equal(logits, before), "the raw logits (for logprobs) must stay as they were"
    for i in range(rows):
        expected = reference(logits[i], params[i], histories[i])
        torch.testing.assert_close(adjusted[i].double(), expected, rtol=1e-5, atol=1e-4)
        if not params[i].adjusts_logits:
            assert torch.equal(adjusted[i], logits[i]), "a row without penalties must be untouched"


def test_greedy_rows_take_the_argmax_of_the_adjusted_logits():
    rng = random.Random(random.getrandbits(64))
    vocab = 40
    logits = torch.randn(16, vocab) * 3
    params = [SamplingParams(temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.5, presence_penalty=1.0)
              if i % 2 else SamplingParams(temperature=0.0) for i in range(16)]
    histories = [_random_history(rng, vocab) for _ in range(16)]
    result = sample(logits, params, [None] * 16, histories)
    for i in range(16):
        expected = reference(logits[i], params[i], histories[i]).argmax().item()
        assert result.token_ids[i] == expected
        # logprobs stay those of the model's distribution (before the penalties)
    with_logprobs = sample(logits, [SamplingParams(temperature=0.0, logprobs=2, presence_penalty=2.0)] * 16,
                           [None] * 16, histories)
    raw = torch.log_softmax(logits, -1)
    for i in range(16):
        assert with_logprobs.logprobs[i] == pytest.approx(raw[i, with_logprobs.token_ids[i]].item(), abs=1e-5)


def test_a_strong_bias_forces_a_token_and_sampled_rows_follow_the_adjusted_distribution():
    vocab = 30
    logits = torch.randn(4, vocab)
    params = [SamplingParams(temperature=1.0, logit_bias={7: 100.0}), SamplingParams(temperature=0.0, logit_bias={3: 100.0}),
              SamplingParams(temperature=1.0, logit_bias={t: -100.0 for t in range(vocab) if t != 5}),
              SamplingParams(temperature=0.0)]
    for _ in range(20):
        out = sample(logits, params, [None] * 4, [History([1])] * 4).token_ids
        assert out[:3] == [7, 3, 5] and out[3] == logits[3].argmax().item()
    # a sampled row under a penalty draws from softmax(reference) (frequency penalty 2 on a repeated token)
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    history = History([0], [0, 0, 1])
    params = SamplingParams(temperature=1.0, frequency_penalty=0.5, repetition_penalty=1.5)
    n = 40000
    tokens = torch.tensor(sample(row.expand(n, -1).contiguous(), [params] * n, [None] * n, [history] * n).token_ids)
    expected = torch.softmax(reference(row, params, history), -1)
    assert (torch.bincount(tokens, minlength=4).double() / n - expected).abs().max() < 0.015


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                                 dict(repetition_penalty=0.0), dict(repetition_penalty=11.0),
                                 dict(logit_bias={-1: 1.0}), dict(logit_bias={3: 101.0}), dict(logit_bias={"3": 1.0}),
                                 dict(presence_penalty=True)])
def test_invalid_values_are_refused_naming_the_field(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_the_engine_refuses_a_bias_outside_the_vocabulary(tiny_checkpoint):
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=8 << 20))
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias token ids must be below the vocabulary size"):
        engine.make_request([1, 2, 3], SamplingParams(logit_bias={vocab: 5.0}))


def test_engine_steps_apply_each_requests_penalties_with_adapters_in_a_mixed_batch(tmp_path, tiny_checkpoint,
                                                                                     monkeypatch):
    """Every step's sampled token of every request is the argmax of the loop reference applied to
    that step's raw logits with the request's own prompt and output so far: penalised and plain
    requests, with and without adapters (two ranks), in one batch, with chunked prefill."""
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, pool_bytes=16 << 20, max_num_batched_tokens=48))
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2)):
        path = synthetic_adapter(tmp_path / name, engine.model_config, r=rank, targets=["q_proj", "v_proj"],
                                 alpha=16, seed=seed, std=0.2)
        engine.adapters.register_dir(name, path)
    seen: list[tuple[torch.Tensor, list[SamplingParams], list[History], list[int]]] = []
    real_sample = engine_module.sample

    def recording_sample(logits, params, generators, histories=None):
        result = real_sample(logits, params, generators, histories)
        snapshot = [History(list(h.prompt_token_ids), list(h.output_token_ids)) for h in histories]
        seen.append((logits.clone(), list(params), snapshot, list(result.token_ids)))
        return result

    monkeypatch.setattr(engine_module, "sample", recording_sample)
    rng = random.Random(random.getrandbits(64))
    settings = [dict(repetition_penalty=2.5), dict(frequency_penalty=2.0, presence_penalty=1.0), {},
                dict(presence_penalty=-1.5, repetition_penalty=0.7), {}, dict(frequency_penalty=1.0)]
    for i, extra in enumerate(settings):
        prompt = [rng.randrange(3, 2000) for _ in range(rng.randint(3, 20))] * 2  # repeated tokens in the prompt
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **extra)
        engine.add(engine.make_request(prompt, params, f"r{i}", [None, "a", "b"][i % 3]))
    finals = run_to_completion(engine)
    assert len(finals) == len(settings) and all(len(o.token_ids) == 12 for o in finals.values())
    checked = penalised = changed = mixed_steps = 0
    for logits, params, histories, chosen in seen:
        mixed_steps += len({p.adjusts_logits for p in params}) == 2
        for i, p in enumerate(params):
            expected = reference(logits[i], p, histories[i])
            assert chosen[i] == int(expected.argmax()), (i, p)
            if not p.adjusts_logits:
                assert chosen[i] == int(logits[i].argmax())
            checked += 1
            penalised += p.adjusts_logits
            changed += chosen[i] != int(logits[i].argmax())
    assert checked == 12 * len(settings) and penalised == 12 * 4
    assert mixed_steps >= 5, "penalised and plain requests must have shared steps"
    assert changed > 0, "the penalties never changed a token: the test shows nothing"
