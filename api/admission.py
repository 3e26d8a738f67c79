"""Per-tenant bound on generations in flight in this api process.

The engine batches every admitted request together (continuous batching, up to its
``max_num_seqs``), first come first served. Without a bound, one tenant's burst of chats fills the
batch and the waiting queue, and every other tenant waits behind it. With at most ``limit``
generations in flight per tenant, a tenant's burst beyond its share is refused at once with 429
and ``Retry-After`` (the client backs off) while the others keep their place in the batch.

With several api processes each enforces its own bound (like the rate limit). 0 disables it.
"""

from __future__ import annotations

import threading

RETRY_AFTER_S = 1


class TenantConcurrencyLimit:
    """Counts the generations each tenant has in flight."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError("limit must be >= 0 (0 disables the bound)")
        self.limit = limit
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_acquire(self, tenant_id: str) -> bool:
        """Take a slot for ``tenant_id``; False when it already has ``limit`` in flight."""
        with self._lock:
            count = self._in_flight.get(tenant_id, 0)
            if self.limit and count >= self.limit:
                return False
            self._in_flight[tenant_id] = count + 1
            return True

    def release(self, tenant_id: str) -> None:
        """Give back a slot taken by ``try_acquire``."""
        with self._lock:
            count = self._in_flight.get(tenant_id, 0) - 1
            if count > 0:
                self._in_flight[tenant_id] = count
            else:
                self._in_flight.pop(tenant_id, None)
