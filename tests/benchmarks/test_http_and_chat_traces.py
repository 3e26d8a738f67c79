"""Issue 22's remaining harness parts: random-weight checkpoints of published shapes, the replay over
HTTP with streaming, and the multi-turn chat trace (its generator statistically, its replay against
a real ``tailor serve``)."""

import asyncio
import json

import numpy as np
import pytest
import torch

from benchmarks import slora_eval
from benchmarks.chat_trace import (by_turn, create_users, load_chat_trace, replay_chat, save_chat_trace,
                                   synthetic_chat_trace)
from benchmarks.http_replay import LocalService, create_tenant
from benchmarks.random_llama import SHAPES, hf_config, random_checkpoint
from benchmarks.synthetic_adapters import synthetic_adapter
from inference import LLM, SamplingParams
from inference.model_config import ModelConfig
from inference.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    return random_checkpoint("random:tiny", tmp_path_factory.mktemp("models"), dtype="float32", seed=3)


def test_published_shapes_parse_to_the_parameter_counts_of_llama_7b_and_13b():
    def params(shape):
        c = ModelConfig.from_dict(hf_config(shape, "float16"))
        per_layer = sum(i * o for i, o in c.linear_shapes().values()) + 2 * c.hidden_size
        return c.num_layers * per_layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size

    assert params(SHAPES["llama-7b"]) == 6_738_415_616  # Llama-2-7B's published count
    assert params(SHAPES["llama-13b"]) == 13_015_864_320


def test_a_random_checkpoint_loads_in_the_engine_and_in_transformers_with_the_same_greedy_tokens(random_tiny):
    from transformers import AutoModelForCausalLM

    prompt = torch.randint(3, SHAPES["tiny"]["vocab_size"], (9,)).tolist()
    with LLM(str(random_tiny)) as llm:
        ours = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids
        assert llm.tokenizer.has_chat_template
    model = AutoModelForCausalLM.from_pretrained(random_tiny, dtype=torch.float32)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, 9:]
    assert ours == theirs.tolist()
    # cached: asking again returns the same folder without writing it again
    marker = random_tiny / ".complete"
    before = marker.stat().st_mtime_ns
    assert random_checkpoint("random:tiny", random_tiny.parent, dtype="float32", seed=3) == random_tiny
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="unknown random model"):
        random_checkpoint("random:llama-70b", random_tiny.parent)


def test_the_one_command_replays_over_http_with_the_same_tokens_as_in_process(random_tiny, tmp_path):
    out = tmp_path / "out"
    assert slora_eval.main(["--model", str(random_tiny), "--systems", "tailor,http", "--adapters", "0,2",
                            "--ranks", "4,8", "--rate", "6", "--duration-s", "0.8", "--input", "4,12",
                            "--output", "2,5", "--out-dir", str(out), "--no-plots"]) == 0
    rows = json.loads((out / "slora_eval-cpu.json").read_text())["rows"]
    assert [(r["system"], r["adapters"]) for r in rows] == [("tailor", 0), ("http", 0), ("tailor", 2), ("http", 2)]
    assert all(r["failed"] == 0 and r["requests"] > 0 for r in rows)
    # EOS biased away: every HTTP answer has the trace's length, as ignore_eos gives in-process
    for tailor, http in zip(rows[::2], rows[1::2]):
        assert http["requests"] == tailor["requests"]
        assert http["output_tokens_per_s"] * http["span_s"] == pytest.approx(tailor["trace"]["output_tokens"])
        assert 0 < http["ttft_s"]["p50"] <= http["latency_s"]["p50"]


