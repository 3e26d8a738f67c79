"""How many tokens one step may compute, so that a step lasts about a target time.

A request that arrives while a step runs waits for that step to end, and its first token then
comes out of the next step, whatever else that step computes: its time to first token is about two
steps long at the batch it joins. On a GPU a decode step costs about the same at 1 and at 128
requests (it reads the weights once), so the batch is free; on a CPU every token costs arithmetic
(SmolLM2-135M on 2 cores: about 45 ms per step plus 6 ms per token), so a step of 128 decodes lasts
0.8 s and a light tenant's first token waits for two of them. A fixed token budget cannot be right
on both. This controller bounds the step in *time*: it watches each step's duration and scales the
budget so that steps last about ``target_s``:

* a step that took longer than the target shrinks the budget to
  ``tokens * sqrt(target / seconds)`` (the square root damps the correction: step time is not
  proportional to tokens, it has a fixed part, and one slow step should not halve the batch);
* a step that used the whole budget (more work was waiting) and was faster than the target grows it
  the same way, at most to ``max_tokens``; a step that did not use the whole budget says nothing
  about a larger one and leaves it alone.

The budget converges to the largest batch whose step takes ``target_s``. Where every step is
shorter than the target (a GPU at these batch sizes), it stays at ``max_tokens`` and nothing
changes. The fair scheduler spends the budget in virtual-token-counter order over running and
waiting requests alike (``inference.scheduler``), so a light tenant's new request is placed at
the next step, in a step that lasts about ``target_s``.

A request alone in the engine (nothing else running or waiting) is not held to the budget: there
is nobody its step would keep waiting, and cutting a long prompt into short steps would only make
it pay the step's fixed cost many times (by the CPU figures above, an 850-token prompt in 16-token
steps would take about 1.5 times as long as in one). Such steps are not observed either. A request that
arrives during one waits for it to end: the price of not splitting a lone prompt.

The budget never goes below ``MIN_STEP_TOKENS`` (16): where even a small step takes longer than the
target (a slower or busier machine: the fixed part of a step alone exceeds it), shrinking further
would only cost throughput (every step pays the fixed part) and split prompts into ever more
chunks, for no gain in latency.

The trade: on a device where batching is not free, a shorter step computes fewer tokens per
second (on the CPU above, 0.15 s steps served 57% of the chats per second that full batches of
128 did: docs/benchmarks.md "Fair shares through HTTP").
"""

from __future__ import annotations

import math

MIN_STEP_TOKENS = 16


class StepTokenBudget:
    """The token budget of the next step: in ``[min_tokens, max_tokens]``; ``target_s`` None
    keeps it at ``max_tokens``."""

    def __init__(self, max_tokens: int, target_s: float | None, min_tokens: int = MIN_STEP_TOKENS):
        if max_tokens < 1 or min_tokens < 1:
            raise ValueError(f"need max_tokens >= 1 and min_tokens >= 1, got {max_tokens}, {min_tokens}")
        min_tokens = min(min_tokens, max_tokens)
        if target_s is not None and not (math.isfinite(target_s) and target_s > 0):
            raise ValueError(f"target_s must be finite and > 0, got {target_s!r}")
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.target_s = target_s
        self.tokens = max_tokens

    def observe(self, num_tokens: int, seconds: float, exhausted: bool) -> None:
        """A step computed ``num_tokens`` tokens in ``seconds``; ``exhausted``: it used the whole
        budget (work was left over)."""
        if self.target_s is None or num_tokens <= 0 or seconds <= 0:
            return
        if seconds <= self.target_s and not exhausted:
            return
        scaled = num_tokens * math.sqrt(self.target_s / seconds)
        if seconds > self.target_s:
            scaled = min(scaled, self.tokens)  # never grow after a slow step
        else:
            # a budget-bound step that was fast: grow by at least one token
            scaled = max(scaled, self.tokens + 1)
        self.tokens = max(self.min_tokens, min(self.max_tokens, int(scaled)))
