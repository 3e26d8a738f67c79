"""Continuous batching over the unified page pool, fair across tenants.

Every step the scheduler decides which requests run and how many new tokens each contributes:

1. Running requests, oldest first, each get their next chunk (one token when decoding, up to the
   remaining prompt when prefilling) within the step's token budget. A request whose next chunk
   needs a KV page that is not free makes the *newest* running request give its pages back
   (preemption by recompute: it returns to the head of the queue and later recomputes its prompt
   plus what it generated); if it is itself the newest, it yields.
2. If nobody was preempted, waiting requests are admitted while the budget, ``max_num_seqs`` and
   free pages allow, in virtual-token-counter order (``inference.fairness``): requests preempted
   before come first; then the head of the tenant that has been served least (weighted tokens
   divided by its weight), first come first served within a tenant. Every placed chunk is charged
   to its tenant at once, so the order moves within a step. A long prompt is split into chunks
   (chunked prefill). A request whose adapter is still being fetched into host RAM is passed over
   (it costs its own time, not the batch's) and admitted in its turn once the adapter is there; a
   request whose adapter is warm but finds no pages blocks those behind it in that order, so it
   is never starved.

A request admitted with nothing computed first takes the longest prefix of its tokens that the
prefix cache holds (``inference.prefix_cache``) and computes from there; every page that becomes
full is entered in the cache, and a request's pages go back to it when it stops.

Under page pressure the pool first reclaims idle cached pages (on allocation), then idle adapters
are evicted (``AdapterGate.make_room``); only then are running requests preempted.

The scheduler only moves page ids; it does no I/O and never touches tensors.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from inference.fairness import AdmissionQueue, VirtualTokenCounters
from inference.page_pool import PageKind, PagePool
from inference.prefix_cache import PrefixCache
from inference.request import Request, RequestState


class Admission(enum.Enum):
    """Whether a waiting request's adapter lets it run now."""

    READY = "ready"  # resident on the device
    COLD = "cold"  # not in host RAM yet; a fetch is under way
    NO_ROOM = "no_room"  # in host RAM but no pages free even after evicting idle adapters
    FAILED = "failed"  # the fetch failed; the request must be failed


class AdapterGate(Protocol):
    """What the scheduler needs from the adapter manager (see inference.adapters.manager)."""

    def admit(self, ref) -> Admission: ...

    def make_room(self, num_pages: int, protect: str | None = None) -> None: ...

    def on_run(self, ref) -> None: ...

    def on_stop_running(self, ref) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits per step: ``max_num_seqs`` sequences and ``max_num_batched_tokens`` new tokens.

    ``input_token_weight`` and ``output_token_weight`` are the fairness cost of a prompt and of
    an output token (w_p = 1, w_q = 2 as in the VTC paper).
    """

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    input_token_weight: float = 1.0
    output_token_weight: float = 2.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        for name in ("input_token_weight", "output_token_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


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
    failed: list[Request] = field(default_factory=list)  # adapter could not be loaded

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Owns the waiting queue, the running list and every request's KV pages.

    ``adapters`` (optional) makes requests' adapters resident before they run and frees idle
    adapter pages before any request is preempted. ``prefix_cache`` (optional; default: a disabled
    one, which only counts lookups) lends admitted requests the pages of their cached prefix.
    """

    def __init__(self, config: SchedulerConfig, pool: PagePool, adapters: AdapterGate | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.config = config
        self.pool = pool
        self.adapters = adapters
        self.prefix_cache = prefix_cache or PrefixCache(pool, enabled=False)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.fairness = VirtualTokenCounters(config.input_token_weight, config.output_token_weight)

    def add(self, request: Request) -> None:
        request.state = RequestState.WAITING
        self.fairness.join(request)
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Drop a request (finished or aborted) and free its pages; idempotent."""
        if request in self.running:
            self.running.remove(request)
            self._stopped_running(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.fairness.leave(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        self.prefix_cache.release(request)
        request.num_computed_tokens = 0

    def computed(self, plan: SchedulerOutput) -> None:
        """The step of ``plan`` ran: advance each request's computed tokens and enter its pages
        that became full in the prefix cache."""
        for chunk in plan.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.prefix_cache.register(chunk.request)

    def _pages_needed(self, request: Request, num_new: int) -> int:
        total = self.pool.geometry.pages_for_tokens(request.num_computed_tokens + num_new)
        return max(0, total - len(request.kv_pages))

    def _stopped_running(self, request: Request) -> None:
        if self.adapters is not None and request.adapter is not None:
            self.adapters.on_stop_running(request.adapter)

    def _try_allocate(self, request: Request, num_pages: int) -> bool:
        if num_pages == 0:
            return True
        if not self.pool.can_allocate(num_pages) and self.adapters is not None:
            protect = request.adapter.uid if request.adapter is not None else None
            self.adapters.make_room(num_pages, protect=protect)
        if not self.pool.can_allocate(num_pages):
            return False
        request.kv_pages.extend(self.pool.allocate(num_pages, PageKind.KV))
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._stopped_running(request)
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
                chunks.append(self._place(request, num_new))
                scheduled_ids.add(request.request_id)
                budget -= num_new
                index += 1
                continue
            # `request` itself was preempted; the list shifted, do not advance index
        failed: list[Request] = []
        if not preempted:
            self._admit(budget, chunks, failed)
        return SchedulerOutput(chunks, preempted, failed)

    def _place(self, request: Request, num_new: int) -> ScheduledChunk:
        """The chunk ``request`` computes this step, charged to its tenant now."""
        chunk = ScheduledChunk(request, request.num_computed_tokens, num_new)
        self.fairness.charge(request, chunk.start, num_new, chunk.samples)
        return chunk

    def _admit(self, budget: int, chunks: list[ScheduledChunk], failed: list[Request]) -> None:
        """Admit waiting requests in virtual-token-counter order (see the module docstring)."""
        queue = AdmissionQueue(self.waiting, self.fairness)
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = queue.peek()
            if request is None:
                break
            if request.adapter is not None and self.adapters is not None:
                admission = self.adapters.admit(request.adapter)
                if admission is Admission.COLD:
                    queue.pop(request)  # its adapter is on the way; let the requests behind it run
                    continue
                if admission is Admission.FAILED:
                    queue.pop(request)
                    self.waiting.remove(request)
                    failed.append(request)
                    continue
                if admission is Admission.NO_ROOM:
                    break
            reused = self.prefix_cache.match(request) if request.num_computed_tokens == 0 else 0
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._try_allocate(request, self._pages_needed(request, num_new)):
                self._release(request)  # the cached pages it was lent go back, idle
                break
            self.prefix_cache.count_admission(request, reused)
            queue.pop(request)
            self.waiting.remove(request)
            request.state = RequestState.RUNNING
            self.running.append(request)
            if request.adapter is not None and self.adapters is not None:
                self.adapters.on_run(request.adapter)
            chunks.append(self._place(request, num_new))
            budget -= num_new
