"""``ReplicaRouter``: many inference replicas behind the api, with adapter-affinity routing.

An ``InferenceBackend`` over one ``RemoteInference`` client per replica (``TAILOR_INFERENCE_URLS``).

1. Affinity. A request with an adapter goes to the adapter's home: the first replica in the
   rendezvous (highest-random-weight) order of its id (``rendezvous_order``), so each adapter is
   fetched from S3 and paged in on one replica, and every api process and worker agrees on it.
2. Bounded loads (Mirrokni et al.). A replica takes a request only while its in-flight count
   stays within ``ceil(c * (in-flight + 1) / healthy replicas)`` (``c``:
   ``TAILOR_ROUTER_LOAD_FACTOR``); otherwise the request spills. Base-model requests (no adapter)
   go to the least loaded replica.
2a. A spill goes to a holder first: among the under-bound replicas, one that likely holds the
   adapter already (``Residency``: the router's own record of the adapters it sent to each
   replica, most recent first), the most recently used there first; only when none does, to the
   next under-bound replica in the adapter's order. A spill then costs no page-in where a copy
   exists, and a hot adapter's spills keep landing on the replica that has it.
3. Load is this api process's own in-flight count per replica: exact and current at the moment of
   the decision (a replica's queue read from its metrics is a probe interval old, and costs a
   scrape). With N api processes each bounds its own share, so the sum stays bounded too.
4. Health. Every ``probe_interval_s`` each replica's ``/readyz`` is probed; a replica that fails a
   probe (down, draining), cannot be reached or breaks a stream is taken out of the ring at once,
   and put back when a probe answers 200 again. Its adapters move to their next replica in hash
   order (only those: rendezvous hashing moves nothing else). A request refused before its first
   event (unreachable, or a 503 or 429 the replica sent: draining, overloaded, the adapter could
   not be fetched) is retried on the next replica, so ejections fail no request;
   one already streaming from a replica that dies ends with a ``GenerationFailed`` event (the
   client's stream turns a broken connection into one), never a hang. When every replica is out,
   they are all tried anyway in hash order (a probe may be stale) and the last refusal is raised.
5. Prefetch goes to the adapter's home (the first healthy replica in its order); delete goes to
   every replica (a spilled or failed-over request may have paged it in anywhere).

Metrics (``RouterMetrics``, served on the api's ``/metrics``): routing decisions by replica and
kind (a spill to a holder is ``spill_holder``, one to the next replica in order ``spill``),
retries, ejections, and per replica its state (up) and in-flight count.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inference.service.backend import GenerationEvents, InferenceBackend
from inference.service.client import UNREACHABLE_REASON, RemoteInference, rendezvous_order
from inference.service.events import GenerationEnded, GenerationEvent, is_terminal, run_to_end
from inference.service.protocol import AdapterSpec, GenerateRequest, InferenceError

log = logging.getLogger(__name__)

DECISIONS = ("home", "spill", "spill_holder", "failover", "least_loaded")
PROBE_TIMEOUT_S = 2.0
DEFAULT_LOAD_FACTOR = 1.5  # TAILOR_ROUTER_LOAD_FACTOR's default (docs/benchmarks.md, "Load-factor sweep")
RESIDENCY_ENTRIES = 1024  # adapters remembered per replica (a few times a device tier's count)


class Residency:
    """The adapters this router sent to one replica (generations and prefetches), most recent
    last, at most ``capacity`` of them: the router's model of what the replica holds.

    A replica's tiers keep recently used adapters (the device tier evicts idle adapters in LRU
    order, the host tier too), so an adapter's stack distance here, the number of other adapters
    sent to the replica since, says how likely it is still there: under ``device capacity`` it is
    in device pages, under ``device + host capacity`` in host RAM. Comparing distances across
    replicas of one size therefore ranks device holders before host holders without the router
    knowing either capacity. The record is exact for what this process routed; it misses other
    api processes' requests (then it falls back to hash order) and evictions it did not cause
    (then a spill lands where the adapter was, as good a guess as any)."""

    def __init__(self, capacity: int = RESIDENCY_ENTRIES):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._recent: OrderedDict[str, None] = OrderedDict()

    def touch(self, adapter_id: str) -> None:
        """``adapter_id`` was just sent to the replica: make it the most recent (forgetting the
        oldest past ``capacity``)."""
        self._recent[adapter_id] = None
        self._recent.move_to_end(adapter_id)
        if len(self._recent) > self.capacity:
            self._recent.popitem(last=False)

    def forget(self, adapter_id: str) -> None:
        """The replica dropped ``adapter_id`` (deleted)."""
        self._recent.pop(adapter_id, None)

    def clear(self) -> None:
        """The replica may have lost everything (it left the ring: restarted, or died)."""
        self._recent.clear()

    def distance(self, adapter_id: str) -> int | None:
        """How many other adapters were sent to the replica since ``adapter_id`` (0: it was the
        last one); None when it is not in the record. Costs O(distance)."""
        if adapter_id not in self._recent:
            return None
        for distance, key in enumerate(reversed(self._recent)):
            if key == adapter_id:
                return distance
        raise AssertionError("unreachable: the key is in the record")

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._recent

    def __len__(self) -> int:
        return len(self._recent)


@dataclass
class Replica:
    """One inference service: its client, whether it is in the ring, this process's in-flight
    generations on it, and the adapters this process sent to it (``Residency``)."""

    url: str
    client: InferenceBackend
    healthy: bool = True
    in_flight: int = 0
    residency: Residency = field(default_factory=Residency)


class RouterMetrics:
    """The router's Prometheus metrics in their own registry (the api's ``/metrics`` serves it)."""

    def __init__(self, router: ReplicaRouter):
        self.registry = CollectorRegistry()
        self.decisions = Counter("tailor_router_decisions", "Generations routed, by replica and decision: home "
                                 "(the adapter's home replica), spill_holder (home over its load bound; to a replica "
                                 "this api process sent the adapter to before), spill (home over its load bound; "
                                 "no such replica under the bound: to the next in the adapter's order), failover "
                                 "(home out of the ring), least_loaded (base model).", ["replica", "decision"],
                                 registry=self.registry)
        self.retries = Counter("tailor_router_retries", "Generations a replica refused before the first event "
                               "(unreachable, 503 or 429) and that were tried on the next one.", ["replica"],
                               registry=self.registry)
        self.ejections = Counter("tailor_router_ejections", "Times a replica was taken out of the ring.",
                                 ["replica"], registry=self.registry)
        for replica in router.replicas:
            self.retries.labels(replica.url)
            self.ejections.labels(replica.url)
            for decision in DECISIONS:
                self.decisions.labels(replica.url, decision)
        self.registry.register(_ReplicaCollector(router))


class _ReplicaCollector(Collector):
    """Per replica at scrape time: in the ring or not, and this process's in-flight count."""

    def __init__(self, router: ReplicaRouter):
        self.router = router

    def collect(self):
        up = GaugeMetricFamily("tailor_router_replica_up", "1 while the replica is in the ring, 0 while ejected.",
                               labels=["replica"])
        load = GaugeMetricFamily("tailor_router_replica_in_flight",
                                 "Generations this api process has in flight on the replica (its routing load).",
                                 labels=["replica"])
        for replica in self.router.replicas:
            up.add_metric([replica.url], 1 if replica.healthy else 0)
            load.add_metric([replica.url], replica.in_flight)
        yield up
        yield load


