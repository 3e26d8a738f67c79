"""The prefix cache: KV pages computed for earlier requests, reused by requests that start with the
same tokens under the same tenant and adapter version.

Keys. A full page of a request (``page_tokens`` tokens) is keyed by a hash chain over its pages::

    key_0 = H(salt || tokens of page 0)        key_i = H(key_{i-1} || tokens of page i)

with ``salt = H(tenant, adapter version uid)``. A key names every token up to the end of its page,
who asked (the tenant) and the adapter version that computed it: the adapter changes every K and V,
so the same tokens under another adapter, or another version of it, are other pages; and a tenant
never reaches pages another tenant computed, even for an identical system prompt. H is SHA-256
(Python's ``hash`` is 64 bits and seeded per process; a collision here would show one tenant's KV to
another).

Reuse. A request admitted with nothing computed takes the longest run of its leading full pages
whose keys are cached, always leaving at least one token to compute (the step must produce its
logits), and computes from there (:meth:`PrefixCache.match`). Cached pages are read-only: only full
pages are cached, and a request writes only the slots of its new tokens, past them. A cached page is
shared by reference count: one per request whose ``kv_pages`` hold it.

Entering pages. After every step each page that became full is entered under its key
(:meth:`PrefixCache.register`), so that requests admitted later, even while this one still runs,
reuse it. If the key is already cached (two requests computed the same page at the same time) the
later copy stays private and is freed with its request.

Eviction. A cached page no request holds is *idle*: it keeps its KV and stays findable, but counts as
free for every allocator of the pool. When the free list is short the pool reclaims idle pages itself
(:class:`inference.page_pool.PageReclaimer`), least recently used first, and the tail of a chain
before its head (a request releases its pages last to first), so what survives is always a usable
prefix. The order in which the pool makes room is therefore: free pages, idle cached pages, idle
adapters (``AdapterGate.make_room``), and only then the preemption of running requests.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from inference.page_pool import PagePool
from inference.request import Request


@dataclass
class PrefixCacheCounts:
    """One tenant's lookups since start, in tokens: ``queries`` (tokens of admitted requests) and
    ``hits`` (tokens reused from the cache)."""

    queries: int = 0
    hits: int = 0


class PrefixCache:
    """Keys to pages, reference counts and the LRU order of idle pages (engine thread only; the
    page counts are plain reads for metrics). With ``enabled=False`` nothing is ever cached or
    reused, and lookups are still counted (all misses)."""

    def __init__(self, pool: PagePool, enabled: bool = True):
        self.pool = pool
        self.enabled = enabled
        self.page_tokens = pool.geometry.page_tokens
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}  # cached page -> requests holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody holds, LRU first
        self.stats: dict[str | None, PrefixCacheCounts] = {}
        if enabled:
            pool.reclaimer = self

    # ------------------------------------------------------------------ what the pool sees
    @property
    def num_reclaimable(self) -> int:
        """Idle cached pages: free for any allocation, reclaimed on demand."""
        return len(self._idle)

    @property
    def num_in_use(self) -> int:
        """Cached pages held by at least one request."""
        return len(self._refs) - len(self._idle)

    def reclaim(self, num_pages: int) -> list[int]:
        """Forget up to ``num_pages`` idle pages, least recently used first; returns their ids (the
        pool frees them)."""
        pages = []
        while len(pages) < num_pages and self._idle:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            del self._refs[page]
            pages.append(page)
        return pages

    # ------------------------------------------------------------------ requests
    def match(self, request: Request) -> int:
        """Give ``request`` (nothing computed, no pages) the cached pages of its longest cached
        prefix; returns the tokens reused (also set as its ``num_computed_tokens``)."""
        if request.kv_pages or request.num_computed_tokens:
            raise RuntimeError(f"request {request.request_id} already holds pages")
        if not self.enabled:
            return 0
        usable = (request.num_tokens - 1) // self.page_tokens
        self._extend_keys(request, usable)
        pages = []
        for key in request.page_hashes[:usable]:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            self._refs[page] += 1
            self._idle.pop(page, None)
        request.kv_pages = pages
        request.num_cached_pages = len(pages)
        request.num_computed_tokens = len(pages) * self.page_tokens
        return request.num_computed_tokens

    def count_admission(self, request: Request, reused_tokens: int) -> None:
        """Count an admitted request's lookup: its tokens, and how many came from the cache."""
        counts = self.stats.get(request.tenant)
        if counts is None:
            counts = self.stats[request.tenant] = PrefixCacheCounts()
        counts.queries += request.num_tokens
        counts.hits += reused_tokens

    def register(self, request: Request) -> None:
        """Enter the pages of ``request`` that became full since the last call."""
        if not self.enabled:
            return
        full = request.num_computed_tokens // self.page_tokens
        if full <= request.num_cached_pages:
            return
        self._extend_keys(request, full)
        for index in range(request.num_cached_pages, full):
            key = request.page_hashes[index]
            if key in self._page_of:
                continue  # computed at the same time by another request: this copy stays private
            page = request.kv_pages[index]
            self._page_of[key] = page
            self._key_of[page] = key
            self._refs[page] = 1
        request.num_cached_pages = full

    def release(self, request: Request) -> None:
        """``request`` gives back all its pages: private ones are freed, cached ones lose a
        reference and become idle at none (last page first, so chain tails are reclaimed first)."""
        private = []
        for page in reversed(request.kv_pages):
            refs = self._refs.get(page)
            if refs is None:
                private.append(page)
                continue
            self._refs[page] = refs - 1
            if refs == 1:
                self._idle[page] = None
        if private:
            self.pool.free(private)
        request.kv_pages = []
        request.num_cached_pages = 0

    # ------------------------------------------------------------------ keys
    def _extend_keys(self, request: Request, num_pages: int) -> None:
        """Make ``request.page_hashes`` cover its first ``num_pages`` full pages (tokens never change
        once known, so keys computed once stay valid through preemptions)."""
        keys = request.page_hashes
        if len(keys) >= num_pages:
            return
        tokens = request.token_at(len(keys) * self.page_tokens, num_pages * self.page_tokens)
        parent = keys[-1] if keys else _salt(request)
        for start in range(0, len(tokens), self.page_tokens):
            page = array("q", tokens[start : start + self.page_tokens]).tobytes()
            parent = hashlib.sha256(parent + page).digest()
            keys.append(parent)


def _salt(request: Request) -> bytes:
    """The root of a request's key chain: its tenant and adapter version."""
    adapter = request.adapter.uid if request.adapter is not None else None
    return hashlib.sha256(json.dumps(["tailor-prefix-v1", request.tenant, adapter]).encode()).digest()
