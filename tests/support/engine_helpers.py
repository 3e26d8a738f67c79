"""Test helpers around LLMEngine: run to completion, read prompt logits."""

from __future__ import annotations

import time

import torch

from inference.engine import LLMEngine
from inference.request import RequestOutput


def run_to_completion(engine: LLMEngine, timeout_s: float = 600.0, on_step=None) -> dict[str, RequestOutput]:
    """Step until idle; return the final output of every request that finished.

    When a step schedules nothing (only requests whose adapters are still being fetched), wait a
    moment instead of spinning. ``on_step(engine)`` runs after every step (for invariant checks).
    """
    final: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        if time.monotonic() > deadline:
            raise AssertionError("engine did not finish in time")
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if on_step is not None:
            on_step(engine)
        if not engine.last_step_ran:
            time.sleep(0.002)
    return final


def prompt_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    """Last-position logits [len(prompts), vocab] of one batched prefill step through the engine."""
    from inference.sampling import SamplingParams

    requests = [engine.request_from_ids(p, SamplingParams(max_tokens=1, temperature=0.0), None, None) for p in prompts]
    for request in requests:
        engine.add(request)
    plan = engine.scheduler.schedule()
    assert [c.request for c in plan.chunks] == requests and all(c.samples for c in plan.chunks)
    batch, _ = engine.runner.build_batch(plan)
    logits = engine.model.forward(batch, engine.pool)
    for request in requests:
        engine.abort(request.request_id)
    return logits
