"""benchmarks/replica_routing.py end to end on tiny settings: a well-formed report whose counts add
up, affinity routing through the api's router against round-robin on the same trace."""

from __future__ import annotations

import json
import tempfile
from collections import Counter, OrderedDict

import numpy as np
import pytest

from benchmarks import replica_routing, replica_routing_model


def test_zipf_trace_is_popular_and_reproducible():
    trace = replica_routing_model.zipf_trace(5000, 50, 1.0, seed=3)
    assert trace == replica_routing_model.zipf_trace(5000, 50, 1.0, seed=3)
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
    popularity, _trace = replica_routing_model.zipf_draw(10, 100, s, seed=1)
    assert popularity.sum() == pytest.approx(1.0)
    che = replica_routing_model.lru_hit_rate(popularity, 20)
    assert che == pytest.approx(_simulated_lru_hit_rate(popularity, 20, 40_000, seed=2), abs=0.02)
    assert che < replica_routing_model.ideal_hit_rate(popularity, 20) == pytest.approx(np.sort(popularity)[-20:].sum())
    assert replica_routing_model.lru_hit_rate(np.full(10, 0.1), 20) == 1.0  # everything fits
    homes = [i % 2 for i in range(100)]
    model = replica_routing_model.steady_state_model(popularity, homes, 2, 20)
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


def test_load_balance_figures():
    assert replica_routing_model.request_imbalance([100, 100]) == 1.0
    assert replica_routing_model.request_imbalance([150, 50]) == 1.5
    assert replica_routing_model.mm1_wait_ratio([100, 100], 0.7) == pytest.approx(1.0)
    # at rho 0.7 a 60/40 split puts one replica at 0.84: (0.6 * 0.84/0.16 + 0.4 * 0.56/0.44) / (0.7/0.3)
    assert replica_routing_model.mm1_wait_ratio([60, 40], 0.7) == pytest.approx((0.6 * 0.84 / 0.16 + 0.4 * 0.56 / 0.44) / (0.7 / 0.3))
    assert replica_routing_model.mm1_wait_ratio([75, 25], 0.7) == float("inf")  # 0.7 * 2 * 0.75 >= 1


def test_load_factors_parse_sorted_and_above_one():
    args = replica_routing.parse_args(["--load-factors", "2.0,1.25,1.5,1.25", "--replicas", "2"])
    assert args.load_factors == (1.25, 1.5, 2.0)
    assert replica_routing.swept_factors(args) == (1.25, 1.5)  # c >= replicas is no bound: the unbounded policy
    assert replica_routing.policies(args) == ("affinity_c1.25", "affinity_c1.5", "affinity_unbounded", "round_robin")
    assert replica_routing.load_factor_of("affinity_c1.5", args) == 1.5
    assert replica_routing.load_factor_of("affinity_unbounded", args) == 2.0
    for bad in ("1.0,1.5", "x", ""):
        with pytest.raises(SystemExit):
            replica_routing.parse_args(["--load-factors", bad])


def test_load_factor_sweep_reports_hit_rate_spills_and_balance_per_c(tmp_path):
    """``--load-factors``: one affinity policy per c below the replica count, each with its hit
    rate, ratio to round-robin, spill fraction and load-balance figures; a looser bound spills no
    more and the unbounded router not at all."""
    out = tmp_path / "routing.json"
    assert replica_routing.main(["--adapters", "24", "--room", "4", "--num-requests", "160", "--zipf", "1.0",
                                 "--concurrency", "4", "--max-num-seqs", "4", "--max-tokens", "1",
                                 "--repeats", "1", "--load-factors", "1.25,1.75,2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sweep = {r["policy"]: r for r in report["load_factor_sweep"]}
    assert list(sweep) == ["affinity_c1.25", "affinity_c1.75", "affinity_unbounded", "round_robin"]
    assert [sweep[p]["load_factor"] for p in sweep] == [1.25, 1.75, 2.0, None]
    rows = {r["policy"]: r for r in report["results"]}
    for name, row in sweep.items():
        decisions = rows[name]["router_decisions"]
        spilled = (decisions["spill"] + decisions["spill_holder"]) / 160 if decisions else 0.0
        assert row["spill_fraction"] == spilled
        assert row["hit_rate_ratio"] == pytest.approx(row["device_hit_rate"] / sweep["round_robin"]["device_hit_rate"])
        assert 1.0 <= row["request_imbalance"] <= 2.0 and row["mm1_wait_ratio"] >= 1.0 - 1e-9
        assert 1.0 <= row["load_imbalance"] <= 2.0 and 1.0 <= row["admit_load_ratio_p99"] <= 2.0
        assert 1 <= row["peak_in_flight"] <= 4
        assert len(rows[name]["mean_in_flight"]) == 2
    assert sweep["affinity_unbounded"]["spill_fraction"] == 0.0 < sweep["affinity_c1.25"]["spill_fraction"]
    # four clients over two replicas: at most 3 others in flight at a decision, so the bound
    # ceil(c * 4 / 2) is 3 at c=1.25 (a home holding all 3 spills) and 4 at c=1.75 (never binds)
    assert sweep["affinity_c1.75"]["spill_fraction"] == 0.0
    assert sweep["round_robin"]["request_imbalance"] == 1.0 and sweep["round_robin"]["hit_rate_ratio"] == 1.0
    assert report["hit_rate_ratio"] == report["hit_rate_ratios"]["affinity_c1.25"]
