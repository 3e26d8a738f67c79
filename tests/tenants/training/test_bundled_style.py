"""The issue's realistic check at CI size, on the bundled SmolLM2-135M on the CPU: a dozen examples
whose answers all start with the same greeting, a rank-8 adapter with the trainer's defaults on one
thread; then the engine's greedy answers to prompts that were not in the training data start with
the greeting for most of them (for none before), and the evaluation loss fell. Prints the figures
(run with ``-s``); docs/personalization.md records a run."""

from __future__ import annotations

import time

import pytest

from benchmarks.personalization_loop import GREETING, QA, UNSEEN  # the demonstration's data
from inference import LLM, SamplingParams
from tenants.training.examples import load_renderer, prepare_training_data
from tenants.training.lora_trainer import LoraTrainingConfig, train_lora

pytestmark = pytest.mark.slow

TIME_GOAL_S = 180  # the goal for this data on 2 cores


def _styled(llm: LLM, adapter: str | None) -> list[str]:
    conversations = [[{"role": "user", "content": q}] for q in UNSEEN]
    outs = llm.chat(conversations, SamplingParams(max_tokens=8, temperature=0.0),
                    adapters=[adapter] * len(conversations))
    return [o.text for o in outs]


def test_a_dozen_examples_teach_a_greeting(bundled_checkpoint, tmp_path):
    examples = [[{"role": "user", "content": q}, {"role": "assistant", "content": f"{GREETING} {a}"}] for q, a in QA]
    data = prepare_training_data(examples, load_renderer(bundled_checkpoint), seed=0)
    assert (len(data.train), len(data.eval)) == (10, 2)
    started = time.monotonic()
    result = train_lora(bundled_checkpoint, data.train, data.eval, LoraTrainingConfig(rank=8, max_threads=1),
                        tmp_path / "greeting")
    seconds = time.monotonic() - started
    with LLM(str(bundled_checkpoint)) as llm:
        before = _styled(llm, None)
        llm.register_adapter("greeting", result.output_dir)
        after = _styled(llm, "greeting")
    styled_before = sum(text.startswith(GREETING) for text in before)
    styled_after = sum(text.startswith(GREETING) for text in after)
    print(f"\ntraining: {seconds:.1f} s ({result.steps} steps, {result.threads} thread), eval loss "
          f"{result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f}, train loss (last epoch) "
          f"{result.train_loss:.3f}; unseen prompts starting with the greeting: {styled_before}/{len(UNSEEN)} "
          f"before, {styled_after}/{len(UNSEEN)} after")
    for b, a in zip(before, after):
        print(f"  {b!r} -> {a!r}")
    assert styled_before == 0
    assert styled_after > len(UNSEEN) // 2, after
    assert result.eval_loss_after < result.eval_loss_before
    assert seconds < TIME_GOAL_S
