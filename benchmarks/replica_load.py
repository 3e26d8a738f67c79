"""The routing policies ``benchmarks.replica_routing`` compares besides the api's router, and the
load figures it takes around any policy: ``RoundRobin``, ``HashOrderSpill`` (the router without its
holder preference) and ``LoadTracker`` (each replica's generations in flight over time)."""

from __future__ import annotations

import itertools
import time

import numpy as np

from api.replicas import ReplicaRouter
from inference.service.core import InferenceCore
from inference.service.events import is_terminal
from inference.service.protocol import GenerateRequest


class HashOrderSpill(ReplicaRouter):
    """The router with its spill in plain hash order: the next under-bound replica, whether it
    holds the adapter or not (the ablation of the holder preference)."""

    @staticmethod
    def spill_order(adapter_id: str, replicas: list) -> list:
        return list(replicas)


class LoadTracker:
    """Each replica's generations in flight over time, for any policy: the replicas' backends
    are wrapped (``backend``) so that a generation counts from its start until its last event
    or its stream's close. See the module docstring for the figures (``summary``)."""

    def __init__(self, replicas: int):
        self.in_flight = [0] * replicas
        self.area = [0.0] * replicas  # integral of in-flight over time, per replica
        self.admit_ratios: list[float] = []
        self.latencies: list[float] = []
        self.peak = 0
        self._since: float | None = None
        self._first: float | None = None

    def _advance(self) -> float:
        now = time.perf_counter()
        if self._since is not None:
            for i, n in enumerate(self.in_flight):
                self.area[i] += n * (now - self._since)
        else:
            self._first = now
        self._since = now
        return now

    def admit(self, replica: int) -> float:
        now = self._advance()
        self.in_flight[replica] += 1
        self.peak = max(self.peak, self.in_flight[replica])
        self.admit_ratios.append(self.in_flight[replica] * len(self.in_flight) / sum(self.in_flight))
        return now

    def finish(self, replica: int, started: float) -> None:
        now = self._advance()
        self.in_flight[replica] -= 1
        self.latencies.append(now - started)

    def backend(self, replica: int, core: InferenceCore) -> _Tracked:
        return _Tracked(self, replica, core)

    def summary(self) -> dict:
        span = (self._since - self._first) if self._first is not None and self._since is not None else 0.0
        means = [a / span for a in self.area] if span > 0 else [0.0] * len(self.area)
        overall = sum(means) / len(means)
        return {"mean_in_flight": means, "load_imbalance": max(means) / overall if overall else 1.0,
                "admit_load_ratio_p99": float(np.percentile(self.admit_ratios, 99)) if self.admit_ratios else 1.0,
                "admit_load_ratio_mean": float(np.mean(self.admit_ratios)) if self.admit_ratios else 1.0,
                "peak_in_flight": self.peak,
                "latency_p50_s": float(np.percentile(self.latencies, 50)) if self.latencies else 0.0,
                "latency_p99_s": float(np.percentile(self.latencies, 99)) if self.latencies else 0.0}


class _Tracked:
    """A replica's backend as the policies see it: ``start`` counts the generation in."""

    def __init__(self, tracker: LoadTracker, replica: int, core: InferenceCore):
        self._tracker, self._replica, self._core = tracker, replica, core

    async def start(self, req: GenerateRequest) -> _TrackedEvents:
        events = await self._core.start(req)
        return _TrackedEvents(self._tracker, self._replica, events, self._tracker.admit(self._replica))


class _TrackedEvents:
    """The replica's events, counting the generation out at its terminal event or close."""

    def __init__(self, tracker: LoadTracker, replica: int, events, started: float):
        self._tracker, self._replica, self._events, self._started = tracker, replica, events, started
        self._open = True

    def __aiter__(self) -> _TrackedEvents:
        return self

    async def __anext__(self):
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            self._done()
            raise
        if is_terminal(event):
            self._done()
        return event

    def _done(self) -> None:
        if self._open:
            self._open = False
            self._tracker.finish(self._replica, self._started)

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            self._done()


class RoundRobin:
    """The baseline: each request to the next replica in turn."""

    def __init__(self, cores: list):
        self._next = itertools.cycle(cores)

    async def start(self, req: GenerateRequest):
        return await next(self._next).start(req)
