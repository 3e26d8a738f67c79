"""benchmarks/replica_routing.py end to end on tiny settings: a well-formed report whose counts add
up, affinity routing through the api's router against round-robin on the same trace."""

from __future__ import annotations

import json
import tempfile
from collections import Counter

from benchmarks import replica_routing


def test_zipf_trace_is_popular_and_reproducible():
    trace = replica_routing.zipf_trace(5000, 50, 1.0, seed=3)
    assert trace == replica_routing.zipf_trace(5000, 50, 1.0, seed=3)
    counts = Counter(trace).most_common()
    assert set(trace) <= set(range(50))
    # rank 1 draws 1/H(50) = 22% of a Zipf(1) trace, rank 2 half that
    assert 0.19 < counts[0][1] / 5000 < 0.25 and 1.6 < counts[0][1] / counts[1][1] < 2.5


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
    assert set(rows) == {"affinity", "round_robin"}
    for row in rows.values():
        assert row["requests"] == 240 == sum(row["per_replica_requests"])
        assert row["device_hits"] + row["device_misses"] >= 240  # one admission or more per request
        assert row["output_tokens"] == 2 * 240
    assert rows["round_robin"]["per_replica_requests"] == [120, 120]
    decisions = rows["affinity"]["router_decisions"]
    assert decisions["home"] + decisions["spill"] == 240 and decisions["home"] > decisions["spill"]
    # 24 adapters, room for about 4 to 6 on each replica: round-robin makes both replicas cache the
    # same popular few; affinity splits the adapters, so the two tiers hold twice as many
    assert rows["affinity"]["device_hit_rate"] > 1.2 * rows["round_robin"]["device_hit_rate"]
    assert report["hit_rate_ratio"] == rows["affinity"]["device_hit_rate"] / rows["round_robin"]["device_hit_rate"]
    assert list(scratch.iterdir()) == []
