"""fp16 and bf16 engines against the fp32 engine on the CPU (issue 17).

Each test draws fresh random prompts from the suite's per-test seed (``TAILOR_TEST_SEED`` replays
one), runs them as one continuous batch through a float32 engine and through float16 and bfloat16
engines, and compares the full-vocabulary logits of the prefill position and of the decode steps
that follow, and the greedy tokens.

Logits are read off the engine by wrapping ``inference.engine.sample`` (which receives the fp32
logits [rows, vocab] of every step); the same wrapper can also *force* the token appended for a
request (teacher forcing), so that a half-precision engine's decode logits are for exactly the
contexts the fp32 engine saw, whatever its own argmax was.

Tolerances. Half precision rounds every weight and every activation it stores to a relative error
of at most eps/2 (eps = 2**-10 for fp16, 2**-7 for bf16); the norms, RoPE tables and the attention
softmax run in fp32. A logit is reached through ~10 rounded stages per layer; independent rounding
errors add in quadrature, so a logit's error is a few eps of the logits' spread (their std over the
vocabulary), growing roughly with the square root of the depth, and the largest over the 49152 vocab
entries is ~4-5x the typical one. We therefore bound, per row, relative to the fp32 logits' std:

* the RMS error over the vocabulary (the typical logit's error), and
* the max-abs error (the worst logit),

at multiples of eps, 2-3x the largest values measured over many seeds (numbers below). A norm
that stops normalising in half precision gives errors of ~1 std (~1000 eps for fp16) on the tiny
model, and an RMSNorm variance computed in fp16 overflows on the real model's large activations
(all logits garbage); both fail here. Attention computed in half instead of fp32 stays within
rounding level and is not caught (nor meant to be: it is an accuracy, not a correctness, change). A row's argmax must agree with
fp32 wherever fp32's top-1 margin exceeds twice the max-error bound (then no perturbation within
the bound can flip it): a random-weights model has near-tied logits, so agreement is only demanded
where it is implied. The real bundled model's greedy text must agree with fp32's on most tokens.
"""

from __future__ import annotations

import json
import random
from unittest import mock

import pytest
import torch

import inference.engine as engine_module
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams
from support.adapters import synthetic_adapter
from support.engine_helpers import run_to_completion

EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def _record(engine: LLMEngine, prompts, new_tokens: int, *, adapters=None, forced=None):
    """Greedy-generate ``new_tokens`` per prompt in one continuous batch; return (tokens [P, n],
    logits [P, n, vocab] fp32). ``forced[p]``: append these tokens instead of the engine's argmax."""
    index: dict[int, int] = {}
    captured: list[list[torch.Tensor]] = [[] for _ in prompts]
    original = engine_module.sample

    def recording_sample(logits, params, generators, histories=None):
        result = original(logits, params, generators, histories)
        for row, sp in enumerate(params):
            i = index[id(sp)]
            if forced is not None:
                result.token_ids[row] = int(forced[i][len(captured[i])])
            captured[i].append(logits[row].clone())
        return result

    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        index[id(params)] = i  # a distinct object per request: its identity names the row
        request = engine.request_from_ids(prompt, params, None, adapters[i] if adapters else None)
        engine.add(request)
        requests.append(request)
    with mock.patch.object(engine_module, "sample", recording_sample):
        final = run_to_completion(engine, timeout_s=120)
    tokens = torch.tensor([final[r.request_id].token_ids for r in requests])
    assert all(len(c) == new_tokens for c in captured), "a request sampled more or fewer times than expected"
    return tokens, torch.stack([torch.stack(c) for c in captured])


