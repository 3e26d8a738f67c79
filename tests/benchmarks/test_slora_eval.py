"""S-LoRA's evaluation harness: trace files, open-loop replay and its statistics, the one command."""

import json
import math
import time

import numpy as np
import pytest

from benchmarks import slora_eval
from benchmarks.open_loop import RequestTiming, markdown_table, replay_in_process, summarize_run
from benchmarks.trace import Trace, load_trace, save_trace, synthetic_trace
from inference import LLM


def _trace(num_adapters, **kwargs):
    options = dict(rate=20.0, duration_s=5.0, ranks=(8, 16, 32, 64), input_len_range=(4, 40),
                   output_len_range=(2, 9), seed=7, vocab=500)
    options.update(kwargs)
    return synthetic_trace(num_adapters, **options)


def test_traces_with_other_adapter_counts_replay_the_same_lengths_and_arrivals():
    base, many = _trace(0), _trace(100)
    assert len(base.requests) == len(many.requests) > 50
    for a, b in zip(base.requests, many.requests):
        assert (a.prompt_token_ids, a.output_len, a.arrival_time) == (b.prompt_token_ids, b.output_len, b.arrival_time)
    assert all(r.adapter is None for r in base.requests) and base.num_adapters == 0
    assert all(0 <= r.adapter < 100 for r in many.requests)
    assert set(many.adapter_ranks) <= {8, 16, 32, 64} and len(set(many.adapter_ranks)) == 4
    assert all(4 <= r.input_len <= 40 and 2 <= r.output_len <= 9 for r in many.requests)
    arrivals = [r.arrival_time for r in many.requests]
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] <= 5.0


def test_arrivals_follow_the_rate_and_popularity_the_power_law():
    trace = _trace(10, rate=50.0, duration_s=200.0, alpha=0.3, input_len_range=(1, 2), output_len_range=(1, 2))
    assert abs(len(trace.requests) / 200.0 - 50.0) < 2.5  # 10,000 arrivals: within ~3.5 sigma
    counts = np.bincount([r.adapter for r in trace.requests], minlength=10) / len(trace.requests)
    expected = [((i + 1) / 10) ** 0.3 - (i / 10) ** 0.3 for i in range(10)]
    assert np.allclose(counts, expected, atol=0.02)


def test_a_trace_file_round_trips_and_a_bad_one_is_refused(tmp_path):
    trace = _trace(5)
    loaded = load_trace(save_trace(trace, tmp_path / "t.json"))
    assert loaded == trace
    document = json.loads((tmp_path / "t.json").read_text())
    document["requests"][0]["adapter"] = 5
    (tmp_path / "bad.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="uses adapter 5"):
        load_trace(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="not a version-1 trace"):
        load_trace(tmp_path / "other.json")


def test_run_statistics_against_a_hand_computation():
    rng = np.random.default_rng(int(time.time_ns() % 2**32))
    timings = []
    for i in range(40):
        ttft = float(rng.uniform(0.1, 3.0))
        timings.append(RequestTiming(i, arrival_s=i * 0.5, first_token_s=ttft, latency_s=ttft + float(rng.uniform(0, 2)),
                                     output_tokens=int(rng.integers(1, 20))))
    timings[3].error, timings[3].latency_s = "boom", None
    summary = summarize_run(timings, slo_ttft_s=1.5)
    ok = [t for t in timings if t.error is None]
    span = max(t.arrival_s + t.latency_s for t in ok) - 0.0
    assert summary["failed"] == 1 and summary["span_s"] == pytest.approx(span)
    assert summary["requests_per_s"] == pytest.approx(39 / span)
    assert summary["output_tokens_per_s"] == pytest.approx(sum(t.output_tokens for t in ok) / span)
    assert summary["slo_attainment"] == pytest.approx(sum(t.first_token_s <= 1.5 for t in ok) / 40)
    ttfts = sorted(t.first_token_s for t in ok)
    rank = 0.5 * (len(ttfts) - 1)  # the median by linear interpolation between closest ranks
    lo = math.floor(rank)
    assert summary["ttft_s"]["p50"] == pytest.approx(ttfts[lo] + (rank - lo) * (ttfts[lo + 1] - ttfts[lo]))
    assert summary["latency_s"]["mean"] == pytest.approx(sum(t.latency_s for t in ok) / 39)
    table = markdown_table([summary], [("rps", "requests_per_s", ".2f"), ("p50", "ttft_s.p50", ".2f"), ("x", "nope", "d")])
    assert table.splitlines()[2] == f"| {39 / span:.2f} | {summary['ttft_s']['p50']:.2f} | - |"


def test_open_loop_replay_submits_at_arrival_times(tiny_checkpoint, tmp_path):
    from benchmarks.synthetic_adapters import synthetic_adapter

    trace = _trace(2, rate=8.0, duration_s=1.0, ranks=(4, 8))
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=16 << 20, max_lora_rank=8) as llm:
        config = llm.engine.model_config
        for i, rank in enumerate(trace.adapter_ranks):
            llm.register_adapter(f"a{i}", synthetic_adapter(tmp_path / f"a{i}", config, r=rank, targets=("q_proj",),
                                                            alpha=8.0, seed=i))
        finished = []
        started = time.monotonic()
        timings = replay_in_process(llm, trace, lambda i: f"a{i}", progress=finished.append)
        wall = time.monotonic() - started
    assert len(finished) == len(trace.requests) and all(t.ok for t in timings)
    assert [t.output_tokens for t in timings] == [r.output_len for r in trace.requests]
    assert all(0 < t.first_token_s <= t.latency_s for t in timings)
    assert wall >= trace.requests[-1].arrival_time  # nothing was sent before its time


