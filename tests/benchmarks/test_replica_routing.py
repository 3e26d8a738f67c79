"""benchmarks/replica_routing.py end to end on tiny settings: a well-formed report whose counts add
up, affinity routing through the api's router against round-robin on the same trace."""

from __future__ import annotations

import json
import tempfile
from collections import Counter, OrderedDict

import numpy as np
import pytest

from benchmarks import replica_routing


def test_zipf_trace_is_popular_and_reproducible():
    trace = replica_routing.zipf_trace(5000, 50, 1.0, seed=3)
    assert trace == replica_routing.zipf_trace(5000, 50, 1.0, seed=3)
    counts = Counter(trace).most_common()
    assert set(trace) <= set(range(50))
    # rank 1 draws 1/H(50) = 22% of a Zipf(1) trace, rank 2 half that
    assert 0.19 < counts[0][1] / 5000 < 0.25 and 1.6 < counts[0][1] / counts[1][1] < 2.5


def _simulated_lru_hit_rate(p: np.ndarray, room: int, n: int, seed: int) -> float:
    """An LRU cache of ``room`` items fed ``n`` independent requests drawn from ``p``; its hit
    rate over the second half (warm)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for i, item in enumerate(np.random.default_rng(seed).choice(len(p), size=n, p=p)):
        if item in cache:
            cache.move_to_end(item)
            hits += i >= n // 2
        else:
            cache[item] = None
            if len(cache) > room:
                cache.popitem(last=False)
    return hits / (n - n // 2)


@pytest.mark.parametrize("s", [1.0, 0.6])
def test_the_steady_state_model_matches_a_simulated_lru_and_bounds_it(s):
    popularity, _trace = replica_routing.zipf_draw(10, 100, s, seed=1)
    assert popularity.sum() == pytest.approx(1.0)
    che = replica_routing.lru_hit_rate(popularity, 20)
    assert che == pytest.approx(_simulated_lru_hit_rate(popularity, 20, 40_000, seed=2), abs=0.02)
    assert che < replica_routing.ideal_hit_rate(popularity, 20) == pytest.approx(np.sort(popularity)[-20:].sum())
    assert replica_routing.lru_hit_rate(np.full(10, 0.1), 20) == 1.0  # everything fits
    homes = [i % 2 for i in range(100)]
    model = replica_routing.steady_state_model(popularity, homes, 2, 20)
    # two caches of 20 on disjoint halves hold at most the 40 most popular
    assert model["ideal_affinity"] <= model["top_40_share"] + 1e-12
    assert model["lru_affinity"] < model["ideal_affinity"] and model["lru_round_robin"] == che
    assert model["ceiling_ratio"] == model["ideal_affinity"] / che > model["lru_ratio"] > 1


def test_replica_routing_smoke(tmp_path, monkeypatch):
    out = tmp_path / "routing.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert replica_routing.main(["--adapters", "24", "--room", "4", "--num-requests", "240", "--zipf", "0.3",
                                 "--concurrency", "2", "--max-num-seqs", "2", "--max-tokens", "2",
                                 "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["policy"]: r for r in report["results"]}
    assert set(rows) == {"affinity", "affinity_unbounded", "round_robin"}
    for row in rows.values():
        assert row["requests"] == 240 == sum(row["per_replica_requests"])
        assert row["device_hits"] + row["device_misses"] >= 240  # one admission or more per request
        assert row["output_tokens"] == 2 * 240
    assert rows["round_robin"]["per_replica_requests"] == [120, 120]
    decisions = rows["affinity"]["router_decisions"]
    spills = decisions["spill"] + decisions["spill_holder"]
    assert decisions["home"] + spills == 240 and decisions["home"] > spills
    assert rows["affinity_unbounded"]["router_decisions"] == {"home": 240, "spill": 0, "spill_holder": 0}
    assert report["hit_rate_ratio_unbounded"] == report["hit_rate_ratios"]["affinity_unbounded"]
    model = report["steady_state_model"]
    assert model["ideal_affinity"] <= model["top_8_share"] + 1e-12 and model["ceiling_ratio"] > model["lru_ratio"]
    # 24 adapters, room for about 4 to 6 on each replica: round-robin makes both replicas cache the
    # same popular few; affinity splits the adapters, so the two tiers hold twice as many
    assert rows["affinity"]["device_hit_rate"] > 1.2 * rows["round_robin"]["device_hit_rate"]
    assert report["hit_rate_ratio"] == rows["affinity"]["device_hit_rate"] / rows["round_robin"]["device_hit_rate"]
    assert list(scratch.iterdir()) == []


def test_compare_spill_adds_the_hash_order_ablation(tmp_path):
    """Three replicas, ``--compare-spill``: the router without the holder preference runs too,
    and the holder preference's spills are found by the decisions' split."""
    out = tmp_path / "routing.json"
    assert replica_routing.main(["--adapters", "12", "--room", "2", "--replicas", "3", "--num-requests", "90",
                                 "--zipf", "1.0", "--concurrency", "3", "--max-num-seqs", "2", "--max-tokens", "1",
                                 "--repeats", "1", "--compare-spill", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["policy"]: r for r in report["results"]}
    assert list(rows) == ["affinity", "affinity_unbounded", "affinity_hash_spill", "round_robin"]
    for name in ("affinity", "affinity_hash_spill"):
        assert sum(rows[name]["router_decisions"].values()) == 90 == sum(rows[name]["per_replica_requests"])
    assert set(report["hit_rate_ratios"]) == {"affinity", "affinity_unbounded", "affinity_hash_spill"}
