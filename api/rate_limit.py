"""Per-tenant request rate limit: a token bucket per tenant in this api process.

``rate_per_minute`` tokens refill continuously up to a burst of the same size; a request takes one
token or is refused with 429 and the seconds until a token is back (``Retry-After``). With several
api replicas each enforces its own share (the limit is per process).
"""

from __future__ import annotations

import math
import threading
import time


class TenantRateLimiter:
    def __init__(self, rate_per_minute: int, clock=time.monotonic):
        if rate_per_minute < 0:
            raise ValueError("rate_per_minute must be >= 0 (0 disables the limit)")
        self.rate_per_s = rate_per_minute / 60.0
        self.burst = float(rate_per_minute)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill time)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def acquire(self, tenant_id: str) -> int | None:
        """Take a token for ``tenant_id``: None if allowed, else the seconds to wait (>= 1)."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(tenant_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[tenant_id] = (tokens - 1.0, now)
                return None
            self._buckets[tenant_id] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate_per_s))
