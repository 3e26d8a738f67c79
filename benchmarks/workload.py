"""Reusable synthetic workloads for Tailor's benchmarks.

Everything here is deterministic given a seed (a ``numpy.random.Generator`` underneath) and
depends on nothing but numpy, so a workload can be rebuilt exactly for every system under test.

Three independent pieces, composable as S-LoRA's synthetic workload (Sheng et al., 2023, §7.1):

* :func:`make_requests`: ``n`` prompts as token-id lists, with input lengths uniform in
  ``input_len_range`` and requested output lengths uniform in ``output_len_range`` (both ranges
  *inclusive*; S-LoRA's ``randint`` excludes the upper bound). Prompts are random ids drawn from
  the tokenizer's normal (non-special, non-added) vocabulary, or, with ``text``, windows of a
  tokenized text (more natural prompts, same lengths).
* :func:`sample_adapters`: which adapter each request uses. Popularity follows a power law: draw
  ``x ~ rng.power(alpha)`` (density ``alpha * x**(alpha - 1)`` on [0, 1]) and take adapter
  ``floor(x * num_adapters)``. ``alpha < 1`` makes low adapter ids the popular ones (smaller alpha,
  more skew); ``alpha = 1`` is uniform. This is S-LoRA's ``generate_requests`` rule.
* :func:`gamma_arrivals`: arrival times of a gamma renewal process with mean rate ``rate``
  (requests/s) and coefficient of variation ``cv`` of the inter-arrival gaps (shape ``1/cv**2``,
  scale ``cv**2/rate``). ``cv = 1`` is a Poisson process; larger ``cv`` is burstier.

Example (an S-LoRA-style trace, 200 adapters, alpha 1, 2 req/s, cv 1, 60 s)::

    reqs = make_requests(120, seed=0, tokenizer=tok, input_len_range=(8, 512), output_len_range=(8, 512))
    adapters = sample_adapters(len(reqs), num_adapters=200, alpha=1.0, seed=1)
    arrivals = gamma_arrivals(len(reqs), rate=2.0, cv=1.0, seed=2)
    reqs = with_adapters_and_arrivals(reqs, adapters, arrivals)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

DEFAULT_INPUT_LEN_RANGE = (8, 64)
DEFAULT_OUTPUT_LEN_RANGE = (8, 128)


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request.

    * ``index``: position in arrival order (0-based).
    * ``prompt_token_ids``: the prompt (no BOS is added by anyone: it is sent as is).
    * ``output_len``: tokens to generate (systems run with EOS ignored, so exactly this many).
    * ``adapter``: adapter index (see :func:`sample_adapters`), or None for the base model.
    * ``arrival_time``: seconds from the start of the trace (see :func:`gamma_arrivals`), or 0.
    """

    index: int
    prompt_token_ids: list[int]
    output_len: int
    adapter: int | None = None
    arrival_time: float = 0.0

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def _check_range(name: str, bounds: Sequence[int]) -> tuple[int, int]:
    lo, hi = (int(b) for b in bounds)
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {tuple(bounds)}")
    return lo, hi


def _hf_tokenizer(tokenizer: Any) -> Any:
    """Unwrap Tailor's ``inference.tokenizer.Tokenizer`` to the transformers tokenizer inside."""
    return getattr(tokenizer, "_tok", tokenizer)


