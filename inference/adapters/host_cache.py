"""The host-RAM tier: an LRU cache of parsed adapter weights under a byte budget.

On CUDA the tensors are pinned so that paging them into the device pool is an asynchronous DMA.
Thread-safe: the fetcher thread inserts, the engine thread reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from inference.adapters.peft_checkpoint import LoraAdapterWeights


@dataclass
class TierStats:
    """Counters of one tier since start."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds_sum: float = 0.0


class HostAdapterCache:
    """``uid -> LoraAdapterWeights`` with least-recently-used eviction beyond ``budget_bytes``.

    An entry larger than the whole budget is still admitted (alone), so any registered adapter
    can be served; it is the first to go when the next one arrives.
    """

    def __init__(self, budget_bytes: int, pin_memory: bool = False):
        if budget_bytes < 1:
            raise ValueError("the host adapter cache budget must be positive")
        self.budget_bytes = budget_bytes
        self.pin_memory = pin_memory
        self._entries: OrderedDict[str, tuple[LoraAdapterWeights, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = TierStats()

    @staticmethod
    def entry_bytes(weights: LoraAdapterWeights) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b_t.numel() * m.b_t.element_size() for m in weights.modules.values())

    def get(self, uid: str) -> LoraAdapterWeights | None:
        """The weights if cached (marks them recently used and counts a hit). Misses are counted
        by the caller that starts the fetch, once per fetch."""
        with self._lock:
            entry = self._entries.get(uid)
            if entry is None:
                return None
            self._entries.move_to_end(uid)
            self.stats.hits += 1
            return entry[0]

    def contains(self, uid: str) -> bool:
        with self._lock:
            return uid in self._entries

    def put(self, uid: str, weights: LoraAdapterWeights, load_seconds: float = 0.0) -> None:
        if self.pin_memory:
            weights = _pinned(weights)
        size = self.entry_bytes(weights)
        with self._lock:
            if uid in self._entries:
                self._bytes -= self._entries.pop(uid)[1]
            self._entries[uid] = (weights, size)
            self._bytes += size
            self.stats.loads += 1
            self.stats.load_seconds_sum += load_seconds
            while self._bytes > self.budget_bytes and len(self._entries) > 1:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.stats.evictions += 1

    def discard(self, uid: str) -> None:
        with self._lock:
            entry = self._entries.pop(uid, None)
            if entry is not None:
                self._bytes -= entry[1]

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


def _pinned(weights: LoraAdapterWeights) -> LoraAdapterWeights:
    from dataclasses import replace

    modules = {
        name: replace(m, a=m.a.pin_memory(), b_t=m.b_t.pin_memory()) for name, m in weights.modules.items()
    }
    return replace(weights, modules=modules)
