"""The steady-state model behind ``benchmarks.replica_routing``: Zipf popularity, the hit rates of
a device tier of ``room`` adapters (ideal and LRU, by Che's approximation) under affinity and
round-robin, and the queueing cost of an uneven split of requests (M/M/1). Pure numbers, no
engine."""

from __future__ import annotations

import numpy as np


def zipf_draw(n: int, num_adapters: int, s: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probability of each adapter index, ``n`` drawn adapter indices): rank k (1-based) has
    probability proportional to ``1/k**s``, the ranks assigned to ids in a random order
    (popularity does not follow the id)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_adapters + 1) ** s
    p = weights / weights.sum()
    ranks = rng.choice(num_adapters, size=n, p=p)
    ids = rng.permutation(num_adapters)
    popularity = np.empty(num_adapters)
    popularity[ids] = p
    return popularity, ids[ranks]


def zipf_trace(n: int, num_adapters: int, s: float, seed: int) -> list[int]:
    """``n`` adapter indices drawn Zipf-popular (see ``zipf_draw``)."""
    return [int(i) for i in zipf_draw(n, num_adapters, s, seed)[1]]


def ideal_hit_rate(p: np.ndarray, room: int) -> float:
    """Steady-state hit rate of a cache of ``room`` items under independent requests with
    probabilities ``p`` (summing to 1) when it holds the ``room`` most popular: the best any
    cache policy reaches on such requests."""
    return float(np.sort(p)[::-1][:room].sum())


def lru_hit_rate(p: np.ndarray, room: int) -> float:
    """Steady-state hit rate of an LRU cache of ``room`` items under independent requests with
    probabilities ``p`` (summing to 1), by Che's approximation: the characteristic time T solves
    sum(1 - exp(-p T)) = room, and an item hits with probability 1 - exp(-p T)."""
    p = p[p > 0]
    if len(p) <= room:
        return 1.0
    lo, hi = 0.0, 1.0
    while np.sum(1 - np.exp(-p * hi)) < room:
        hi *= 2
    for _ in range(200):  # bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.sum(1 - np.exp(-p * mid)) < room else (lo, mid)
    return float(np.sum(p * (1 - np.exp(-p * hi))))


def steady_state_model(popularity: np.ndarray, homes: list[int], replicas: int, room: int) -> dict:
    """Device-tier hit rates in steady state for affinity without spills (replica r serves the
    adapters whose home is r, a cache of ``room`` for its share) and round-robin (every replica
    serves the whole popularity with a cache of ``room``), ideal and LRU; and the ratios.
    ``homes``: each adapter index's home replica."""
    homes_array = np.asarray(homes)

    def affinity(hit_rate) -> float:
        total = 0.0
        for r in range(replicas):
            share = popularity[homes_array == r]
            if share.sum() > 0:
                total += share.sum() * hit_rate(share / share.sum(), room)
        return total

    model = {"ideal_affinity": affinity(ideal_hit_rate), "lru_affinity": affinity(lru_hit_rate),
             "ideal_round_robin": ideal_hit_rate(popularity, room), "lru_round_robin": lru_hit_rate(popularity, room),
             f"top_{room}_share": ideal_hit_rate(popularity, room),
             f"top_{replicas * room}_share": ideal_hit_rate(popularity, replicas * room)}
    model = {key: float(value) for key, value in model.items()}
    model["ceiling_ratio"] = model["ideal_affinity"] / model["lru_round_robin"]
    model["ideal_ratio"] = model["ideal_affinity"] / model["ideal_round_robin"]
    model["lru_ratio"] = model["lru_affinity"] / model["lru_round_robin"]
    return model


def request_imbalance(per_replica_requests: list[int]) -> float:
    """The most requests one replica served over the mean per replica."""
    mean = sum(per_replica_requests) / len(per_replica_requests)
    return max(per_replica_requests) / mean if mean else 1.0


def mm1_wait_ratio(per_replica_requests: list[int], rho: float) -> float:
    """Request-weighted mean M/M/1 waiting time with the replicas at fleet utilization ``rho``
    split as measured (replica r at rho * n * share_r), over the same with an even split
    (rho / (1 - rho)); inf when a replica's utilization reaches 1."""
    n, total = len(per_replica_requests), sum(per_replica_requests)
    wait = 0.0
    for count in per_replica_requests:
        share = count / total
        u = rho * n * share
        if u >= 1:
            return float("inf")
        wait += share * u / (1 - u)
    return wait / (rho / (1 - rho))
