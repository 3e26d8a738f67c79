"""The host-RAM cache: an LRU of packed adapters under a byte budget.

An entry is the adapter's packed ``[num_layers, padded_elems]`` tensor in the pool's dtype
(``inference.adapters.lora_weights.pack_layers``), pinned on CUDA; the budget counts exactly its
bytes, padding included. Thread-safe: the fetcher threads insert, the engine thread reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class TierStats:
    """Counters of one tier since start."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds_sum: float = 0.0


class HostAdapterCache:
    """``uid -> packed adapter tensor`` with least-recently-used eviction beyond ``budget_bytes``.

    An entry larger than the whole budget is still admitted (alone), so any registered adapter
    can be served; it is the first to go when the next one arrives. An evicted tensor that a
    device copy still reads stays valid: pinned memory copied with ``non_blocking=True`` is not
    reused by torch's caching host allocator before that copy has run.
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 1:
            raise ValueError("the host adapter cache budget must be positive")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = TierStats()

    @staticmethod
    def entry_bytes(packed: torch.Tensor) -> int:
        return packed.numel() * packed.element_size()

    def get(self, uid: str) -> torch.Tensor | None:
        """The packed adapter if cached (marks it recently used and counts a hit). Misses are
        counted by the caller that starts the fetch, once per fetch."""
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

    def put(self, uid: str, packed: torch.Tensor, load_seconds: float = 0.0) -> None:
        size = self.entry_bytes(packed)
        with self._lock:
            if uid in self._entries:
                self._bytes -= self._entries.pop(uid)[1]
            self._entries[uid] = (packed, size)
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
