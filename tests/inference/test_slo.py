"""First-token SLOs on the engine: early abort of queued requests (inference.slo), the counters per
tenant, and the validation of ``ttft_slo_s``. Deterministic: the prefill rate is set where the test
needs a prediction, and deadlines are either already past or hours away."""

import math
import time

import pytest

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.request import FinishReason
from inference.sampling import SamplingParams
from inference.slo import MIN_PREFILL_STEP_TOKENS, FirstTokenDeadlines

HOURS = 3600.0 * 10


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20, max_num_seqs=4,
                                                   max_num_batched_tokens=32))


def _request(engine, tenant, slo, prompt_len=8, max_tokens=3, request_id=None):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompt = [5 + (i * 7) % 200 for i in range(prompt_len)]
    return engine.request_from_ids(prompt, params, request_id, None, tenant=tenant, ttft_slo_s=slo)


def _run(engine) -> list:
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_a_queued_request_past_its_deadline_is_refused_and_the_rest_is_served(engine):
    engine.deadlines.by_tenant.clear()
    served = _request(engine, "t-ok", HOURS)
    late = _request(engine, "t-late", 1e-9)
    free = _request(engine, "t-late", None)  # no SLO: never refused, never counted
    for request in (served, late, free):
        engine.add(request)
    time.sleep(0.001)
    outputs = _run(engine)
    final = {o.request_id: o for o in outputs if o.finished}
    refused = final[late.request_id]
    assert refused.finish_reason is FinishReason.DEADLINE
    assert refused.token_ids == []
    assert refused.retry_after_s is not None and refused.retry_after_s >= 1
    assert "deadline" in refused.error
    assert final[served.request_id].finish_reason is FinishReason.LENGTH
    assert final[free.request_id].finish_reason is FinishReason.LENGTH
    counts = engine.deadlines.by_tenant
    assert (counts["t-ok"].attained, counts["t-ok"].missed, counts["t-ok"].early_aborts) == (1, 0, 0)
    assert (counts["t-late"].attained, counts["t-late"].missed, counts["t-late"].early_aborts) == (0, 1, 1)


def test_the_prediction_refuses_before_the_deadline_passes(engine):
    """With a measured prefill rate of 10 tokens/s, a 200-token prompt cannot make a 5 s deadline
    (20 s of prefill), while an 8-token one can (0.8 s); nothing has passed its deadline yet."""
    engine.deadlines.by_tenant.clear()
    saved = engine.deadlines.prefill_tokens_per_s
    engine.deadlines.prefill_tokens_per_s = 10.0
    try:
        long = _request(engine, "t", 5.0, prompt_len=200)
        short = _request(engine, "t", 5.0, prompt_len=8)
        engine.add(long)
        engine.add(short)
        outputs = engine.step()
        refused = [o for o in outputs if o.finished]
        assert [o.request_id for o in refused] == [long.request_id]
        assert refused[0].finish_reason is FinishReason.DEADLINE
        # the retry estimate is the queue ahead at that rate: 208 tokens / 10 per s, rounded up
        assert refused[0].retry_after_s == math.ceil(208 / 10)
        engine.deadlines.prefill_tokens_per_s = None  # the short one is not judged again on the slow rate
        _run(engine)
    finally:
        engine.deadlines.prefill_tokens_per_s = saved
    assert engine.deadlines.by_tenant["t"].early_aborts == 1


def test_an_admitted_request_is_never_refused_but_counted_late(engine):
    """A request whose prefill spans several steps passes its deadline while running: it is served
    to the end and counted as missed, not aborted."""
    engine.deadlines.by_tenant.clear()
    request = _request(engine, "t-run", 0.05, prompt_len=100)  # 32 tokens per step: 4 prefill steps
    engine.add(request)
    engine.step()
    assert request.state.value == "running" and not request.output_token_ids
    time.sleep(0.1)
    outputs = _run(engine)
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    counts = engine.deadlines.by_tenant["t-run"]
    assert (counts.attained, counts.missed, counts.early_aborts) == (0, 1, 0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_a_bad_slo_is_refused_with_its_name(engine, bad):
    with pytest.raises(ValueError, match="ttft_slo_s"):
        _request(engine, "t", bad)


def test_the_rate_follows_prefill_steps_only():
    deadlines = FirstTokenDeadlines(smoothing=0.5)
    deadlines.observe_step(1, 0.001)  # a decode step: ignored
    assert deadlines.prefill_tokens_per_s is None
    assert deadlines.prefill_seconds(1000) == 0.0
    deadlines.observe_step(MIN_PREFILL_STEP_TOKENS * 10, 1.0)
    assert deadlines.prefill_tokens_per_s == MIN_PREFILL_STEP_TOKENS * 10
    deadlines.observe_step(MIN_PREFILL_STEP_TOKENS * 10, 0.5)  # twice as fast; half way there
    assert deadlines.prefill_tokens_per_s == pytest.approx(MIN_PREFILL_STEP_TOKENS * 15)
    assert deadlines.retry_after(0) == 1.0
