"""First-token SLOs: S-LoRA's early abort, and attainment counted per tenant.

A request may carry ``ttft_slo_s``: its first token is due that many seconds after it arrived
(``Request.ttft_deadline``). Before every step the engine asks :meth:`FirstTokenDeadlines.late`
which *waiting* requests without a token can no longer meet their deadline, and refuses them at once
(``FinishReason.DEADLINE``; the HTTP layers answer 503 with ``Retry-After``) instead of serving them
late: the capacity goes to requests that can still meet theirs (S-LoRA's early-abort policy).

"Can no longer meet" is deliberately conservative: ``now`` plus the time the request's own remaining
prompt takes to prefill at the engine's recent prefill rate is past the deadline. The time it would
still wait behind others is not predicted (under fair scheduling it depends on arrivals that have not
happened yet), so a refused request could not have made it even if it had been admitted next.
Running requests are never refused: once admitted a request is served, on time or late.

Counted per tenant: *attained* (first token at or before the deadline), *missed* (after it, or
refused) and *early aborts* (refused; a part of missed). Requests without an SLO are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from inference.request import Request

MIN_PREFILL_STEP_TOKENS = 64  # steps with fewer new tokens are decode-bound and say little about prefill


def check_ttft_slo(ttft_slo_s) -> list[str]:
    """Problems with a request's ``ttft_slo_s`` (None, or finite seconds > 0), as messages."""
    if ttft_slo_s is None:
        return []
    if isinstance(ttft_slo_s, bool) or not isinstance(ttft_slo_s, (int, float)):
        return [f"ttft_slo_s must be a number of seconds, got {type(ttft_slo_s).__name__}"]
    if not math.isfinite(ttft_slo_s) or ttft_slo_s <= 0:
        return [f"ttft_slo_s must be finite and > 0, got {ttft_slo_s!r}"]
    return []


@dataclass
class SloCounts:
    """One tenant's first-token SLO outcomes since start."""

    attained: int = 0
    missed: int = 0
    early_aborts: int = 0


class FirstTokenDeadlines:
    """The engine's prefill-rate estimate, the early-abort test and the per-tenant counts.

    Engine thread only; metrics read ``by_tenant`` (plain int reads).
    """

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.prefill_tokens_per_s: float | None = None  # exponentially weighted, from prefill-heavy steps
        self.by_tenant: dict[str | None, SloCounts] = {}

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Feed one step: ``num_tokens`` new tokens computed in ``seconds`` of wall time."""
        if num_tokens < MIN_PREFILL_STEP_TOKENS or seconds <= 0:
            return
        rate = num_tokens / seconds
        previous = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = rate if previous is None else previous + self.smoothing * (rate - previous)

    def prefill_seconds(self, num_tokens: int) -> float:
        """Estimated seconds to prefill ``num_tokens`` tokens (0 until a rate was measured)."""
        rate = self.prefill_tokens_per_s
        return 0.0 if rate is None else num_tokens / rate

    def late(self, waiting: Iterable[Request], now: float) -> list[Request]:
        """The waiting requests without a token that can no longer meet their deadline."""
        late = []
        for request in waiting:
            deadline = request.ttft_deadline
            if deadline is None or request.output_token_ids:
                continue
            if now + self.prefill_seconds(request.num_tokens - request.num_computed_tokens) > deadline:
                late.append(request)
        return late

    def retry_after(self, pending_tokens: int) -> float:
        """Seconds after which a retry may be served: the time to prefill ``pending_tokens`` (the
        queue ahead), whole seconds, at least 1."""
        return float(max(1, math.ceil(self.prefill_seconds(pending_tokens))))

    def counts(self, tenant: str | None) -> SloCounts:
        counts = self.by_tenant.get(tenant)
        if counts is None:
            counts = self.by_tenant[tenant] = SloCounts()
        return counts

    def on_first_token(self, request: Request, now: float) -> None:
        """Count the request's first token against its deadline (no-op without an SLO)."""
        deadline = request.ttft_deadline
        if deadline is None:
            return
        counts = self.counts(request.tenant)
        if now <= deadline:
            counts.attained += 1
        else:
            counts.missed += 1

    def on_refused(self, request: Request) -> None:
        counts = self.counts(request.tenant)
        counts.missed += 1
        counts.early_aborts += 1
