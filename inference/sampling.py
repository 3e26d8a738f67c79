"""Sampling parameters (validated at construction) and the batched sampler.

The sampler turns fp32 logits [S, vocab] into one token per row. First the rows that ask for it
are adjusted (:func:`apply_logit_adjustments`, vectorised over those rows): ``logit_bias`` is
added, then the repetition penalty (prompt and output tokens), then the frequency and presence
penalties (output tokens), then a constrained row's grammar mask (``structured``: every token the
row's :class:`~inference.structured.grammar.GrammarMatcher` does not allow gets -inf), so
constrained and free rows share one batch. Greedy rows then take the argmax. Other rows apply temperature, top-k
and top-p, then draw with the "exponential race" (``argmax(p / Exp(1))``), which is an exact
categorical draw. A row with a ``seed`` draws its noise from its own ``torch.Generator``, whose
state advances once per generated token, so the same seed gives the same text whatever else is in
the batch and even across preemption.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from inference.structured import StructuredOutput
from inference.structured.grammar import GrammarMatcher, unpack_bitmask  # llguidance itself loads lazily

MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100] (OpenAI's range)
MAX_LOGIT_BIAS_TOKENS = 1024


class TokenHistory(Protocol):
    """What the penalties read of a request: its prompt and the tokens generated so far
    (``inference.request.Request`` is one)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    grammar: GrammarMatcher | None  # a constrained request's matcher (read only for such rows)


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
    * ``presence_penalty`` / ``frequency_penalty`` (each in [-2, 2], 0 = off): subtracted from the
      logit of every token already generated, once (presence) or once per occurrence (frequency),
      as OpenAI defines them; the prompt does not count.
    * ``repetition_penalty`` (in (0, 10], 1 = off): the logit of every token seen in the prompt or
      the output is divided by it when positive, multiplied by it otherwise (CTRL, as in HF and
      vLLM): > 1 discourages repeats.
    * ``logit_bias``: ``{token_id: bias}`` (bias in [-100, 100], at most 1024 tokens) added to the
      logits; token ids are checked against the vocabulary by the engine.
    * ``structured``: the output must be JSON (``inference.structured.StructuredOutput``); the
      engine compiles it and gives the request a grammar matcher whose mask the sampler applies.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        object.__setattr__(self, "logit_bias", tuple(tuple(p) if isinstance(p, (tuple, list)) else (p,) for p in pairs))
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                out.append(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            out.append(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}], "
                       f"got {self.repetition_penalty!r}")
        out.extend(_logit_bias_problems(self.logit_bias))
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                out.append("structured must be a StructuredOutput or None")
            else:
                out.extend(self.structured.problems())
                if self.ignore_eos:
                    out.append("a structured output ends where its JSON ends: ignore_eos cannot be set with it")
        return out

    def vocab_problems(self, vocab_size: int) -> list[str]:
        """Constraints that need the model's vocabulary size: ``logit_bias`` token ids."""
        bad = sorted(t for t, _ in self.logit_bias if t >= vocab_size)
        return [f"logit_bias token ids must be below the vocabulary size {vocab_size}, got {bad[:5]}"] if bad else []

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether :func:`apply_logit_adjustments` changes this row (a bias, a penalty or a grammar)."""
        return self.structured is not None or bool(self.logit_bias) or self.presence_penalty != 0.0 \
            or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _logit_bias_problems(pairs: tuple) -> list[str]:
    out = []
    if len(pairs) > MAX_LOGIT_BIAS_TOKENS:
        out.append(f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(pairs)}")
    if any(len(p) != 2 for p in pairs):
        return [*out, "logit_bias must map token ids to numbers"]
    if any(not _is_int(t) or t < 0 for t, _ in pairs):
        out.append("logit_bias keys must be non-negative integer token ids")
    elif len({t for t, _ in pairs}) != len(pairs):
        out.append("logit_bias names a token id twice")
    if any(not _is_number(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for _, b in pairs):
        out.append(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
    return out


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
    histories: Sequence[TokenHistory] | None = None,
) -> SampleResult:
    """Draw one token per row of ``logits`` [S, vocab] (fp32) under each row's ``params``.

    ``generators[i]`` is the row's own generator (seeded requests) or None (global RNG);
    ``histories[i]`` the row's prompt and output so far, needed when a row sets a penalty.
    Logprobs are of the model's distribution before logit bias, penalties, temperature and
    truncation (the "raw" logprobs, as vLLM reports them).
    """
    rows = logits.shape[0]
    adjusted = apply_logit_adjustments(logits, params, histories)
    chosen = torch.empty(rows, dtype=torch.long, device=logits.device)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if greedy_rows:
        idx = torch.tensor(greedy_rows, device=logits.device)
        chosen[idx] = adjusted[idx].argmax(dim=-1)
    if random_rows:
        idx = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(adjusted[idx], [params[i] for i in random_rows])
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


def apply_logit_adjustments(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory] | None,
) -> torch.Tensor:
    """``logits`` [S, vocab] with each row's logit bias and penalties applied; the input is
    returned unchanged when no row sets any (else a copy: the raw logits stay for logprobs).

    Only the R rows that set something are gathered [R, vocab]; the biases of all of them are
    added by one ``index_put_``. Of those, the P rows with a penalty get their output-token
    counts [P, vocab] and their seen-in-prompt mask [P, vocab] from the flattened histories, and
    every penalty is then one elementwise tensor operation over [P, vocab] with the per-row values
    as [P, 1] columns. The C constrained rows fill one int32 bitmask [C, ceil(vocab/32)] from
    their matchers (``histories[i].grammar``), unpacked to [C, vocab] and applied by one
    ``masked_fill``. Rows that set nothing are not touched (bit-for-bit the model's logits),
    whatever the rest of the batch asks for.
    """
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    penalised = [i for i in rows if params[i].repetition_penalty != 1.0 or params[i].presence_penalty != 0.0
                 or params[i].frequency_penalty != 0.0]
    if penalised and histories is None:
        raise ValueError("penalties need the token histories of the rows")
    device, vocab = logits.device, logits.shape[-1]
    idx = torch.tensor(rows, device=device)
    sub = logits[idx]  # [R, vocab], a copy
    bias_rows, bias_ids, bias_values = [], [], []
    for j, i in enumerate(rows):
        for token_id, value in params[i].logit_bias:
            bias_rows.append(j)
            bias_ids.append(token_id)
            bias_values.append(value)
    if bias_rows:
        where = (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device))
        sub.index_put_(where, torch.tensor(bias_values, device=device, dtype=sub.dtype), accumulate=True)
    if penalised:
        is_penalised = set(penalised)
        chosen = [j for j, i in enumerate(rows) if i in is_penalised]  # the penalised rows' places in ``sub``
        assert histories is not None
        counts = _token_counts([histories[i].output_token_ids for i in penalised], vocab, device, sub.dtype)
        in_prompt = _token_counts([histories[i].prompt_token_ids for i in penalised], vocab, device, sub.dtype) > 0
        rep = torch.tensor([params[i].repetition_penalty for i in penalised], device=device, dtype=sub.dtype)[:, None]
        freq = torch.tensor([params[i].frequency_penalty for i in penalised], device=device, dtype=sub.dtype)[:, None]
        pres = torch.tensor([params[i].presence_penalty for i in penalised], device=device, dtype=sub.dtype)[:, None]
        pos = torch.tensor(chosen, device=device)
        part = sub[pos]  # [P, vocab]
        seen = in_prompt | (counts > 0)
        part = torch.where(seen, torch.where(part > 0, part / rep, part * rep), part)
        part = part - freq * counts - pres * (counts > 0).to(sub.dtype)
        sub[pos] = part
    constrained = [j for j, i in enumerate(rows) if params[i].structured is not None]
    if constrained:
        if histories is None:
            raise ValueError("structured outputs need the rows' grammar matchers")
        at = torch.tensor(constrained, device=device)
        sub[at] = _grammar_masked(sub[at], [histories[rows[j]] for j in constrained])
    out = logits.clone()
    out[idx] = sub
    return out


def _grammar_masked(part: torch.Tensor, histories: list[TokenHistory]) -> torch.Tensor:
    """``part`` [C, vocab] with every token a row's grammar does not allow set to -inf."""
    vocab = part.shape[-1]
    bitmask = torch.zeros(len(histories), (vocab + 31) // 32, dtype=torch.int32)
    for row, history in enumerate(histories):
        matcher = history.grammar
        if matcher is None:
            raise ValueError("a constrained row has no grammar matcher")
        matcher.sync(len(history.output_token_ids))
        matcher.fill_mask(bitmask, row)
    allowed = unpack_bitmask(bitmask.to(part.device), vocab)
    return part.masked_fill(~allowed, float("-inf"))


def _token_counts(histories: list[list[int]], vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """How often each token id occurs in each history: [len(histories), vocab] (one
    ``index_put_`` with accumulation over the flattened histories)."""
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
    flat = torch.tensor([t for h in histories for t in h], dtype=torch.long, device=device)
    row_of = torch.repeat_interleave(torch.arange(len(histories)), lengths).to(device)
    counts = torch.zeros(len(histories), vocab, device=device, dtype=dtype)
    counts.index_put_((row_of, flat), torch.ones(flat.shape[0], device=device, dtype=dtype), accumulate=True)
    return counts


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