def normal_token_ids(tokenizer: Any = None, vocab_size: int | None = None) -> np.ndarray:
    """Sorted ids of the ordinary vocabulary: every id below the vocabulary size that is neither a
    special token nor an added token (chat markers, ``<|endoftext|>``, ...).

    ``tokenizer`` is a transformers tokenizer (or Tailor's wrapper). Without one, ``vocab_size``
    alone gives ``range(vocab_size)`` (then nothing is excluded).
    """
    if tokenizer is None:
        if vocab_size is None or vocab_size < 1:
            raise ValueError("give a tokenizer or a positive vocab_size")
        return np.arange(vocab_size, dtype=np.int64)
    tok = _hf_tokenizer(tokenizer)
    size = len(tok) if vocab_size is None else min(len(tok), vocab_size)
    excluded = set(getattr(tok, "all_special_ids", []) or [])
    added = getattr(tok, "get_added_vocab", None)
    if added is not None:
        excluded.update(added().values())
    ids = np.array([i for i in range(size) if i not in excluded], dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the tokenizer has no normal (non-special) tokens")
    return ids


def make_requests(
    n: int,
    seed: int = 0,
    input_len_range: Sequence[int] = DEFAULT_INPUT_LEN_RANGE,
    output_len_range: Sequence[int] = DEFAULT_OUTPUT_LEN_RANGE,
    vocab: int | Sequence[int] | np.ndarray | None = None,
    tokenizer: Any = None,
    text: str | None = None,
) -> list[BenchRequest]:
    """``n`` requests in arrival order with uniform input and output lengths (inclusive ranges).

    Prompt tokens come from, in order of precedence:

    * ``text`` (needs ``tokenizer``): each prompt is a window of the tokenized text starting at a
      random offset (the text is repeated if it is shorter than the longest prompt);
    * ``vocab``: an int (ids ``0..vocab-1``) or an explicit list/array of allowed ids;
    * ``tokenizer``: its normal vocabulary (:func:`normal_token_ids`).

    The lengths are drawn before the prompts, so the same ``seed`` gives the same input and output
    lengths whichever token source is used.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    in_lo, in_hi = _check_range("input_len_range", input_len_range)
    out_lo, out_hi = _check_range("output_len_range", output_len_range)
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(in_lo, in_hi, size=n, endpoint=True)
    output_lens = rng.integers(out_lo, out_hi, size=n, endpoint=True)

    if text is not None:
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        corpus = list(_hf_tokenizer(tokenizer).encode(text, add_special_tokens=False))
        if not corpus:
            raise ValueError("text tokenizes to nothing")
        while len(corpus) < 2 * in_hi:
            corpus = corpus + corpus
        starts = rng.integers(0, len(corpus) - in_hi, size=n, endpoint=True)
        prompts = [corpus[s : s + int(length)] for s, length in zip(starts, input_lens)]
    else:
        if vocab is None:
            if tokenizer is None:
                raise ValueError("give vocab, tokenizer or text")
            pool = normal_token_ids(tokenizer)
        elif isinstance(vocab, (int, np.integer)):
            pool = normal_token_ids(vocab_size=int(vocab))
        else:
            pool = np.asarray(vocab, dtype=np.int64)
            if pool.size == 0:
                raise ValueError("vocab is empty")
        prompts = [[int(t) for t in rng.choice(pool, size=int(length))] for length in input_lens]

    return [
        BenchRequest(index=i, prompt_token_ids=prompts[i], output_len=int(output_lens[i]))
        for i in range(n)
    ]


def sample_adapters(n: int, num_adapters: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Adapter index in ``[0, num_adapters)`` for each of ``n`` requests, power-law popular.

    ``x = rng.power(alpha)``; adapter ``floor(x * num_adapters)`` (S-LoRA's rule). The probability
    of adapter ``i`` is ``((i+1)/N)**alpha - (i/N)**alpha``: with ``alpha < 1`` adapter 0 is the most
    popular; ``alpha = 1`` is uniform; ``alpha > 1`` favours the high ids.
    """
    if num_adapters < 1:
        raise ValueError("num_adapters must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    rng = np.random.default_rng(seed)
    x = rng.power(alpha, size=n)
    return np.minimum((x * num_adapters).astype(np.int64), num_adapters - 1)


def gamma_arrivals(n: int, rate: float, cv: float = 1.0, seed: int = 0, start: float = 0.0) -> np.ndarray:
    """Arrival times (seconds, non-decreasing) of ``n`` requests.

    Inter-arrival gaps are Gamma(shape=1/cv**2, scale=cv**2/rate): mean ``1/rate``, coefficient of
    variation ``cv``. The first request arrives one gap after ``start`` (as in S-LoRA).
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if cv <= 0:
        raise ValueError("cv must be > 0")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(1.0 / (cv * cv), cv * cv / rate, size=n)
    return start + np.cumsum(gaps)


def with_adapters_and_arrivals(
    requests: Sequence[BenchRequest],
    adapters: Sequence[int] | np.ndarray | None = None,
    arrivals: Sequence[float] | np.ndarray | None = None,
) -> list[BenchRequest]:
    """Copies of ``requests`` carrying the given adapter indices and/or arrival times."""
    out = []
    for i, request in enumerate(requests):
        changes: dict[str, Any] = {}
        if adapters is not None:
            changes["adapter"] = int(adapters[i])
        if arrivals is not None:
            changes["arrival_time"] = float(arrivals[i])
        out.append(replace(request, **changes))
    return out


def summarize(requests: Sequence[BenchRequest]) -> dict[str, Any]:
    """Counts and length statistics of a workload (for benchmark reports)."""
    ins = np.array([r.input_len for r in requests] or [0])
    outs = np.array([r.output_len for r in requests] or [0])
    return {
        "requests": len(requests),
        "input_tokens": int(ins.sum()) if requests else 0,
        "output_tokens": int(outs.sum()) if requests else 0,
        "input_len": {"min": int(ins.min()), "mean": float(ins.mean()), "max": int(ins.max())},
        "output_len": {"min": int(outs.min()), "mean": float(outs.mean()), "max": int(outs.max())},
    }
