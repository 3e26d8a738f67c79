"""Fair shares across tenants: the scheduler's virtual token counters (inference.fairness) on the
engine, with fixed traces and step counts.

The bound tested (derivation in docs/design.md "Scheduling"): while tenants a and b are both
backlogged (always a request waiting) and nobody is preempted, a tenant is admitted only when its
counter is the smallest, and after its last admission it can be charged at most for what its
running requests still have to do: at most ``max_num_seqs`` requests of cost
``U = w_p * prompt + w_q * max_tokens`` each. So at every step

    |W_a / weight_a - W_b / weight_b| <= D = max_num_seqs * U / min(weight)

for the weighted service W since both started at the same counter, and 2 * D over any interval.
Each bound test has a control that runs the same trace first come, first served (or without the
rejoin lift) and asserts the bound is broken there, so every test can fail.
"""

import math

import pytest

from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.fairness import AdmissionQueue, VirtualTokenCounters, admission_order
from inference.sampling import SamplingParams
from inference.scheduler import Scheduler
from inference.step_budget import StepTokenBudget

SEQS = 4  # max_num_seqs
PROMPT = 8
MAX_TOKENS = 8
W_P, W_Q = 1.0, 2.0  # the scheduler's default cost weights
U = W_P * PROMPT + W_Q * MAX_TOKENS  # cost of one request


def _engine(checkpoint) -> LLMEngine:
    return LLMEngine(checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20, max_num_seqs=SEQS,
                                              max_num_batched_tokens=64))


def _submit(engine: LLMEngine, tenant, count: int, weight: float = 1.0, seed: int = 0) -> list:
    requests = []
    for i in range(count):
        prompt = [10 + (seed * 97 + i * 13 + j) % 400 for j in range(PROMPT)]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        request = engine.request_from_ids(prompt, params, None, None, tenant=tenant, tenant_weight=weight)
        engine.add(request)
        requests.append(request)
    return requests


def _served(requests) -> float:
    """Weighted tokens served to ``requests``, from their state (not from the counters)."""
    return sum(W_P * min(r.num_computed_tokens if not r.finished else len(r.prompt_token_ids),
                         len(r.prompt_token_ids)) + W_Q * len(r.output_token_ids) for r in requests)


def _backlogged(requests) -> bool:
    return any(r.state.value == "waiting" for r in requests)


def _fcfs_peek(self):
    """Plain first come, first served: the earliest waiting request, whatever its tenant."""
    if self.preempted:
        return self.preempted[0]
    heads = [queue[0] for queue in self.tenants.values()]
    return min(heads, key=lambda h: h[0])[1] if heads else None


def _max_gap(engine, a, b, weight_a=1.0, weight_b=1.0, max_steps=400) -> tuple[float, float]:
    """Run while both are backlogged; the largest |W_a/weight_a - W_b/weight_b| seen after any
    step, and W_a / W_b at the end."""
    gap = 0.0
    for _ in range(max_steps):
        if not (_backlogged(a) and _backlogged(b)):
            break
        engine.step()
        gap = max(gap, abs(_served(a) / weight_a - _served(b) / weight_b))
    assert engine.scheduler.num_preemptions == 0  # the bound assumes no preemption
    return gap, _served(a) / max(_served(b), 1e-9)


