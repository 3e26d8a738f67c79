"""The unified page pool: one preallocated device tensor shared by the KV cache and LoRA adapters.

Geometry (see docs/design.md for the arithmetic):

* The pool is ``pool: [num_layers, num_pages, page_elems]``. A *page id* ``p`` names the slice
  ``pool[:, p, :]``: one row of ``page_elems`` elements in every layer. Allocation is by page id,
  so one allocation covers all layers (as in S-LoRA, where a slot index spans every layer).
* ``page_elems = page_tokens * 2 * kv_size``. Seen as KV, a page holds K and V of ``page_tokens``
  consecutive tokens of one sequence: ``pool[l].view(num_pages, 2, page_tokens, kv_heads, head_dim)``.
  The KV row of a token is ``kv_size = num_kv_heads * head_dim`` wide (192 for SmolLM2, not the
  hidden size 576), so grouped-query models waste nothing.
* Seen as adapter memory, an adapter's pages form a virtual per-layer buffer of
  ``len(pages) * page_elems`` elements into which its A and B matrices of every target module are
  packed back to back. Rows may straddle pages, so an adapter of any rank and any target set wastes
  less than one page, whatever the hidden and intermediate widths are.

The allocator is a free list of page ids with a kind per allocation (KV or adapter), so occupancy
by kind is known at any time without scanning. KV pages the prefix cache keeps but no request holds
(``inference.prefix_cache``) count as free: an allocation that finds the free list short reclaims
them first, through the pool's ``reclaimer``.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from inference.model_config import ModelConfig


class PageKind(enum.Enum):
    """What an allocated page holds."""

    KV = "kv"
    ADAPTER = "adapter"


class OutOfPagesError(RuntimeError):
    """Not enough free pages for an allocation."""


class PageReclaimer(Protocol):
    """Allocated KV pages that may be taken back at any time (the prefix cache's idle pages)."""

    @property
    def num_reclaimable(self) -> int: ...

    def reclaim(self, num_pages: int) -> list[int]:
        """Give up to ``num_pages`` pages; the pool frees them."""
        ...


@dataclass(frozen=True)
class PageGeometry:
    """Sizes of one page. ``page_elems`` is per layer; ``page_bytes`` covers all layers."""

    num_layers: int
    page_tokens: int
    num_kv_heads: int
    head_dim: int
    element_bytes: int

    @property
    def kv_size(self) -> int:
        """Elements of one token's K row in one layer."""
        return self.num_kv_heads * self.head_dim

    @property
    def page_elems(self) -> int:
        """Elements of one page in one layer: K and V of ``page_tokens`` tokens."""
        return self.page_tokens * 2 * self.kv_size

    @property
    def page_bytes(self) -> int:
        """Bytes of one page id across all layers."""
        return self.page_elems * self.num_layers * self.element_bytes

    @classmethod
    def for_model(cls, config: ModelConfig, page_tokens: int, dtype: torch.dtype) -> "PageGeometry":
        """The geometry of a pool serving ``config`` in ``dtype``."""
        return cls(
            num_layers=config.num_layers,
            page_tokens=page_tokens,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            element_bytes=torch.empty((), dtype=dtype).element_size(),
        )

    def pages_for_tokens(self, num_tokens: int) -> int:
        """KV pages that hold ``num_tokens`` tokens of one sequence."""
        return -(-num_tokens // self.page_tokens)

    def pages_for_elems(self, num_elems: int) -> int:
        """Pages that hold a virtual per-layer buffer of ``num_elems`` elements (adapter weights)."""
        return -(-num_elems // self.page_elems)


@dataclass(frozen=True)
class PoolOccupancy:
    """Pages by kind at one moment; ``total == free + kv + adapter + cached``.

    ``kv``: KV pages held by requests (shared cached pages included); ``cached``: idle pages of the
    prefix cache (reclaimable, so an allocator may count them as free)."""

    total: int
    free: int
    kv: int
    adapter: int
    page_bytes: int
    cached: int = 0


class PagePool:
    """One preallocated ``[num_layers, num_pages, page_elems]`` tensor and its page allocator.

    Thread-safe for the occupancy readers (metrics); allocation and freeing happen on the engine
    thread. The tensor starts zeroed so that padding slots read by masked attention lanes are
    finite.
    """

    def __init__(self, geometry: PageGeometry, num_pages: int, device: torch.device | str, dtype: torch.dtype):
        if num_pages < 1:
            raise ValueError(
                f"the page pool needs at least 1 page of {geometry.page_bytes} bytes; raise the pool size"
            )
        self.geometry = geometry
        self.num_pages = num_pages
        self.tensor = torch.zeros(
            (geometry.num_layers, num_pages, geometry.page_elems), dtype=dtype, device=device
        )
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._kind_of: dict[int, PageKind] = {}
        self._counts = {PageKind.KV: 0, PageKind.ADAPTER: 0}
        self._lock = threading.Lock()
        self.reclaimer: PageReclaimer | None = None

    @classmethod
    def with_bytes(cls, geometry: PageGeometry, pool_bytes: int, device, dtype) -> "PagePool":
        """A pool of as many whole pages as fit in ``pool_bytes``."""
        return cls(geometry, pool_bytes // geometry.page_bytes, device, dtype)

    def kv_layer(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` seen as KV pages: ``[num_pages, 2, page_tokens, num_kv_heads, head_dim]``."""
        g = self.geometry
        return self.tensor[layer].view(self.num_pages, 2, g.page_tokens, g.num_kv_heads, g.head_dim)

    def layer(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` as raw pages: ``[num_pages, page_elems]``."""
        return self.tensor[layer]

    @property
    def num_free(self) -> int:
        """Pages an allocation can have now: free ones and reclaimable ones."""
        return len(self._free) + self._num_reclaimable()

    def _num_reclaimable(self) -> int:
        return 0 if self.reclaimer is None else self.reclaimer.num_reclaimable

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_free

    def allocate(self, num_pages: int, kind: PageKind) -> list[int]:
        """Take ``num_pages`` free page ids for ``kind``, reclaiming idle cached pages when the free
        list is short; raise :class:`OutOfPagesError` if too few."""
        if num_pages < 0:
            raise ValueError("num_pages must be >= 0")
        short = num_pages - len(self._free)
        if short > 0 and self.reclaimer is not None:
            self.free(self.reclaimer.reclaim(short))
        with self._lock:
            if num_pages > len(self._free):
                raise OutOfPagesError(f"asked for {num_pages} pages, {len(self._free)} free")
            pages = [self._free.pop() for _ in range(num_pages)]
            for page in pages:
                self._kind_of[page] = kind
            self._counts[kind] += num_pages
        return pages

    def free(self, pages: list[int]) -> None:
        """Return pages to the free list. Freeing a page that is not allocated is a bug and raises."""
        with self._lock:
            for page in pages:
                kind = self._kind_of.pop(page, None)
                if kind is None:
                    raise RuntimeError(f"page {page} freed twice or never allocated")
                self._counts[kind] -= 1
                self._free.append(page)

    def occupancy(self) -> PoolOccupancy:
        """Pages by kind, consistent at one instant."""
        with self._lock:
            cached = self._num_reclaimable()
            return PoolOccupancy(
                total=self.num_pages,
                free=len(self._free),
                kv=self._counts[PageKind.KV] - cached,
                adapter=self._counts[PageKind.ADAPTER],
                page_bytes=self.geometry.page_bytes,
                cached=cached,
            )
