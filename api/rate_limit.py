"""Per-tenant request rate limit, in this api process or shared by all of them through Redis.

``TenantRateLimiter`` (the embedded default, ``TAILOR_RATE_LIMIT_STORAGE=memory``): a token bucket
per tenant in this process. ``rate_per_minute`` tokens refill continuously up to a burst of the
same size; a request takes one token or is refused with 429 and the seconds until a token is back
(``Retry-After``). With several api processes each would enforce its own share.

``RedisRateLimiter`` (``TAILOR_RATE_LIMIT_STORAGE=redis``): one count per tenant for every api
process, kept in Redis (``TAILOR_REDIS_URL``) by the ``limits`` library's moving window: at most
``rate_per_minute`` requests in any 60 seconds; a refused request waits until the oldest of them
leaves the window. If Redis cannot be reached the request is let through (and a warning logged):
a rate limit must not take the api down with it.

Both have ``acquire(tenant_id) -> None | seconds`` (``make_rate_limiter`` picks one from settings).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 1.0  # a rate-limit check waits this long for Redis, then lets the request through


class RateLimiter(Protocol):
    @property
    def enabled(self) -> bool: ...

    def acquire(self, tenant_id: str) -> int | None:
        """Count one request of ``tenant_id``: None if allowed, else the seconds to wait (>= 1)."""
        ...


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


class RedisRateLimiter:
    """``rate_per_minute`` requests per tenant in any 60 seconds, counted in Redis for every api
    process (``limits``' moving window; module doc). ``namespace`` separates deployments that
    share one Redis."""

    def __init__(self, rate_per_minute: int, redis_url: str, namespace: str = "tailor"):
        from limits import RateLimitItemPerMinute
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        if rate_per_minute < 0:
            raise ValueError("rate_per_minute must be >= 0 (0 disables the limit)")
        self.rate_per_minute = rate_per_minute
        self._item = RateLimitItemPerMinute(max(1, rate_per_minute))
        self._storage = RedisStorage(redis_url, key_prefix=f"{namespace}-rate", wrap_exceptions=True,
                                     socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._warned_at = -math.inf

    @property
    def enabled(self) -> bool:
        return self.rate_per_minute > 0

    def acquire(self, tenant_id: str) -> int | None:
        """Count one request of ``tenant_id`` in Redis: None if allowed (or Redis is unreachable),
        else the seconds until the window has room (>= 1)."""
        from limits.errors import StorageError

        if not self.enabled:
            return None
        try:
            if self._limiter.hit(self._item, "tenant", tenant_id):
                return None
            stats = self._limiter.get_window_stats(self._item, "tenant", tenant_id)
        except StorageError as exc:
            now = time.monotonic()
            if now - self._warned_at > 60:  # one warning a minute, not one per request
                self._warned_at = now
                log.warning("rate limit not enforced: Redis is unreachable (%s)", exc)
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))


def make_rate_limiter(settings) -> RateLimiter:
    """The limiter ``settings`` ask for: in this process (``memory``) or shared in Redis (``redis``)."""
    if settings.rate_limit_storage == "redis":
        return RedisRateLimiter(settings.rate_limit_per_minute, settings.redis_url)
    return TenantRateLimiter(settings.rate_limit_per_minute)