class RoutedEvents:
    """A replica's event stream that gives its in-flight slot back once (at the last event or on
    ``aclose``) and ejects the replica if the stream broke."""

    def __init__(self, router: ReplicaRouter, replica: Replica, events: GenerationEvents):
        self._router, self._replica, self._events = router, replica, events
        self._open = True

    def __aiter__(self) -> RoutedEvents:
        return self

    async def __anext__(self) -> GenerationEvent:
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            self._finish()
            raise
        if is_terminal(event):
            self._finish()
        return event

    def _finish(self) -> None:
        if self._open:
            self._open = False
            self._replica.in_flight -= 1
            if getattr(self._events, "broken", False):
                self._router.eject(self._replica, "its stream broke")

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            self._finish()


class ReplicaRouter:
    """Routes generations over several inference replicas (see the module docstring); has the
    ``InferenceBackend`` interface, so the api holds it in place of one ``RemoteInference``."""

    def __init__(self, backends: Sequence[tuple[str, InferenceBackend]], *, load_factor: float = DEFAULT_LOAD_FACTOR,
                 probe_interval_s: float = 2.0):
        """``backends``: ``(name, backend)`` per replica; the name (its URL) is what the hash
        and the metrics' ``replica`` label use. ``from_urls`` builds the usual HTTP clients."""
        names = [name.rstrip("/") for name, _backend in backends]
        if not names:
            raise ValueError("the router needs at least one replica")
        if len(set(names)) != len(names):
            raise ValueError("replica names (URLs) must be distinct")
        if load_factor <= 1:
            raise ValueError("load_factor must be above 1 (consistent hashing with bounded loads)")
        self.replicas = [Replica(name, backend) for name, (_n, backend) in zip(names, backends)]
        self._by_url = {replica.url: replica for replica in self.replicas}
        self.load_factor = load_factor
        self.probe_interval_s = probe_interval_s
        self.metrics = RouterMetrics(self)
        self._prober: asyncio.Task | None = None
        self._base_turn = 0

    @classmethod
    def from_urls(cls, urls: Sequence[str], secret: str, timeout_s: float = 300.0, *,
                  load_factor: float = DEFAULT_LOAD_FACTOR, probe_interval_s: float = 2.0,
                  transport: httpx.AsyncBaseTransport | None = None) -> ReplicaRouter:
        """A router over the inference services at ``urls`` (one ``RemoteInference`` each)."""
        backends = [(url, RemoteInference(url, secret, timeout_s, transport=transport)) for url in urls]
        return cls(backends, load_factor=load_factor, probe_interval_s=probe_interval_s)

    # ------------------------------------------------------------------ placement
    def order(self, adapter_id: str) -> list[Replica]:
        """Every replica in the rendezvous order of ``adapter_id`` (its home first)."""
        return [self._by_url[url] for url in rendezvous_order(adapter_id, list(self._by_url))]

    def home(self, adapter_id: str) -> Replica:
        """The first replica in the ring in the adapter's order (its first replica when none is)."""
        ordered = self.order(adapter_id)
        return next((r for r in ordered if r.healthy), ordered[0])

    def load_bound(self) -> int:
        """The most in-flight generations a healthy replica may hold when it takes one more:
        ``ceil(c * (total in flight + 1) / healthy replicas)``."""
        healthy = [r for r in self.replicas if r.healthy] or self.replicas
        total = sum(r.in_flight for r in healthy) + 1
        return max(1, math.ceil(self.load_factor * total / len(healthy)))

    def candidates(self, adapter_id: str | None) -> list[tuple[Replica, str]]:
        """Replicas to try for a request, in order, each with the decision it stands for: healthy
        ones first (see the module docstring), then the ejected ones as a last resort."""
        if adapter_id is None:
            healthy = [r for r in self.replicas if r.healthy]
            self._base_turn += 1  # ties go round the replicas instead of always to the first
            n = len(self.replicas)
            healthy.sort(key=lambda r: (r.in_flight, (self.replicas.index(r) - self._base_turn) % n))
            first = [(r, "least_loaded") for r in healthy]
            rest = [r for r in self.replicas if not r.healthy]
            return first + [(r, "failover") for r in rest]
        ordered = self.order(adapter_id)
        healthy = [r for r in ordered if r.healthy]
        bound = self.load_bound()
        under = [r for r in healthy if r.in_flight + 1 <= bound]
        over = [r for r in healthy if r.in_flight + 1 > bound]
        home_fits = bool(under) and under[0] is healthy[0]  # the home (or its failover) within the bound
        first, rest = (under[:1], under[1:]) if home_fits else ([], under)
        spills = self.spill_order(adapter_id, rest)
        result: list[tuple[Replica, str]] = []
        for replica in first + spills + over:
            if replica is ordered[0]:
                decision = "home"
            elif replica is healthy[0] and replica in under:
                decision = "failover"  # the home is out of the ring; this is the next in order
            elif adapter_id in replica.residency:
                decision = "spill_holder"
            else:
                decision = "spill"
            result.append((replica, decision))
        result += [(r, "failover") for r in ordered if not r.healthy]
        return result

    @staticmethod
    def spill_order(adapter_id: str, replicas: list[Replica]) -> list[Replica]:
        """``replicas`` (in the adapter's hash order) reordered for a spill: those that hold the
        adapter by their ``Residency`` first, the most recently used there first (smallest stack
        distance: device before host), then the others in hash order."""
        holders = [r for r in replicas if adapter_id in r.residency]
        others = [r for r in replicas if adapter_id not in r.residency]
        if len(holders) > 1:  # distances cost O(distance): only when there is a choice
            holders.sort(key=lambda r: r.residency.distance(adapter_id))  # stable: ties keep the hash order
        return holders + others

    # ------------------------------------------------------------------ health
    def eject(self, replica: Replica, why: str) -> None:
        """Take ``replica`` out of the ring (no-op when it is out already)."""
        if replica.healthy:
            replica.healthy = False
            replica.residency.clear()  # it may come back restarted, holding nothing
            self.metrics.ejections.labels(replica.url).inc()
            log.warning("inference replica %s taken out of the ring: %s", replica.url, why)

    def restore(self, replica: Replica) -> None:
        """Put ``replica`` back into the ring."""
        if not replica.healthy:
            replica.healthy = True
            log.info("inference replica %s is back in the ring", replica.url)

    async def probe(self) -> None:
        """Probe every replica's ``/readyz`` once; eject those that fail, restore those that answer."""

        async def one(replica: Replica) -> None:
            try:
                ready = await asyncio.wait_for(replica.client.is_ready(), PROBE_TIMEOUT_S)
            except Exception:  # a timeout too
                ready = False
            if ready:
                self.restore(replica)
            else:
                self.eject(replica, "its readiness probe failed")

        await asyncio.gather(*(one(r) for r in self.replicas))

    def start_probing(self) -> None:
        """Probe in the background every ``probe_interval_s`` seconds (on the running loop)."""
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever(), name="replica-probes")

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe()
            except Exception:  # never let the prober die
                log.exception("probing inference replicas failed")
            await asyncio.sleep(self.probe_interval_s)

    # ------------------------------------------------------------------ InferenceBackend
    async def start(self, req: GenerateRequest) -> RoutedEvents:
        """Submit ``req`` on the first candidate replica that takes it (see ``candidates``).
        422 and deadline refusals are raised at once; an unreachable, 503 or 429 replica passes
        the request on (an unreachable one is ejected); the last refusal is raised when every
        replica refused."""
        adapter_id = req.adapter.id if req.adapter is not None else None
        last: InferenceError | None = None
        for replica, decision in self.candidates(adapter_id):
            replica.in_flight += 1
            try:
                events = await replica.client.start(req)
            except InferenceError as exc:
                replica.in_flight -= 1
                if exc.status not in (429, 503) or exc.is_deadline:
                    raise
                if exc.reason == UNREACHABLE_REASON:
                    self.eject(replica, "; ".join(exc.problems))
                self.metrics.retries.labels(replica.url).inc()
                last = exc
                continue
            except BaseException:
                replica.in_flight -= 1
                raise
            self.metrics.decisions.labels(replica.url, decision).inc()
            if adapter_id is not None:
                replica.residency.touch(adapter_id)
            return RoutedEvents(self, replica, events)
        assert last is not None
        raise last

    async def generate(self, req: GenerateRequest) -> GenerationEnded:
        """Run ``req`` to the end on its replica (InferenceError 503 if it failed)."""
        return await run_to_end(await self.start(req))

    async def prefetch(self, spec: AdapterSpec) -> str:
        """Warm ``spec`` on its home replica; the tier it reached there."""
        home = self.home(spec.id)
        tier = await home.client.prefetch(spec)
        home.residency.touch(spec.id)
        return tier

    async def drop_adapter(self, adapter_id: str, timeout: float | None = 60.0) -> bool:
        """Drop the adapter on every replica (any may hold it); True if any held it. A replica
        that cannot be reached holds nothing it could serve; TimeoutError if one's in-flight
        requests outlast ``timeout``; InferenceError only when no replica answered."""
        for replica in self.replicas:
            replica.residency.forget(adapter_id)
        results = await asyncio.gather(*(r.client.drop_adapter(adapter_id, timeout) for r in self.replicas),
                                       return_exceptions=True)
        timeouts = [r for r in results if isinstance(r, TimeoutError)]
        if timeouts:
            raise timeouts[0]
        answered = [r for r in results if isinstance(r, bool)]
        if not answered:
            raise next(r for r in results if isinstance(r, BaseException))
        return any(answered)

    async def is_ready(self) -> bool:
        """True when at least one replica answers its readiness probe now (probes all, which also
        updates the ring)."""
        await self.probe()
        return any(r.healthy for r in self.replicas)

    async def aclose(self) -> None:
        """Stop probing and close every client."""
        if self._prober is not None:
            self._prober.cancel()
            try:
                await self._prober
            except asyncio.CancelledError:
                pass
            self._prober = None
        await asyncio.gather(*(r.client.aclose() for r in self.replicas))
