"""Fair shares across tenants: virtual token counters (VTC).

Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024). Every tenant has a counter of
the service it has received, in weighted tokens divided by its weight::

    counter[t] += (w_p * new prompt tokens + w_q * new output tokens) / tenant_weight

The scheduler admits the waiting request whose tenant has the smallest counter (first come, first
served within a tenant; requests without a tenant are one tenant, ``None``).

Charging rule: a tenant is charged when the scheduler places a chunk, in the same step: the chunk's
prompt tokens that were never charged before (a prompt recomputed after a preemption is not charged
again) at ``w_p`` each, plus ``w_q`` if the chunk samples a token (the chunk reaches the end of the
request's known tokens, so exactly one new output token comes out of it).

Rejoin rule: a tenant that becomes active (a request arrives while it has none waiting or running)
has its counter lifted to ``max(own, min over active tenants)``, or to ``max(own, counter of the
last tenant that went idle)`` when no tenant is active, so idling banks no credit; a tenant that was
served more than the others keeps its debt.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from inference.request import Request


def check_tenant(tenant, weight) -> list[str]:
    """Problems with a request's tenant and tenant_weight, as messages naming them."""
    problems = []
    if tenant is not None and not isinstance(tenant, str):
        problems.append(f"tenant must be a string or None, got {type(tenant).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        problems.append(f"tenant_weight must be a number, got {type(weight).__name__}")
    elif not math.isfinite(weight) or weight <= 0:
        problems.append(f"tenant_weight must be finite and > 0, got {weight!r}")
    return problems


class VirtualTokenCounters:
    """Per-tenant counters, the set of active tenants and the charging of scheduled chunks."""

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0):
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str | None, float] = {}
        self._live: dict[str | None, int] = {}  # tenant -> requests waiting or running
        self._members: dict[str, str | None] = {}  # request id -> tenant, while live
        self._last_idle = 0.0

    def counter(self, tenant: str | None) -> float:
        return self.counters.get(tenant, 0.0)

    @property
    def active(self) -> set[str | None]:
        return set(self._live)

    def join(self, request: Request) -> None:
        """``request`` enters the scheduler; lifts its tenant's counter if the tenant was idle."""
        if request.request_id in self._members:
            return
        tenant = request.tenant
        if tenant not in self._live:
            floor = min((self.counter(t) for t in self._live), default=self._last_idle)
            self.counters[tenant] = max(self.counter(tenant), floor)
        self._members[request.request_id] = tenant
        self._live[tenant] = self._live.get(tenant, 0) + 1

    def leave(self, request: Request) -> None:
        """``request`` left the scheduler (finished, aborted, failed); idempotent."""
        if request.request_id not in self._members:
            return
        tenant = self._members.pop(request.request_id)
        self._live[tenant] -= 1
        if self._live[tenant] == 0:
            del self._live[tenant]
            self._last_idle = self.counter(tenant)

    def charge(self, request: Request, start: int, num_tokens: int, samples: bool) -> float:
        """Charge the tenant of ``request`` for a chunk placed this step; returns the cost."""
        prompt_end = min(start + num_tokens, len(request.prompt_token_ids))
        new_prompt = max(0, prompt_end - max(start, request.num_charged_prompt_tokens))
        request.num_charged_prompt_tokens = max(request.num_charged_prompt_tokens, prompt_end)
        cost = self.input_weight * new_prompt + (self.output_weight if samples else 0.0)
        self.counters[request.tenant] = self.counter(request.tenant) + cost / request.tenant_weight
        return cost


class AdmissionQueue:
    """The waiting requests in admission order, recomputed at every ``peek`` from the counters.

    Preempted requests come first, in queue order (they were admitted before); then the head of
    the tenant with the smallest counter (ties: the tenant whose head came first in the queue).
    ``pop`` takes the request ``peek`` returned out of the order (admitted, passed over, failed).
    """

    def __init__(self, waiting: Iterable[Request], counters: VirtualTokenCounters):
        self.counters = counters
        self.preempted: deque[Request] = deque()
        self.tenants: dict[str | None, deque[tuple[int, Request]]] = {}
        for position, request in enumerate(waiting):
            if request.num_preemptions > 0:
                self.preempted.append(request)
            else:
                self.tenants.setdefault(request.tenant, deque()).append((position, request))

    def peek(self) -> Request | None:
        if self.preempted:
            return self.preempted[0]
        best = None
        for tenant, queue in self.tenants.items():
            key = (self.counters.counter(tenant), queue[0][0])
            if best is None or key < best[0]:
                best = (key, tenant)
        return None if best is None else self.tenants[best[1]][0][1]

    def pop(self, request: Request) -> None:
        if self.preempted and self.preempted[0] is request:
            self.preempted.popleft()
            return
        queue = self.tenants[request.tenant]
        assert queue[0][1] is request, "pop takes the request peek returned"
        queue.popleft()
        if not queue:
            del self.tenants[request.tenant]


class _SimulatedCounters:
    """A copy of the counters that :func:`admission_order` charges as it walks the queue."""

    def __init__(self, counters: VirtualTokenCounters):
        self.values = dict(counters.counters)
        self.input_weight = counters.input_weight

    def counter(self, tenant: str | None) -> float:
        return self.values.get(tenant, 0.0)

    def charge_prompt(self, request: Request) -> None:
        cost = self.input_weight * (request.num_tokens - request.num_computed_tokens)
        self.values[request.tenant] = self.counter(request.tenant) + cost / request.tenant_weight


def admission_order(waiting: Iterable[Request], counters: VirtualTokenCounters, limit: int) -> list[Request]:
    """The first ``limit`` waiting requests in the order the scheduler would admit them if nothing
    else arrived: each pick charges its tenant's copy of the counter with its prompt, so a busy
    tenant's queue does not take every place. Nothing is mutated (used to prefetch adapters)."""
    simulated = _SimulatedCounters(counters)
    queue = AdmissionQueue(waiting, simulated)  # type: ignore[arg-type]  (duck-typed: counter())
    order: list[Request] = []
    while len(order) < limit:
        request = queue.peek()
        if request is None:
            break
        queue.pop(request)
        simulated.charge_prompt(request)
        order.append(request)
    return order