def test_the_chat_trace_follows_its_distributions():
    trace = synthetic_chat_trace(4000, 20.0, turns_range=(2, 6), message_len_range=(5, 15), output_len_range=(3, 9),
                                 think_mean_s=1.5, adapter_share=0.25, ranks=(8, 16), vocab=300, seed=11)
    starts = np.array([s.start_s for s in trace.sessions])
    assert np.all(np.diff(starts) >= 0)
    assert len(starts) / starts[-1] == pytest.approx(20.0, rel=0.06)  # 4000 arrivals: ~4 sigma
    turns = np.array([len(s.turns) for s in trace.sessions])
    assert set(turns) == {2, 3, 4, 5, 6} and turns.mean() == pytest.approx(4.0, abs=0.1)
    thinks = np.array([t.think_s for s in trace.sessions for t in s.turns[1:]])
    assert all(s.turns[0].think_s == 0 for s in trace.sessions)
    assert thinks.mean() == pytest.approx(1.5, rel=0.05) and thinks.std() / thinks.mean() == pytest.approx(1.0, abs=0.06)
    lengths = np.array([len(t.message_token_ids) for s in trace.sessions for t in s.turns])
    assert lengths.min() == 5 and lengths.max() == 15 and lengths.mean() == pytest.approx(10.0, abs=0.1)
    ids = np.concatenate([t.message_token_ids for s in trace.sessions[:50] for t in s.turns])
    assert ids.min() >= 3 and ids.max() < 300
    owners = [s for s in trace.sessions if s.adapter is not None]
    assert len(owners) == 1000 and all(s.adapter == s.user and s.rank in (8, 16) for s in owners)
    assert {s.rank for s in owners} == {8, 16}
    with pytest.raises(ValueError, match=r"adapter_share must be in \[0, 1\]; turns_range must be"):
        synthetic_chat_trace(3, 1.0, adapter_share=2.0, turns_range=(0, 1))


def test_a_chat_trace_file_round_trips_and_a_trace_of_requests_is_refused(tmp_path):
    from benchmarks.trace import save_trace, synthetic_trace

    trace = synthetic_chat_trace(5, 2.0, seed=2, vocab=100)
    assert load_chat_trace(save_chat_trace(trace, tmp_path / "c.json")) == trace
    with pytest.raises(ValueError, match="not a version-1 chat trace"):
        load_chat_trace(save_trace(synthetic_trace(2, 1.0, 2.0, vocab=100), tmp_path / "t.json"))


def test_the_chat_trace_replays_through_the_per_user_chat_endpoint(random_tiny, tmp_path):
    trace = synthetic_chat_trace(3, 20.0, turns_range=(2, 3), message_len_range=(3, 8), output_len_range=(2, 4),
                                 think_mean_s=0.05, adapter_share=2 / 3, ranks=(4,), vocab=SHAPES["tiny"]["vocab_size"],
                                 seed=5)
    config = ModelConfig.from_checkpoint(random_tiny)
    tokenizer = Tokenizer(random_tiny)
    with LocalService({"TAILOR_MODEL": str(random_tiny)}) as service:
        tenant = create_tenant(service.base, "chat-trace-test")
        users = create_users(tenant, trace, lambda s: synthetic_adapter(tmp_path / f"u{s.user}", config, r=s.rank,
                                                                        targets=("q_proj",), alpha=8.0, seed=s.user))
        timings = asyncio.run(replay_chat(tenant, trace, users, tokenizer.decode))
    assert len(timings) == trace.num_turns and all(t.ok for t in timings), [t.error for t in timings]
    for session in trace.sessions:
        mine = [t for t in timings if t.user == session.user]
        assert [t.turn for t in mine] == list(range(len(session.turns)))
        # each turn's prompt holds the history: it grows by more than the new message
        for earlier, later, turn in zip(mine, mine[1:], session.turns[1:]):
            assert later.prompt_tokens > earlier.prompt_tokens + len(turn.message_token_ids)
            assert later.arrival_s >= earlier.arrival_s + earlier.latency_s  # closed within a session
        assert all(1 <= t.output_tokens <= turn.max_tokens for t, turn in zip(mine, session.turns))
    rows = by_turn(timings, slo_ttft_s=60.0)
    assert [r["turn"] for r in rows] == [0, 1, 2][:len(rows)] and rows[0]["requests"] == 3
    assert rows[0]["prompt_tokens_mean"] < rows[1]["prompt_tokens_mean"]
