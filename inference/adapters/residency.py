"""The device tier: adapters resident in pages of the unified pool (engine thread only).

A page-in copies an adapter's packed host form (``[num_layers, pages * page_elems]``, built once
when it entered host RAM) into freshly allocated pages of every layer at once. On CUDA it runs on
a side stream: one asynchronous host-to-device copy from pinned memory, then one ``index_copy_``
into the pool, and an event the step that first uses the adapter waits on. Eviction frees the
least recently used adapter that no running request uses, preferring those that no queued
request needs either; a running request's adapter is never evicted.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from inference.adapters.host_cache import TierStats
from inference.adapters.lora_weights import layer_offsets
from inference.adapters.registry import AdapterRef
from inference.device import PageCopier, synchronize
from inference.page_pool import PageKind, PagePool


@dataclass
class DeviceAdapter:
    """An adapter resident in pool pages. ``offsets[module] = (a_offset, b_offset, rank)`` in
    elements of the per-layer virtual buffer."""

    ref: AdapterRef
    pages: list[int]
    offsets: dict[str, tuple[int, int, int]]
    shapes: dict[str, tuple[int, int]]
    running: int = 0
    last_used: float = field(default_factory=time.monotonic)
    ready_event: object | None = None

    @functools.cached_property
    def layout(self) -> tuple:
        """Adapters with equal layouts have the same page count and module offsets and ranks (the
        CPU LoRA path computes such adapters together). Pages and offsets never change once paged in."""
        return len(self.pages), tuple(sorted(self.offsets.items()))


def module_layout(ref: AdapterRef, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int, int]]:
    """Offsets of each module's A [r, in] and Bt [r, out] in the per-layer virtual buffer."""
    return layer_offsets(dict(ref.module_ranks), shapes)


class DeviceResidency:
    """``uid -> DeviceAdapter`` for one pool. ``users(uid)`` counts a version's live requests
    (queued or running), which orders eviction."""

    def __init__(
        self,
        pool: PagePool,
        shapes: dict[str, tuple[int, int]],
        stats: TierStats,
        users: Callable[[str], int],
        observe: Callable[[str, float], None],
    ):
        self.pool, self.shapes, self.stats = pool, shapes, stats
        self._users, self._observe = users, observe
        self.device = pool.tensor.device
        self.adapters: dict[str, DeviceAdapter] = {}
        self._copier = PageCopier(self.device)
        # callables (pages, packed [ranks, layers, elems]) told of each tensor-parallel page-in
        self.page_in_listeners: list[Callable[[list[int], torch.Tensor], None]] = []

    def get(self, uid: str) -> DeviceAdapter | None:
        return self.adapters.get(uid)

    def page_in(self, ref: AdapterRef, packed: torch.Tensor, protect: str | None, evict: bool = True) -> bool:
        """Copy ``ref``'s packed host form (``[layers, elems]``, or ``[ranks, layers, elems]``
        under tensor parallelism: rank 0's share here, the rest to the listeners) into free pages (evicting idle adapters other than
        ``protect`` when ``evict``); False when the pages cannot be had."""
        num_pages = packed.shape[-1] // self.pool.geometry.page_elems
        if not self.pool.can_allocate(num_pages) and evict:
            self.make_room(num_pages, protect=protect)
        if not self.pool.can_allocate(num_pages):
            return False
        started = time.monotonic()
        pages = self.pool.allocate(num_pages, PageKind.ADAPTER)
        event = self.copy_into_pages(packed[0] if packed.dim() == 3 else packed, pages)
        for listener in self.page_in_listeners:
            listener(pages, packed)
        layout = module_layout(ref, self.shapes)
        shapes = {name: self.shapes[name] for name in layout}
        self.adapters[ref.uid] = DeviceAdapter(ref, pages, layout, shapes, ready_event=event)
        seconds = time.monotonic() - started
        self.stats.loads += 1
        self.stats.load_seconds_sum += seconds
        self._observe("device", seconds)
        return True

    def copy_into_pages(self, packed: torch.Tensor, pages: list[int]) -> object | None:
        """Write ``packed`` ([layers, len(pages) * page_elems]) into ``pages`` of every layer.
        On CUDA: asynchronous, on a side stream; returns the event that marks it done
        (:class:`inference.device.PageCopier`)."""
        return self._copier.copy(self.pool.tensor, pages, packed)

    def make_room(self, num_pages: int, protect: str | None = None) -> None:
        """Evict device adapters that no running request uses until ``num_pages`` are free:
        idle ones (no request at all) first, then those only queued requests need, LRU order."""
        if self.pool.can_allocate(num_pages):
            return
        candidates = [d for uid, d in self.adapters.items() if d.running == 0 and uid != protect]
        candidates.sort(key=lambda d: (self._users(d.ref.uid) > 0, d.last_used))
        for victim in candidates:
            if self.pool.can_allocate(num_pages):
                return
            self.evict(victim)

    def evict(self, resident: DeviceAdapter) -> None:
        synchronize(resident.ready_event)  # its copy must land before its pages are reused
        del self.adapters[resident.ref.uid]
        self.pool.free(resident.pages)
        self.stats.evictions += 1

    def drop(self, uid: str) -> None:
        """Free ``uid``'s pages if it is resident."""
        resident = self.adapters.get(uid)
        if resident is not None:
            self.evict(resident)

    def on_run(self, ref: AdapterRef) -> None:
        self.adapters[ref.uid].running += 1

    def on_stop_running(self, ref: AdapterRef) -> None:
        resident = self.adapters.get(ref.uid)
        if resident is not None:
            resident.running -= 1
            resident.last_used = time.monotonic()