def test_equal_weights_stay_within_the_vtc_bound(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    a = _submit(engine, "a", 12, seed=1)  # a's whole backlog arrives first: FCFS would serve it all
    b = _submit(engine, "b", 12, seed=2)
    gap, _ = _max_gap(engine, a, b)
    assert gap <= SEQS * U, gap
    assert _served(a) > 0 and _served(b) > 0


def test_fcfs_breaks_the_equal_weight_bound(tiny_checkpoint, monkeypatch):
    """Control: the trace above, first come, first served, goes past the bound."""
    monkeypatch.setattr(AdmissionQueue, "peek", _fcfs_peek)
    engine = _engine(tiny_checkpoint)
    a = _submit(engine, "a", 12, seed=1)
    b = _submit(engine, "b", 12, seed=2)
    gap = 0.0
    while engine.has_unfinished():
        engine.step()
        gap = max(gap, abs(_served(a) - _served(b)))
    assert gap > SEQS * U


def test_weights_two_to_one_split_the_service_two_to_one(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    a = _submit(engine, "a", 30, weight=2.0, seed=3)
    b = _submit(engine, "b", 30, weight=1.0, seed=4)
    gap, ratio = _max_gap(engine, a, b, weight_a=2.0, weight_b=1.0)
    assert gap <= SEQS * U, gap
    assert 1.6 <= ratio <= 2.4, ratio


def _wait_for_light(engine, light) -> int:
    steps = 0
    while light.num_computed_tokens == 0 and not light.finished:
        engine.step()
        steps += 1
    return steps


def test_light_tenant_is_admitted_within_a_wave_during_a_flood(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    _submit(engine, "heavy", 10 * SEQS, seed=5)  # ten times the batch
    for _ in range(3):
        engine.step()
    [light] = _submit(engine, "light", 1, seed=6)
    # it waits at most for a running request to finish (MAX_TOKENS steps) and the admission step
    assert _wait_for_light(engine, light) <= MAX_TOKENS + 1


def _flood_with_a_short_budget(checkpoint):
    """A flood: ``2 * SEQS`` heavy requests decoding (seats left), then a step budget of
    ``2 * SEQS - 1`` tokens, which their decodes alone fill."""
    seats = 4 * SEQS
    engine = LLMEngine(checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20, max_num_seqs=seats,
                                                max_num_batched_tokens=2 * SEQS * PROMPT))
    _submit(engine, "heavy", 10 * SEQS, seed=5)
    engine.step()  # 2 * SEQS prompts fill the step
    assert engine.num_running == 2 * SEQS
    engine.step_budget = StepTokenBudget(max_tokens=2 * SEQS - 1, target_s=None)
    [light] = _submit(engine, "light", 1, seed=6)
    return engine, light


def test_a_light_tenant_starts_at_the_next_step_when_running_requests_fill_the_budget(tiny_checkpoint):
    engine, light = _flood_with_a_short_budget(tiny_checkpoint)
    assert _wait_for_light(engine, light) == 1


def test_control_running_requests_first_keep_the_light_tenant_out(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(Scheduler, "_goes_before", lambda self, newcomer, runner: False)
    engine, light = _flood_with_a_short_budget(tiny_checkpoint)
    assert _wait_for_light(engine, light) >= MAX_TOKENS - 1  # until the running requests finish


def test_fcfs_makes_the_light_tenant_wait_behind_the_flood(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(AdmissionQueue, "peek", _fcfs_peek)
    engine = _engine(tiny_checkpoint)
    _submit(engine, "heavy", 10 * SEQS, seed=5)
    for _ in range(3):
        engine.step()
    [light] = _submit(engine, "light", 1, seed=6)
    assert _wait_for_light(engine, light) > 5 * MAX_TOKENS


def _rejoin_gap(engine, check_lift: bool = True) -> float:
    """a and b share, b goes idle while a runs alone for 60 steps, b comes back with a backlog:
    the largest |(W_a - W_a0) - (W_b - W_b0)| since b came back."""
    a = _submit(engine, "a", 60, seed=7)
    b = _submit(engine, "b", 2, seed=8)
    while not all(r.finished for r in b):
        engine.step()
    for _ in range(60):
        engine.step()
    assert _backlogged(a)
    b2 = _submit(engine, "b", 20, seed=9)
    fairness = engine.scheduler.fairness
    if check_lift:
        assert fairness.counter("b") == fairness.counter("a")  # lifted to the active minimum
    a0, b0 = _served(a), _served(b2)
    gap = 0.0
    while _backlogged(a) and _backlogged(b2):
        engine.step()
        gap = max(gap, abs((_served(a) - a0) - (_served(b2) - b0)))
    return gap


def test_an_idle_tenant_rejoins_at_the_active_minimum(tiny_checkpoint):
    assert _rejoin_gap(_engine(tiny_checkpoint)) <= 2 * SEQS * U


def test_without_the_lift_a_rejoining_tenant_gets_a_burst(tiny_checkpoint, monkeypatch):
    """Control: counters kept through idleness (no lift) let b take every slot until it caught up."""
    original = VirtualTokenCounters.join

    def join_without_lift(self, request):
        before = self.counter(request.tenant)
        original(self, request)
        self.counters[request.tenant] = before

    monkeypatch.setattr(VirtualTokenCounters, "join", join_without_lift)
    assert _rejoin_gap(_engine(tiny_checkpoint), check_lift=False) > 2 * SEQS * U


def test_a_tenant_never_seen_starts_at_the_active_minimum():
    counters = VirtualTokenCounters()

    class R:
        def __init__(self, rid, tenant, prompt=4):
            self.request_id, self.tenant, self.tenant_weight = rid, tenant, 1.0
            self.prompt_token_ids, self.num_charged_prompt_tokens = [1] * prompt, 0

    first = R("1", "a")
    counters.join(first)
    assert counters.charge(first, 0, 4, samples=True) == 4 * 1.0 + 2.0
    counters.charge(first, 0, 4, samples=False)  # recomputed after a preemption: not charged again
    assert counters.counter("a") == 6.0
    counters.join(R("2", "b"))
    assert counters.counter("b") == 6.0
    counters.leave(first)
    counters.leave(first)  # idempotent
    assert counters.active == {"b"}


@pytest.mark.parametrize("weight", [0, -1, math.nan, math.inf, -math.inf, True, "2"])
def test_a_bad_tenant_weight_is_refused(tiny_checkpoint, weight):
    engine = _engine(tiny_checkpoint)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="tenant_weight"):
        engine.request_from_ids([5, 6, 7], params, None, None, tenant="a", tenant_weight=weight)
    with pytest.raises(ValueError, match="tenant_weight"):
        engine.make_request([5, 6, 7], params, tenant="a", tenant_weight=weight)
    with pytest.raises(ValueError, match="tenant must be"):
        engine.make_request([5, 6, 7], params, tenant=3)


def test_adapters_are_prefetched_in_the_fair_order(tiny_checkpoint):
    """With a heavy tenant's ten requests queued before a light tenant's one, the prefetch order
    (the first four the scheduler would admit) interleaves them: the light request comes second,
    where first come, first served would not reach it at all. The queue and counters are untouched."""
    engine = _engine(tiny_checkpoint)
    heavy = _submit(engine, "heavy", 10)
    light = _submit(engine, "light", 1, seed=1)
    counters = dict(engine.scheduler.fairness.counters)
    order = admission_order(engine.scheduler.waiting, engine.scheduler.fairness, 4)
    assert order[:2] == [heavy[0], light[0]] and order[2:] == heavy[1:3]
    assert list(engine.scheduler.waiting) == heavy + light
    assert engine.scheduler.fairness.counters == counters
    weighted = _submit(engine, "weighted", 2, weight=1e-3, seed=2)  # a tiny weight pays 1000x per token
    order = admission_order(engine.scheduler.waiting, engine.scheduler.fairness, 6)
    assert weighted[0] in order[:3] and weighted[1] not in order


def test_the_cost_weights_come_from_the_engine_config(tiny_checkpoint):
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20,
                                                     fairness_input_token_weight=0.5, fairness_output_token_weight=3.0))
    assert (engine.scheduler.fairness.input_weight, engine.scheduler.fairness.output_weight) == (0.5, 3.0)
    with pytest.raises(ValueError, match="fairness_output_token_weight"):
        EngineConfig(fairness_output_token_weight=-1.0)
