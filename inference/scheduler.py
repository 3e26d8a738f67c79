"""First-come-first-served continuous batching over the unified page pool.

Every step the scheduler decides which requests run and how many new tokens each contributes:

1. Running requests, oldest first, each get their next chunk (one token when decoding, up to the
   remaining prompt when prefilling) within the step's token budget. A request whose next chunk
   needs a KV page that is not free makes the *newest* running request give its pages back
   (preemption by recompute: it returns to the head of the queue and later recomputes its prompt
   plus what it generated); if it is itself the newest, it yields.
2. If nobody was preempted, waiting requests are admitted in arrival order while the budget,
   ``max_num_seqs`` and free pages allow. A long prompt is split into chunks (chunked prefill).

The scheduler only moves page ids; it does no I/O and never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from inference.page_pool import PageKind, PagePool
from inference.request import Request, RequestState


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits per step: ``max_num_seqs`` sequences and ``max_num_batched_tokens`` new tokens."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


@dataclass(frozen=True)
class ScheduledChunk:
    """``request`` computes tokens ``[start, start + num_tokens)`` this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a new token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Owns the waiting queue, the running list and every request's KV pages.

    ``make_room(num_pages)`` is an optional hook the adapter manager provides: it frees idle
    adapter pages before any request is preempted.
    """

    def __init__(self, config: SchedulerConfig, pool: PagePool, make_room: Callable[[int], None] | None = None):
        self.config = config
        self.pool = pool
        self.make_room = make_room
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.state = RequestState.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Drop a request (finished or aborted) and free its pages; idempotent."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        if request.kv_pages:
            self.pool.free(request.kv_pages)
            request.kv_pages = []
        request.num_computed_tokens = 0

    def _pages_needed(self, request: Request, num_new: int) -> int:
        total = self.pool.geometry.pages_for_tokens(request.num_computed_tokens + num_new)
        return max(0, total - len(request.kv_pages))

    def _try_allocate(self, request: Request, num_pages: int) -> bool:
        if num_pages == 0:
            return True
        if not self.pool.can_allocate(num_pages) and self.make_room is not None:
            self.make_room(num_pages)
        if not self.pool.can_allocate(num_pages):
            return False
        request.kv_pages.extend(self.pool.allocate(num_pages, PageKind.KV))
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.state = RequestState.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        scheduled_ids: set[str] = set()
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self._try_allocate(request, self._pages_needed(request, num_new)):
                victim = self.running[-1]
                if victim.request_id in scheduled_ids:
                    # everything after `request` is already placed this step: nothing to take
                    victim = request
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
                scheduled_ids.add(request.request_id)
                budget -= num_new
                index += 1
                continue
            # `request` itself was preempted; the list shifted, do not advance index
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self.waiting[0]
                num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                if not self._try_allocate(request, self._pages_needed(request, num_new)):
                    break
                self.waiting.popleft()
                request.state = RequestState.RUNNING
                self.running.append(request)
                chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
                budget -= num_new
        return SchedulerOutput(chunks, preempted)
