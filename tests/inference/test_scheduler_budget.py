"""The scheduler's step budget, spent in virtual-token-counter order over running and waiting
requests (inference.scheduler), on a real page pool with hand-made requests: no model runs, each
step's chunks are marked computed and a sampled token is appended by hand."""

import itertools

import pytest
import torch

from inference.page_pool import PageGeometry, PagePool
from inference.request import Request
from inference.sampling import SamplingParams
from inference.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, _RunningByTenant

PAGE_TOKENS = 4
_ids = itertools.count()


def _scheduler(num_pages: int, max_num_seqs: int = 8) -> Scheduler:
    geometry = PageGeometry(num_layers=1, page_tokens=PAGE_TOKENS, num_kv_heads=1, head_dim=4, element_bytes=4)
    pool = PagePool(geometry, num_pages, "cpu", torch.float32)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64), pool)


def _request(tenant: str, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(f"r{next(_ids)}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                   tenant=tenant)


def _step(scheduler: Scheduler, budget: int | None = None) -> SchedulerOutput:
    """One step as the engine runs it, with token 7 sampled for every chunk that samples."""
    plan = scheduler.schedule(budget)
    sampling = [c.request for c in plan.chunks if c.samples]
    scheduler.computed(plan)
    for request in sampling:
        request.output_token_ids.append(7)
    return plan


def _placed(plan: SchedulerOutput) -> list[Request]:
    return [c.request for c in plan.chunks]


def _flooded(budget: int) -> tuple[Scheduler, list[Request]]:
    """Four heavy requests running and decoding, with the step budget ``budget``."""
    scheduler = _scheduler(num_pages=64)
    heavy = [_request("heavy", 4) for _ in range(4)]
    for request in heavy:
        scheduler.add(request)
    _step(scheduler)  # all four prefill in one step
    for _ in range(3):
        _step(scheduler, budget)
    return scheduler, heavy


def test_a_light_request_is_placed_at_the_next_step_when_the_budget_is_short():
    scheduler, heavy = _flooded(budget=4)
    light = _request("light", 2)
    scheduler.add(light)
    plan = _step(scheduler, 4)
    assert light in _placed(plan)
    [chunk] = [c for c in plan.chunks if c.request is light]
    assert chunk.num_tokens == 2 and light.output_token_ids == [7]  # its first token comes out of this step
    assert plan.num_tokens == 4 and plan.exhausted
    assert sum(r in _placed(plan) for r in heavy) == 2  # two heavy decodes wait a step, pages kept
    assert all(r.state.value == "running" for r in heavy) and not plan.preempted


def test_control_running_first_keeps_the_light_request_out_while_the_budget_is_short(monkeypatch):
    """Control: if running requests always went first, the short budget would keep it waiting."""
    monkeypatch.setattr(Scheduler, "_goes_before", lambda self, newcomer, runner: False)
    scheduler, heavy = _flooded(budget=4)
    light = _request("light", 2)
    scheduler.add(light)
    for _ in range(5):
        assert light not in _placed(_step(scheduler, 4))


def test_with_the_full_budget_every_running_request_is_placed_and_newcomers_admitted():
    scheduler, heavy = _flooded(budget=64)
    light = _request("light", 2)
    scheduler.add(light)
    plan = _step(scheduler)
    assert {r.request_id for r in _placed(plan)} == {r.request_id for r in [*heavy, light]}
    assert not plan.exhausted


def test_a_running_tenant_served_less_decodes_first():
    scheduler = _scheduler(num_pages=64)
    heavy = [_request("heavy", 8) for _ in range(3)]
    light = _request("light", 2)
    for request in [*heavy, light]:
        scheduler.add(request)
    _step(scheduler)  # everything prefills: heavy charged 3 x 10, light 4
    plan = _step(scheduler, 2)
    assert _placed(plan)[0] is light and len(plan.chunks) == 2


def _pressed() -> tuple[Scheduler, Request, Request]:
    """Two pages. A heavy request ran its 4-token prompt in one page and needs a second page for
    its next token; a light request (served less) waits for its one page; one page is free."""
    scheduler = _scheduler(num_pages=2, max_num_seqs=2)
    running = _request("heavy", PAGE_TOKENS)
    light = _request("light", 3)
    scheduler.add(running)
    scheduler.add(light)
    plan = _step(scheduler, PAGE_TOKENS)  # only the heavy prompt fits the budget
    assert _placed(plan) == [running] and scheduler.pool.num_free == 1
    assert scheduler.fairness.counter("light") < scheduler.fairness.counter("heavy")
    return scheduler, running, light


def test_a_newcomer_does_not_take_the_page_a_running_request_needs():
    scheduler, running, light = _pressed()
    plan = _step(scheduler)
    assert _placed(plan) == [running] and not plan.preempted
    assert light.state.value == "waiting"


def test_control_without_the_reserve_the_newcomer_preempts_the_running_request(monkeypatch):
    original = _RunningByTenant.__init__

    def without_reserve(self, running, pages_needed):
        original(self, running, pages_needed)
        self.needs = dict.fromkeys(self.needs, 0)
        self.pages_needed = 0

    monkeypatch.setattr(_RunningByTenant, "__init__", without_reserve)
    scheduler, running, light = _pressed()
    plan = _step(scheduler)
    assert plan.preempted == [running]


def test_a_preempted_request_waits_until_every_running_request_is_placed():
    scheduler = _scheduler(num_pages=64)
    a = _request("a", 4)
    b = _request("b", 4)
    scheduler.add(a)
    scheduler.add(b)
    _step(scheduler)
    scheduler._preempt(b)  # as page pressure would
    plan = _step(scheduler, 2)  # b's tenant is served no more than a's, but a is running
    assert _placed(plan)[0] is a


@pytest.mark.parametrize("budget", [1, 3, 17])
def test_a_step_never_goes_past_its_budget(budget):
    scheduler = _scheduler(num_pages=256, max_num_seqs=16)
    for i in range(12):
        scheduler.add(_request(f"t{i % 3}", 5 + i))
    for _ in range(30):
        plan = _step(scheduler, budget)
        assert plan.num_tokens <= budget
        assert plan.exhausted == (plan.num_tokens == budget)
