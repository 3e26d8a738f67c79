"""Continuous batching over the unified page pool, fair across tenants.

Every step the scheduler decides which requests run and how many new tokens each contributes:

The step has a token budget (``max_num_batched_tokens``, lowered by the engine's
:class:`~inference.step_budget.StepTokenBudget` so that a step lasts about a target time). It is
spent in virtual-token-counter order (``inference.fairness``) over running and waiting requests
alike: the tenant that has been served least (weighted tokens divided by its weight) places its
next chunk, then the order is looked at again (every placed chunk is charged to its tenant at
once, so the order moves within a step):

* a running request gets its next chunk (one token when decoding, up to the rest of the prompt when
  prefilling: a long prompt is split into chunks, chunked prefill); a tenant's running requests go
  oldest first, and a running request goes before a waiting request of a tenant with the same
  counter. A request whose next chunk needs a KV page that is not free makes the *newest* running
  request not placed yet give its pages back (preemption by recompute: it returns to the head of
  the queue and later recomputes its prompt plus what it generated); if that is itself, it yields.
* a waiting request (the head of its tenant's queue, first come first served within a tenant) is
  admitted if ``max_num_seqs`` allows and there are free pages for its chunk beyond those the
  running requests not placed yet need for theirs. Requests preempted before are admitted only
  after every running request was placed, and nothing is admitted in a step that preempted. A
  request whose adapter is still being fetched into host RAM is passed over (it costs its own
  time, not the batch's) and admitted in its turn once the adapter is there; a request whose
  adapter is warm but finds no pages ends admission for the step, so it is never overtaken.

So a light tenant's new request is placed at the next step even when the running requests of a
busy tenant could fill the budget: those requests keep their pages and wait a step. With the full
budget (more than the running requests need) every running request is placed, as in plain
continuous batching.

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
from typing import Callable, Protocol

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
    exhausted: bool = False  # the step used its whole token budget

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class _Step:
    """The plan of the step being built: its chunks, the budget left, who was placed."""

    budget: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)
    placed: set[str] = field(default_factory=set)

    def place(self, chunk: ScheduledChunk) -> None:
        self.chunks.append(chunk)
        self.placed.add(chunk.request.request_id)
        self.budget -= chunk.num_tokens


class _RunningByTenant:
    """The running requests not placed yet this step, per tenant, oldest first."""

    def __init__(self, running: list[Request], pages_needed: Callable[[Request], int]):
        self.queues: dict[str | None, deque[Request]] = {}
        self.position = {r.request_id: i for i, r in enumerate(running)}
        self.needs = {r.request_id: pages_needed(r) for r in running}
        self.pages_needed = sum(self.needs.values())  # by the unplaced requests' next chunks
        for request in running:
            self.queues.setdefault(request.tenant, deque()).append(request)

    def peek(self, counters: VirtualTokenCounters) -> Request | None:
        """The oldest unplaced request of the tenant with the smallest counter (ties: the tenant
        whose request is older)."""
        best = None
        for tenant, queue in self.queues.items():
            key = (counters.counter(tenant), self.position[queue[0].request_id])
            if best is None or key < best[0]:
                best = (key, queue[0])
        return None if best is None else best[1]

    def discard(self, request: Request) -> None:
        """``request`` was placed or preempted."""
        queue = self.queues.get(request.tenant)
        index = next((i for i, r in enumerate(queue or ()) if r is request), None)
        if index is None:
            return
        del queue[index]
        if not queue:
            del self.queues[request.tenant]
        self.pages_needed -= self.needs.pop(request.request_id)


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

    def _try_allocate(self, request: Request, num_pages: int, reserve: int = 0) -> bool:
        """Give ``request`` ``num_pages`` more KV pages if ``reserve`` more would still be free
        (evicting idle adapters if needed)."""
        if num_pages == 0:
            return True
        if not self.pool.can_allocate(num_pages + reserve) and self.adapters is not None:
            protect = request.adapter.uid if request.adapter is not None else None
            self.adapters.make_room(num_pages + reserve, protect=protect)
        if not self.pool.can_allocate(num_pages + reserve):
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

    def schedule(self, token_budget: int | None = None) -> SchedulerOutput:
        """Plan one step within ``token_budget`` new tokens (at most ``max_num_batched_tokens``;
        the engine's :class:`~inference.step_budget.StepTokenBudget` sets it). See the module
        docstring for the order."""
        budget = self.config.max_num_batched_tokens
        if token_budget is not None:
            budget = max(1, min(budget, token_budget))
        step = _Step(budget)
        running = _RunningByTenant(
            self.running, lambda r: self._pages_needed(r, min(r.num_tokens - r.num_computed_tokens, budget)))
        queue = AdmissionQueue(self.waiting, self.fairness)
        admitting = True
        while step.budget > 0:
            runner = running.peek(self.fairness)
            newcomer = None
            if admitting and not step.preempted and len(self.running) < self.config.max_num_seqs:
                newcomer = queue.peek()
                if newcomer is not None and runner is not None and not self._goes_before(newcomer, runner):
                    newcomer = None
            if newcomer is not None:
                admitting = self._admit(newcomer, queue, running, step)
                continue
            if runner is None:
                break
            self._run(runner, running, step)
        return SchedulerOutput(step.chunks, step.preempted, step.failed, exhausted=step.budget == 0)

    def _goes_before(self, newcomer: Request, runner: Request) -> bool:
        """Whether a waiting request is placed before an unplaced running one: only a request never
        preempted, of a tenant served strictly less (preempted requests wait until every running
        request is placed: they gave their pages back for lack of room)."""
        if newcomer.num_preemptions > 0:
            return False
        return self.fairness.counter(newcomer.tenant) < self.fairness.counter(runner.tenant)

    def _run(self, request: Request, running: _RunningByTenant, step: _Step) -> None:
        """Place the next chunk of a running request; under page pressure preempt the newest
        running request not placed yet (possibly ``request`` itself)."""
        num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
        while not self._try_allocate(request, self._pages_needed(request, num_new)):
            victim = next(r for r in reversed(self.running) if r.request_id not in step.placed)
            running.discard(victim)
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is request:
                return
        running.discard(request)
        step.place(self._place(request, num_new))

    def _admit(self, request: Request, queue: AdmissionQueue, running: _RunningByTenant, step: _Step) -> bool:
        """Admit the waiting request ``queue`` put first, or pass over or fail it; returns whether
        admission goes on this step (False once a request finds no room: it is not overtaken)."""
        if request.adapter is not None and self.adapters is not None:
            admission = self.adapters.admit(request.adapter)
            if admission is Admission.COLD:
                queue.pop(request)  # its adapter is on the way; let the requests behind it run
                return True
            if admission is Admission.FAILED:
                queue.pop(request)
                self.waiting.remove(request)
                step.failed.append(request)
                return True
            if admission is Admission.NO_ROOM:
                return False
        reused = self.prefix_cache.match(request) if request.num_computed_tokens == 0 else 0
        num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
        # the pages the running requests not placed yet need for their chunks stay free for them
        if not self._try_allocate(request, self._pages_needed(request, num_new), running.pages_needed):
            self._release(request)  # the cached pages it was lent go back, idle
            return False
        self.prefix_cache.count_admission(request, reused)
        queue.pop(request)
        self.waiting.remove(request)
        request.state = RequestState.RUNNING
        self.running.append(request)
        if request.adapter is not None and self.adapters is not None:
            self.adapters.on_run(request.adapter)
        step.place(self._place(request, num_new))
        return True

    def _place(self, request: Request, num_new: int) -> ScheduledChunk:
        """The chunk ``request`` computes this step, charged to its tenant now."""
        chunk = ScheduledChunk(request, request.num_computed_tokens, num_new)
        self.fairness.charge(request, chunk.start, num_new, chunk.samples)
        return chunk
