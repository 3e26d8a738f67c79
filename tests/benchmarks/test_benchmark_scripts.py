"""The benchmark scripts run end to end on tiny settings and write well-formed reports."""

import json
import tempfile

from benchmarks import adapter_scaling, decode_step


def test_decode_step_smoke(tmp_path):
    out = tmp_path / "decode.json"
    assert decode_step.main(["--preset", "tiny", "--batches", "1,3", "--iters", "1", "--context", "40",
                             "--page-tokens", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 3]
    assert all(r["step_ms"] > 0 and 0 < r["floor_ms"] for r in report["results"])
    assert report["bandwidth_bytes_per_s"] > 0 and report["weight_bytes"] > 0


def test_adapter_scaling_smoke(tmp_path, monkeypatch):
    out = tmp_path / "scaling.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where its store and adapter files go
    assert adapter_scaling.main(["--num-requests", "4", "--adapters", "0,1,3", "--max-output", "3",
                                 "--min-output", "2", "--max-input", "10", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["adapters"]: r for r in report["results"]}
    assert set(rows) == {0, 1, 3}
    # the same 4 requests in every row, each generating exactly its 2..3 requested tokens
    assert len({r["output_tokens"] for r in rows.values()}) == 1 and 8 <= rows[0]["output_tokens"] <= 12
    assert rows[1]["distinct_used"] == 1 and rows[0]["distinct_used"] == 0
    assert all(len(r["wall_s_all_rounds"]) == 2 and r["wall_s"] in r["wall_s_all_rounds"] for r in rows.values())
    assert all(len(r["host_misses_all_rounds"]) == 2 and r["host_misses"] in r["host_misses_all_rounds"] for r in rows.values())
    # every round ran every count once; the paired ratios divide the same round's walls
    assert len(report["round_orders"]) == 2 and all(sorted(o) == [0, 1, 3] for o in report["round_orders"])
    for r in rows.values():
        assert r["ratio_vs_one_adapter_rounds"] == [o / w for o, w in zip(rows[1]["wall_s_all_rounds"],
                                                                          r["wall_s_all_rounds"])]
        assert r["ratio_vs_one_adapter_best"] == min(rows[1]["wall_s_all_rounds"]) / min(r["wall_s_all_rounds"])
    assert list(scratch.iterdir()) == []  # the object store and adapter files are removed


def test_cpu_gemm_rows_smoke(tmp_path):
    from benchmarks import cpu_gemm_rows

    out = tmp_path / "gemm.json"
    assert cpu_gemm_rows.main(["--preset", "tiny", "--rows", "1-3,8", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["rows"] for r in report["results"]] == [1, 2, 3, 8]
    assert [r["padded_rows"] for r in report["results"]] == [2, 2, 3, 8]
    assert all(set(r["ms"]) == {"F.linear", "weight-left", "engine"} and min(r["ms"].values()) > 0
               for r in report["results"])


def test_http_path_smoke(tmp_path, tiny_checkpoint):
    from benchmarks import http_path

    out = tmp_path / "http.json"
    assert http_path.main(["--model", str(tiny_checkpoint), "--concurrency", "3", "--max-tokens", "2",
                           "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for side in ("http", "inprocess"):
        runs = report["rounds"][side]
        assert len(runs) == 2 and all(1 <= r["completion_tokens"] <= 6 and r["wall_s"] > 0 for r in runs)
        assert all(r["steps"] >= 1 and 1 <= r["mean_batch"] <= 3 for r in runs)
    rates = {side: [r["completion_tokens"] / r["wall_s"] for r in report["rounds"][side]] for side in ("http", "inprocess")}
    assert report["ratio_per_round"] == [h / i for h, i in zip(rates["http"], rates["inprocess"])]


def test_compare_revisions_smoke(tmp_path, tiny_checkpoint):
    """Two revisions (here HEAD against itself, from a worktree) run alternately; each round's
    figures are kept per revision."""
    from benchmarks import compare_revisions

    out = tmp_path / "compare.json"
    assert compare_revisions.main([
        "--base", "HEAD", "--rounds", "2", "--out", str(out), "engine_vs_hf", "--model", str(tiny_checkpoint),
        "--num-requests", "2", "--min-output", "2", "--max-output", "3", "--max-input", "10", "--skip-hf",
        "--repeats", "1", "--warmup-requests", "1",
    ]) == 0
    report = json.loads(out.read_text())
    [row] = report["figures"]
    assert row["figure"] == "engine tokens/s" and report["base"] == "HEAD"
    assert len(row["base_rounds"]) == 2 and len(row["head_rounds"]) == 2
    assert all(x > 0 for x in row["base_rounds"] + row["head_rounds"])
    assert row["head_over_base"] == row["head"] / row["base"]


def test_tenant_fairness_smoke(tmp_path, tiny_checkpoint):
    """The three phases through a real server at toy sizes: every light chat answered in A and B,
    the same trace replayed, tokens served to both tenants in C (weights applied, or the missing
    endpoint named)."""
    from benchmarks import tenant_fairness

    out = tmp_path / "fairness.json"
    assert tenant_fairness.main([
        "--model", str(tiny_checkpoint), "--max-tokens", "3", "--heavy-users", "2",
        "--capacity-warmup-s", "0.5", "--capacity-seconds", "1", "--capacity-concurrency", "4",
        "--light-requests", "4", "--light-rate", "4", "--flood-factor", "2", "--heavy-max-outstanding", "8",
        "--flood-warmup-s", "1", "--phase-c-concurrency", "4", "--phase-c-warmup-s", "0.5", "--phase-c-seconds", "1",
        "--phase-c-min-chats", "2", "--out", str(out),
    ]) == 0
    report = json.loads(out.read_text())
    assert report["capacity"]["requests_per_s"] > 0 and report["light_rate"] == 4
    assert report["server_settings"]["TAILOR_RATE_LIMIT_PER_MINUTE"] == "0"
    for phase in ("phase_a", "phase_b"):
        p = report[phase]
        assert p["requests"] == p["ok"] == 4 and not p["failed"]
        assert 0 < p["ttft_p50_s"] <= p["ttft_p95_s"] <= p["ttft_max_s"]
        assert all(0 <= s <= t for s, t in zip(p["start_s"], p["ttft_s"]))
    # the same trace, and no history in the prompts (TAILOR_HISTORY_MAX_MESSAGES=1): the same prompts in A and B
    assert report["phase_a"]["prompt_tokens"] == report["phase_b"]["prompt_tokens"]
    assert report["ttft_p95_ratio_b_over_a"] == report["phase_b"]["ttft_p95_s"] / report["phase_a"]["ttft_p95_s"]
    assert report["phase_b"]["heavy_sent"] >= 1
    c = report["phase_c"]
    assert all(s["chats_completed"] >= 2 and s["completion_tokens"] > 0 and s["prompt_tokens"] > 0
               for s in c["served"].values())
    if c["note"] is None:
        assert c["weights_applied"] == {"heavy": 2.0, "light": 1.0}
    else:
        assert "PATCH /v1/tenants/{id}" in c["note"] and c["weights_applied"] == {"heavy": 1.0, "light": 1.0}
    assert c["weighted_service_ratio"] == c["served"]["heavy"]["weighted_service"] / c["served"]["light"]["weighted_service"]


def test_multi_turn_chat_smoke(tmp_path, tiny_checkpoint):
    """Two engines, the prefix cache on and off, the same turns: the cache-off engine computes
    every prompt token, the cache-on engine reuses pages from the second turn on, and the counts
    add up."""
    from benchmarks import multi_turn_chat

    out = tmp_path / "multi_turn.json"
    assert multi_turn_chat.main(["--model", str(tiny_checkpoint), "--users", "2", "--turns", "3", "--system-tokens", "60",
                                 "--max-tokens", "2", "--history-token-budget", "400", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["requests"]
    assert [(r["turn"], r["user"]) for r in rows] == [(t, u) for t in range(3) for u in range(2)]
    assert [r["first"] for r in rows] == ["on", "off"] * 3  # which engine goes first alternates
    for r in rows:
        assert r["on"]["prompt_tokens"] == r["off"]["prompt_tokens"]  # the same prompts on both sides
        assert r["off"]["computed_tokens"] == r["off"]["prompt_tokens"] and r["off"]["cache_hit_tokens"] == 0
        assert r["on"]["computed_tokens"] + r["on"]["cache_hit_tokens"] == r["on"]["prompt_tokens"]
        assert r["on"]["cache_queried_tokens"] == r["on"]["prompt_tokens"]
        assert r["identical"] == (r["on"]["text"] == r["off"]["text"])
    assert all(r["on"]["cache_hit_tokens"] > 0 for r in rows if r["turn"] >= 1)
    assert all(r["on"]["messages_used"] == 2 * r["turn"] + 1 for r in rows)  # the history comes back each turn
    summary = report["summary"]
    assert summary["identical_answers"] == sum(r["identical"] for r in rows)
    assert summary["computed_fraction_later_turns"]["off"] == 1.0 > summary["computed_fraction_later_turns"]["on"]
    assert report["system_prompt_tokens"] >= 60 and len(report["per_turn"]) == 3