def test_the_peft_baseline_serves_every_request_open_loop(tiny_checkpoint, tmp_path):
    from benchmarks.peft_baseline import PeftServer
    from benchmarks.synthetic_adapters import synthetic_adapter
    from inference.model_config import ModelConfig

    trace = _trace(3, rate=10.0, duration_s=1.0, ranks=(4, 8))
    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    paths = {i: synthetic_adapter(tmp_path / f"a{i}", config, r=rank, targets=("q_proj", "v_proj"), alpha=8.0, seed=i)
             for i, rank in enumerate(trace.adapter_ranks)}
    server = PeftServer(tiny_checkpoint)
    finished = []
    started = time.monotonic()
    timings = server.replay(trace, paths.__getitem__, max_batch=4, progress=finished.append)
    assert time.monotonic() - started >= trace.requests[-1].arrival_time
    assert len(finished) == len(trace.requests) and all(t.ok for t in timings)
    assert [t.output_tokens for t in timings] == [r.output_len for r in trace.requests]
    assert all(0 < t.first_token_s <= t.latency_s for t in timings)
    assert server.loaded == {f"a{r.adapter}" for r in trace.requests}


def test_peft_mixed_batches_apply_each_rows_adapter(tiny_checkpoint, tmp_path):
    """The baseline's mixed batch gives every row the greedy tokens of its own adapter alone."""
    from benchmarks.peft_baseline import PeftServer
    from benchmarks.synthetic_adapters import synthetic_adapter
    from inference.model_config import ModelConfig

    config = ModelConfig.from_checkpoint(tiny_checkpoint)
    server = PeftServer(tiny_checkpoint)
    names = [server.adapter(i, synthetic_adapter(tmp_path / f"a{i}", config, r=8, targets=("q_proj", "v_proj"),
                                                 alpha=64.0, seed=i, std=0.3)) for i in range(2)]
    prompts = [[5, 9, 14, 30], [7, 7, 21]]
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=16 << 20) as llm:
        for i in range(2):
            llm.register_adapter(names[i], tmp_path / f"a{i}")
        from inference import SamplingParams

        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        tailor = [o.token_ids for o in llm.generate(prompts, params, adapters=names)]
    mixed = server.generate(prompts, [5, 5], names)[1]
    alone = [server.generate([p], [5], [n])[1][0] for p, n in zip(prompts, names)]
    base = server.generate(prompts, [5, 5], ["__base__", "__base__"])[1]
    assert mixed == alone == tailor
    assert base != mixed  # the adapters change the answers, so the comparison means something


def test_the_one_command_writes_tables_json_traces_and_plots(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert slora_eval.main(["--model", str(tiny_checkpoint), "--adapters", "0,3", "--ranks", "4,8", "--rate", "6",
                            "--duration-s", "0.8", "--input", "4,12", "--output", "2,4", "--rates", "4,8",
                            "--sweep-adapters", "2", "--out-dir", str(out)]) == 0
    report = json.loads((out / "slora_eval-cpu.json").read_text())
    rows = report["rows"]
    assert [(r["system"], r["adapters"]) for r in rows] == [("tailor", 0), ("peft", 0), ("tailor", 3), ("peft", 3)]
    assert [(r["system"], r["rate"]) for r in report["rate_sweep"]] == [("tailor", 4.0), ("peft", 4.0),
                                                                          ("tailor", 8.0), ("peft", 8.0)]
    assert len({r["requests"] for r in rows}) == 1 and rows[0]["requests"] > 0 and all(r["failed"] == 0 for r in rows)
    assert len({r["trace"]["output_tokens"] for r in rows}) == 1  # the same trace
    assert all(0 < r["slo_attainment"] <= 1 and r["requests_per_s"] > 0 for r in rows)
    assert "| adapters |" in (out / "slora_eval-cpu.md").read_text()
    for name in ("throughput", "ttft", "rate"):
        assert (out / f"slora_eval-cpu-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = load_trace(out / "traces" / "slora_eval-n3-rate6.json")
    assert isinstance(saved, Trace) and saved.num_adapters == 3
