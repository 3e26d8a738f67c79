"""The step token budget controller (inference.step_budget) on modelled step times, and on the
real engine."""

import math
import random

import pytest

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams
from inference.step_budget import MIN_STEP_TOKENS, StepTokenBudget


def _run(budget: StepTokenBudget, step_seconds, steps: int, demand: int = 10**6) -> list[int]:
    """Steps with ``demand`` tokens of work waiting; each takes ``step_seconds(tokens)``."""
    history = []
    for _ in range(steps):
        tokens = min(budget.tokens, demand)
        budget.observe(tokens, step_seconds(tokens), exhausted=tokens == budget.tokens and demand > tokens)
        history.append(budget.tokens)
    return history


@pytest.mark.parametrize("fixed_ms, per_token_ms, target_ms", [(45, 5.7, 150), (10, 0.5, 50), (100, 10, 400)])
def test_the_budget_converges_to_the_batch_whose_step_takes_the_target(fixed_ms, per_token_ms, target_ms):
    """A compute-bound device (step time grows with every token): from the full budget down to
    the batch that fits the target, and it stays there."""
    budget = StepTokenBudget(max_tokens=2048, target_s=target_ms / 1000)
    history = _run(budget, lambda n: (fixed_ms + per_token_ms * n) / 1000, steps=60)
    ideal = (target_ms - fixed_ms) / per_token_ms
    for tokens in history[-20:]:
        assert abs(tokens - ideal) <= max(2, 0.1 * ideal), (tokens, ideal)


def test_where_batching_is_free_the_budget_stays_full():
    """A GPU-like device: a step costs about the same at any batch, under the target."""
    budget = StepTokenBudget(max_tokens=2048, target_s=0.15)
    assert set(_run(budget, lambda n: 0.02 + 1e-6 * n, steps=50)) == {2048}


def test_from_below_the_budget_grows_while_steps_are_fast_and_full():
    budget = StepTokenBudget(max_tokens=2048, target_s=0.15)
    budget.tokens = 2
    history = _run(budget, lambda n: (45 + 5.7 * n) / 1000, steps=40)
    assert history[0] > 2 and abs(history[-1] - 105 / 5.7) <= 2


def test_a_step_that_left_budget_unused_says_nothing_about_a_larger_one():
    budget = StepTokenBudget(max_tokens=2048, target_s=0.15)
    budget.tokens = 20
    budget.observe(5, 0.01, exhausted=False)
    assert budget.tokens == 20


def test_a_slow_step_that_was_not_full_still_shrinks_the_budget():
    budget = StepTokenBudget(max_tokens=2048, target_s=0.1)
    budget.observe(100, 0.4, exhausted=False)  # 100 tokens took 4x the target
    assert budget.tokens == 50  # 100 * sqrt(1/4)


def test_one_slow_step_is_recovered_from():
    budget = StepTokenBudget(max_tokens=2048, target_s=0.15)
    model = lambda n: (45 + 5.7 * n) / 1000  # noqa: E731
    settled = _run(budget, model, steps=60)[-1]
    budget.observe(budget.tokens, 1.0, exhausted=True)  # a pause (another process, a page fault)
    assert budget.tokens < settled
    assert abs(_run(budget, model, steps=30)[-1] - settled) <= 2


def test_noisy_step_times_keep_the_budget_near_the_target():
    rng = random.Random(0)
    budget = StepTokenBudget(max_tokens=2048, target_s=0.15)
    history = _run(budget, lambda n: (45 + 5.7 * n) / 1000 * rng.uniform(0.8, 1.2), steps=300)
    mean = sum(history[100:]) / len(history[100:])
    assert abs(mean - 105 / 5.7) <= 4, mean


def test_where_the_fixed_part_alone_exceeds_the_target_the_budget_stops_at_the_floor():
    """A busy machine: 200 ms per step whatever the batch; shrinking would only cost throughput."""
    budget = StepTokenBudget(max_tokens=2048, target_s=0.15)
    assert _run(budget, lambda n: 0.2 + 1e-3 * n, steps=40)[-1] == MIN_STEP_TOKENS


def test_bounds_and_no_target():
    budget = StepTokenBudget(max_tokens=64, target_s=0.01, min_tokens=4)
    _run(budget, lambda n: 1.0, steps=20)  # every step far over the target
    assert budget.tokens == 4
    fixed = StepTokenBudget(max_tokens=64, target_s=None)
    _run(fixed, lambda n: 10.0, steps=5)
    assert fixed.tokens == 64


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0, target_s=1.0), dict(max_tokens=8, target_s=0.0),
                                    dict(max_tokens=8, target_s=math.inf), dict(max_tokens=8, target_s=1.0,
                                                                                  min_tokens=0)])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        StepTokenBudget(**kwargs)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "0.1"])
def test_the_engine_config_refuses_a_bad_target(value):
    with pytest.raises(ValueError, match="step_time_target_s"):
        EngineConfig(step_time_target_s=value)


def test_the_engine_keeps_its_steps_within_the_budget_it_lowers(tiny_checkpoint):
    """A target far below any real step: the engine lowers its budget to the minimum, every step
    computes at most the budget it was given, and the answers are those of the full budget."""
    prompts = [[10 + (i * 31 + j) % 300 for j in range(6 + i)] for i in range(6)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def run(target):
        engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20,
                                                         step_time_target_s=target))
        requests = [engine.request_from_ids(p, params, None, None, tenant=f"t{i % 2}") for i, p in enumerate(prompts)]
        for request in requests:
            engine.add(request)
        budgets = []
        while engine.has_unfinished():
            before = engine.step_budget.tokens
            engine.step()
            budgets.append((before, engine.stats.last_step_tokens))
        return [r.output_token_ids for r in requests], budgets

    fast, _ = run(None)
    slow, budgets = run(1e-6)
    assert slow == fast
    assert all(tokens <= before for before, tokens in budgets)
    assert budgets[-1][0] == MIN_STEP_TOKENS  # lowered to the floor


def test_a_request_alone_is_not_held_to_the_budget(tiny_checkpoint):
    """Alone, a long prompt computes in one step whatever the budget; with a second request
    waiting, steps keep to it."""
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20, step_time_target_s=1e-6))
    engine.step_budget.tokens = MIN_STEP_TOKENS
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add(engine.request_from_ids(list(range(10, 110)), params, None, None))
    engine.step()
    assert engine.stats.last_step_tokens == 100
    assert engine.step_budget.tokens == MIN_STEP_TOKENS  # not observed
    for start in (200, 300):
        engine.add(engine.request_from_ids(list(range(start, start + 100)), params, None, None))
    engine.step()
    assert engine.stats.last_step_tokens <= MIN_STEP_TOKENS
