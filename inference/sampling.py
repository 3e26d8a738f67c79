"""Sampling parameters (validated at construction) and the batched sampler.

The sampler turns fp32 logits [S, vocab] into one token per row. Greedy rows take the argmax.
Other rows apply temperature, top-k and top-p, then draw with the "exponential race"
(``argmax(p / Exp(1))``), which is an exact categorical draw. A row with a ``seed`` draws its
noise from its own ``torch.Generator``, whose state advances once per generated token, so the same
seed gives the same text whatever else is in the batch and even across preemption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to generate.

    * ``max_tokens``: tokens to generate (>= 1).
    * ``temperature``: 0 is greedy; otherwise a finite value > 0.
    * ``top_k``: keep the k most likely tokens (0 or -1 = all); ``top_p``: nucleus mass in (0, 1].
    * ``seed``: makes sampling reproducible for this request.
    * ``stop``: strings that end generation (not included in the text);
      ``stop_token_ids``: extra token ids that end generation (the model's EOS ids always do
      unless ``ignore_eos``).
    * ``logprobs``: None, or how many top alternatives (0..20) to return with each token's logprob.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = self.problems()
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every violated constraint, as messages naming the field."""
        out: list[str] = []
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            out.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or not math.isfinite(self.temperature) or self.temperature < 0:
            out.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            out.append(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not (0.0 < self.top_p <= 1.0):
            out.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not (0 <= self.seed < 2**63)):
            out.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            out.append("stop strings must be non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            out.append("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            out.append(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SampleResult:
    """Per row: the token, its logprob, and optional top alternatives [(token_id, logprob)]."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> SampleResult:
    """Draw one token per row of ``logits`` [S, vocab] (fp32) under each row's ``params``.

    ``generators[i]`` is the row's own generator (seeded requests) or None (global RNG).
    Logprobs are of the model's distribution before temperature and truncation, as OpenAI reports.
    """
    rows = logits.shape[0]
    chosen = torch.empty(rows, dtype=torch.long, device=logits.device)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if greedy_rows:
        idx = torch.tensor(greedy_rows, device=logits.device)
        chosen[idx] = logits[idx].argmax(dim=-1)
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[idx], [params[i] for i in random_rows])
        noise = torch.empty_like(probs)
        for j, row in enumerate(random_rows):
            noise[j].exponential_(generator=generators[row])
        chosen[idx] = (probs / noise).argmax(dim=-1)
    token_ids = chosen.tolist()
    want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs: list[float | None] = [None] * rows
    tops: list[list[tuple[int, float]] | None] = [None] * rows
    if want_logprobs:
        idx = torch.tensor(want_logprobs, device=logits.device)
        logp = torch.log_softmax(logits[idx], dim=-1)
        picked = logp.gather(1, chosen[idx][:, None]).squeeze(1).tolist()
        k = max(params[i].logprobs or 0 for i in want_logprobs)
        top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
        for j, row in enumerate(want_logprobs):
            logprobs[row] = picked[j]
            n = params[row].logprobs or 0
            tops[row] = (
                list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist())) if n and top_ids is not None else []
            )
    return SampleResult(token_ids, logprobs, tops)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [R, vocab] after temperature, top-k and top-p (rows vectorised)."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    scaled = logits / temps[:, None]
    vocab = logits.shape[-1]
    top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k_t = torch.tensor(top_ks, device=logits.device)[:, None]
        remove = ranks >= k_t
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        cum_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        p_t = torch.tensor(top_ps, device=logits.device, dtype=logits.dtype)[:, None]
        remove |= cum_before >= p_t  # keep the smallest prefix whose mass reaches top_p
        remove[:, 0] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    return torch.softmax(scaled, dim=-1)
