"""Test helpers around LLMEngine: run to completion, read prompt logits."""

from __future__ import annotations

import torch

from inference.engine import LLMEngine
from inference.request import RequestOutput


def run_to_completion(engine: LLMEngine, max_steps: int = 100_000) -> dict[str, RequestOutput]:
    """Step until idle; return the final output of every request that finished."""
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not finish")


def prompt_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    """Last-position logits [len(prompts), vocab] of one batched prefill step through the engine."""
    from inference.sampling import SamplingParams

    requests = [engine.request_from_ids(p, SamplingParams(max_tokens=1, temperature=0.0), None, None) for p in prompts]
    for request in requests:
        engine.add(request)
    plan = engine.scheduler.schedule()
    assert [c.request for c in plan.chunks] == requests and all(c.samples for c in plan.chunks)
    batch, _ = engine._build_batch(plan)
    logits = engine.model.forward(batch, engine.pool)
    for request in requests:
        engine.abort(request.request_id)
    return logits