def _errors(ref: torch.Tensor, got: torch.Tensor):
    """Per row [..., vocab]: (RMS error, max-abs error, fp32 top-1 margin), each / fp32 logits' std."""
    std = ref.std(dim=-1)
    diff = (got - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    return diff.pow(2).mean(-1).sqrt() / std, diff.amax(-1) / std, (top2[..., 0] - top2[..., 1]) / std


def _random_prompts(count: int, low: int = 4, high: int = 16, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(random.getrandbits(64))
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


# --------------------------------------------------------------- tiny random model, mixed adapters
TINY_PROMPTS = 24
TINY_NEW_TOKENS = 6
# Measured on the 2-layer tiny model (24-32 prompts x 6-8 steps, several seeds): RMS error / std
# up to ~3 eps, max-abs error / std up to ~14 eps, for both dtypes.
TINY_RMS_BOUND = 8.0  # x eps
TINY_MAX_BOUND = 32.0  # x eps


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory, tiny_checkpoint):
    from inference.model_config import ModelConfig

    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    root = tmp_path_factory.mktemp("half-adapters")
    return {
        "r4-attn": synthetic_adapter(root / "r4-attn", config, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                                     alpha=8, seed=1, std=0.1),
        "r8-all": synthetic_adapter(root / "r8-all", config, r=8, targets=("q_proj", "v_proj", "gate_proj",
                                    "up_proj", "down_proj"), alpha=16, seed=2, std=0.1),
    }


def _tiny_engine(checkpoint, dtype: str, adapters: dict) -> LLMEngine:
    engine = LLMEngine(checkpoint, EngineConfig(dtype=dtype, page_tokens=4, cpu_pool_bytes=32 << 20))
    for name, path in adapters.items():
        engine.adapters.register_dir(name, path)
    return engine


def test_tiny_model_half_logits_track_fp32_in_a_mixed_adapter_batch(tiny_checkpoint, tiny_adapters):
    prompts = _random_prompts(TINY_PROMPTS)
    names = [None, *tiny_adapters]
    adapters = [names[i % len(names)] for i in range(len(prompts))]
    ref_tokens, ref_logits = _record(_tiny_engine(tiny_checkpoint, "float32", tiny_adapters), prompts,
                                     TINY_NEW_TOKENS, adapters=adapters)
    # the adapters matter: the same prompts without them give other logits
    _, base_logits = _record(_tiny_engine(tiny_checkpoint, "float32", {}), prompts[:3], 1)
    assert _errors(ref_logits[:3, 0], base_logits[:, 0])[0][1:].min() > 0.05
    for dtype, eps in EPS.items():
        engine = _tiny_engine(tiny_checkpoint, dtype, tiny_adapters)
        assert engine.pool.tensor.dtype == getattr(torch, dtype)
        _, logits = _record(engine, prompts, TINY_NEW_TOKENS, adapters=adapters, forced=ref_tokens)
        assert torch.isfinite(logits).all()
        rms, worst, margin = _errors(ref_logits, logits)
        print(f"{dtype}: RMS error/std max {rms.max() / eps:.2f} eps, max-abs error/std max "
              f"{worst.max() / eps:.2f} eps (prefill {worst[:, 0].max() / eps:.2f} eps)")
        for name in names:  # per adapter, so a half-precision LoRA bug is named
            rows = [i for i, a in enumerate(adapters) if a == name]
            assert rms[rows].max() <= TINY_RMS_BOUND * eps, (dtype, name, "RMS", rms[rows].max() / eps)
            assert worst[rows].max() <= TINY_MAX_BOUND * eps, (dtype, name, "max", worst[rows].max() / eps)
        clear = margin > 2 * TINY_MAX_BOUND * eps
        agree = logits.argmax(-1) == ref_logits.argmax(-1)
        print(f"{dtype}: top-1 agreement {agree.float().mean():.3f}, {int(clear.sum())} clear-margin rows")
        assert clear.float().mean() > 0.3  # the check below covers a good share of the rows
        assert agree[clear].all()
        assert agree.float().mean() >= 0.95


# --------------------------------------------------------------- the real bundled model
BUNDLED_PROMPTS = 8
BUNDLED_NEW_TOKENS = 6
# Measured on SmolLM2-135M (30 layers; 8 prompts x 6-8 steps, ~8 seeds): RMS error / std up to
# ~45 eps (fp16) and ~50 eps (bf16), max-abs error / std up to ~96 eps (fp16) and ~174 eps (bf16):
# in absolute terms up to 0.05 and 0.4 of the std, then 0.1 and 1.4 (bf16 has 3 fewer mantissa
# bits). The deeper model accumulates more rounding than the tiny one (square root of the depth).
# Those bounds hold for 90% of the compared steps. The tail is heavier: over 17 more seeds
# (2026-12-04) two had one bf16 step each at 228 and 354 eps RMS (max-abs 495 and 657 eps), and
# transformers' own bf16 model has the same tail on those prompts (270 eps at one step of the
# second), so it is bf16's, not the engine's; the tail bounds keep every step within a few stds.
BUNDLED_RMS_BOUND = {"float16": 128.0, "bfloat16": 128.0}  # x eps, 90% of the steps
BUNDLED_MAX_BOUND = {"float16": 256.0, "bfloat16": 384.0}  # x eps, 90% of the steps
BUNDLED_RMS_TAIL = {"float16": 256.0, "bfloat16": 512.0}  # x eps, every step
BUNDLED_MAX_TAIL = {"float16": 512.0, "bfloat16": 1024.0}  # x eps, every step
# Greedy: at a step whose context equals fp32's (every earlier token agreed), the half engine's
# token is fp32's; measured 0.90-1.0 for bf16, 0.95-1.0 for fp16 (a flip happens where fp32's top two
# are near-tied; each of the 8 prompts can flip at most once, later steps are not compared).
BUNDLED_MIN_AGREEMENT = 0.8


def _word_prompts(tokenizer_vocab: dict[str, int], count: int) -> list[list[int]]:
    """Random sequences of whole-word tokens (``Ġword``): text-like prompts, so the model is confident."""
    rng = random.Random(random.getrandbits(64))
    words = sorted(i for t, i in tokenizer_vocab.items() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
    return [[rng.choice(words) for _ in range(rng.randint(4, 10))] for _ in range(count)]


def test_bundled_model_half_greedy_agrees_with_fp32(bundled_checkpoint):
    engines = {d: LLMEngine(bundled_checkpoint, EngineConfig(dtype=d, cpu_pool_bytes=48 << 20))
               for d in ("float32", *EPS)}
    vocab = json.loads((bundled_checkpoint / "tokenizer.json").read_text())["model"]["vocab"]
    prompts = _word_prompts(vocab, BUNDLED_PROMPTS)
    ref_tokens, ref_logits = _record(engines["float32"], prompts, BUNDLED_NEW_TOKENS)
    for dtype, eps in EPS.items():
        tokens, logits = _record(engines[dtype], prompts, BUNDLED_NEW_TOKENS)
        assert torch.isfinite(logits).all()
        # Free-running: compare logits only at steps whose context is fp32's (all tokens so far agree).
        same = tokens == ref_tokens
        same_context = torch.cat([torch.ones(len(prompts), 1, dtype=torch.bool),
                                  same[:, :-1].cumprod(dim=1).bool()], dim=1)
        rms, worst, margin = _errors(ref_logits[same_context], logits[same_context])
        agree = logits[same_context].argmax(-1) == ref_logits[same_context].argmax(-1)
        agreement = agree.float().mean().item()
        print(f"{dtype}: greedy agreement {agreement:.3f} over {int(same_context.sum())} same-context steps "
              f"(free-running positionwise {same.float().mean():.3f}); RMS error/std max "
              f"{rms.max() / eps:.2f} eps, max-abs error/std max {worst.max() / eps:.2f} eps")
        assert same_context.float().mean() >= 0.5, (dtype, tokens.tolist(), ref_tokens.tolist())
        assert agreement >= BUNDLED_MIN_AGREEMENT, (dtype, tokens.tolist(), ref_tokens.tolist())
        assert agree[margin > 2 * BUNDLED_MAX_BOUND[dtype] * eps].all()
        assert rms.quantile(0.9) <= BUNDLED_RMS_BOUND[dtype] * eps, (dtype, "RMS", rms / eps)
        assert worst.quantile(0.9) <= BUNDLED_MAX_BOUND[dtype] * eps, (dtype, "max", worst / eps)
        assert rms.max() <= BUNDLED_RMS_TAIL[dtype] * eps, (dtype, "RMS", rms.max() / eps)
        assert worst.max() <= BUNDLED_MAX_TAIL[dtype] * eps, (dtype, "max", worst.max() / eps)
