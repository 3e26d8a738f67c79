"""The LoRA trainer (tenants/training/lora_trainer.py) on a tiny random Llama with the bundled
tokenizer. Losses are checked against Hugging Face's own loss on the HF model with PEFT loading the
saved files; the saved adapter against the repo's validation and the engine's greedy tokens."""

from __future__ import annotations

import hashlib
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from inference import LLM, SamplingParams
from inference.adapters.peft_checkpoint import AdapterValidationError, load_adapter_dir
from inference.model_config import ModelConfig
from support.hf_reference import hf_greedy, load_hf
from tenants.training.examples import IGNORE_INDEX, load_renderer, prepare_training_data
from tenants.training.lora_trainer import (
    LoraTrainingConfig,
    TrainingCancelled,
    TrainingDiverged,
    train_lora,
)

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG = LoraTrainingConfig(rank=4, alpha=8, target_modules=ALL_MODULES, epochs=8, learning_rate=1e-2,
                            batch_size=3, seed=7, max_threads=1)


def _examples(rng: random.Random, count: int) -> list[list[dict]]:
    """Conversations whose answers all start with the same phrase (a style to learn)."""
    nouns = ["river", "cat", "moon", "bread", "engine", "violin", "garden", "storm", "coin", "tower"]
    out = []
    for _ in range(count):
        a, b = rng.sample(nouns, 2)
        turns = [{"role": "user", "content": f"Tell me about the {a}."},
                 {"role": "assistant", "content": f"Ahoy matey! The {a} is fine."}]
        if rng.random() < 0.4:
            turns += [{"role": "user", "content": f"And the {b}?"},
                      {"role": "assistant", "content": f"Ahoy matey! The {b} too."}]
        out.append(turns)
    return out


def hf_loss(model, rows) -> float:
    """Per-token loss of ``rows`` by transformers' own causal-LM loss, one unpadded row at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            n = sum(label != IGNORE_INDEX for label in row.labels[1:])
            out = model(input_ids=torch.tensor([row.input_ids]), labels=torch.tensor([row.labels]))
            total += float(out.loss) * n
            count += n
    return total / count


def peft_on_hf(checkpoint: Path, adapter_dir: Path):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf(checkpoint), str(adapter_dir))
    model.eval()
    return model


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tiny_checkpoint):
    rng = random.Random(1234)
    return prepare_training_data(_examples(rng, 10), load_renderer(tiny_checkpoint), seed=3,
                                 keys=[f"ex{i}" for i in range(10)])


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, data, tmp_path_factory):
    """One fresh training: (result, progress calls, thread counts seen during the steps)."""
    calls, threads = [], []

    def progress(step, total, loss):
        calls.append((step, total, loss))
        threads.append(torch.get_num_threads())

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("trained") / "adapter"
    result = train_lora(tiny_checkpoint, data.train, data.eval, CONFIG, out, on_progress=progress)
    assert torch.get_num_threads() == before  # the thread budget was restored
    return result, calls, threads


def test_training_reduces_the_training_loss(tiny_checkpoint, data, trained):
    result, calls, threads = trained
    base = load_hf(tiny_checkpoint)
    before = hf_loss(base, data.train)
    after = hf_loss(peft_on_hf(tiny_checkpoint, result.output_dir), data.train)
    assert after < before - 2.0, (before, after)  # nats per token; about 10.7 -> 7.4 on this tiny model
    assert result.train_loss < calls[0][2] - 2.0
    steps = math.ceil(len(data.train) / CONFIG.batch_size) * CONFIG.epochs
    assert [(s, t) for s, t, _ in calls] == [(s, steps) for s in range(1, steps + 1)]
    assert [l for *_, l in calls] == result.step_losses and result.steps == steps
    assert set(threads) == {1} and result.threads == 1  # the budget held during the steps
    assert (result.started_from, result.rank, result.lora_alpha, result.target_modules) == ("base", 4, 8.0, ALL_MODULES)
    assert (result.train_examples, result.eval_examples) == (len(data.train), len(data.eval))


def test_eval_losses_are_the_held_out_rows_before_and_after(tiny_checkpoint, data, trained):
    result, _, _ = trained
    base = load_hf(tiny_checkpoint)
    tuned = peft_on_hf(tiny_checkpoint, result.output_dir)
    assert math.isclose(result.eval_loss_before, hf_loss(base, data.eval), rel_tol=1e-5)
    assert math.isclose(result.eval_loss_after, hf_loss(tuned, data.eval), rel_tol=1e-5)
    # not the training rows', nor all rows'
    for rows in (data.train, data.train + data.eval):
        assert not math.isclose(result.eval_loss_before, hf_loss(base, rows), rel_tol=1e-3)
        assert not math.isclose(result.eval_loss_after, hf_loss(tuned, rows), rel_tol=1e-3)


def test_the_saved_adapter_passes_validation_and_serves_like_peft(tiny_checkpoint, trained):
    result, _, _ = trained
    out = result.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    weights = load_adapter_dir(out, ModelConfig.from_checkpoint(tiny_checkpoint))
    assert weights.rank == 4 and set(weights.modules) == set(ALL_MODULES) and weights.scaling == 2.0
    assert str(tiny_checkpoint.parent) not in (out / "adapter_config.json").read_text()  # no server path
    renderer = load_renderer(tiny_checkpoint)
    prompts = [renderer.render([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("Tell me about the sea.", "What is a violin?", "Hello")]
    tuned, base = peft_on_hf(tiny_checkpoint, out), load_hf(tiny_checkpoint)
    expected = [hf_greedy(tuned, ids, 8) for ids in prompts]
    assert any(e != hf_greedy(base, ids, 8) for e, ids in zip(expected, prompts))  # the adapter matters
    with LLM(str(tiny_checkpoint), page_tokens=4, cpu_pool_bytes=8 << 20) as llm:
        llm.register_adapter("trained", out)
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                            adapters=["trained"] * len(prompts))
    assert [o.token_ids for o in outs] == expected


def test_same_seed_same_adapter_other_seed_another(tiny_checkpoint, data, trained, tmp_path):
    result, _, _ = trained
    again = train_lora(tiny_checkpoint, data.train, data.eval, CONFIG, tmp_path / "again")
    assert _sha(again.output_dir) == _sha(result.output_dir)
    assert again.step_losses == result.step_losses and again.eval_loss_after == result.eval_loss_after
    other = train_lora(tiny_checkpoint, data.train, data.eval,
                       LoraTrainingConfig(**{**CONFIG.__dict__, "seed": CONFIG.seed + 1, "epochs": 1}),
                       tmp_path / "other")
    first_epoch = train_lora(tiny_checkpoint, data.train, data.eval,
                             LoraTrainingConfig(**{**CONFIG.__dict__, "epochs": 1}), tmp_path / "first")
    assert _sha(other.output_dir) != _sha(first_epoch.output_dir)


@pytest.mark.parametrize("cancel_at", ["first", "middle", "before_save"])
def test_cancellation_leaves_nothing(tiny_checkpoint, data, tmp_path, cancel_at):
    steps = math.ceil(len(data.train) / CONFIG.batch_size) * CONFIG.epochs
    # asked once the model is loaded, before each step, and before saving
    answer_true_at = {"first": 1, "middle": 4, "before_save": steps + 2}[cancel_at]
    asked = []

    def should_cancel() -> bool:
        asked.append(1)
        return len(asked) >= answer_true_at

    parent = tmp_path / "adapters"
    parent.mkdir()
    (parent / "other-user").mkdir()
    torch.set_num_threads(2)  # the conftest's fixture restores its own count afterwards
    with pytest.raises(TrainingCancelled) as info:
        train_lora(tiny_checkpoint, data.train, data.eval, CONFIG, parent / "new", should_cancel=should_cancel)
    assert info.value.step == max(0, answer_true_at - 2) and info.value.total_steps == steps
    assert len(asked) == answer_true_at
    assert [p.name for p in parent.iterdir()] == ["other-user"]  # no output, no partial directory
    assert torch.get_num_threads() == 2  # the budget (1) was undone on the way out


def test_continuing_starts_from_the_adapter(tiny_checkpoint, data, trained, tmp_path):
    result, _, _ = trained
    start = result.output_dir
    before_sha = _sha(start)
    config = LoraTrainingConfig(rank=2, target_modules=("q_proj",), epochs=1, learning_rate=1e-3, batch_size=4, seed=1)
    cont = train_lora(tiny_checkpoint, data.train, data.eval, config, tmp_path / "v2", start_adapter=start)
    reference = hf_loss(peft_on_hf(tiny_checkpoint, start), data.eval)
    assert math.isclose(cont.eval_loss_before, reference, rel_tol=1e-5)
    assert math.isclose(cont.eval_loss_before, result.eval_loss_after, rel_tol=1e-5)
    assert not math.isclose(cont.eval_loss_before, result.eval_loss_before, rel_tol=1e-3)  # not the base's
    # the adapter's own rank and targets are kept; its files are untouched
    assert (cont.started_from, cont.rank, cont.target_modules) == ("adapter", 4, ALL_MODULES)
    assert _sha(start) == before_sha and _sha(cont.output_dir) != before_sha
    load_adapter_dir(cont.output_dir, ModelConfig.from_checkpoint(tiny_checkpoint))


def test_a_pickled_starting_adapter_is_refused_unopened(tiny_checkpoint, data, trained, tmp_path):
    start = tmp_path / "start"
    shutil.copytree(trained[0].output_dir, start)
    (start / "adapter_model.safetensors").unlink()
    (start / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterValidationError, match="pickle"):
        train_lora(tiny_checkpoint, data.train, data.eval, CONFIG, tmp_path / "out", start_adapter=start)
    assert not (tmp_path / "out").exists()


def test_bad_input_names_every_problem(tiny_checkpoint, data, tmp_path):
    bad = LoraTrainingConfig(rank=0, alpha=-1.0, target_modules=("q_proj", "lm_head", "q_proj"), epochs=99,
                             learning_rate=float("nan"), batch_size=0, seed=-1, max_threads=0)
    assert len(bad.problems()) == 9, bad.problems()
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(ValueError) as info:
        train_lora(tiny_checkpoint, data.train, data.train[:1], bad, taken, start_adapter=tmp_path / "missing")
    message = str(info.value)
    for needle in ("rank must be between 1 and 64, got 0", "alpha must be in (0.0, 1024.0], got -1.0",
                   "['lm_head'] are not adaptable", "target_modules has duplicates", "epochs must be between 1 and 20",
                   "learning_rate must be a finite number", "batch_size must be between 1 and 64, got 0",
                   "seed must be between", "max_threads must be at least 1, got 0",
                   f"examples both trained on and held out: {data.train[0].key}",
                   f"the output directory {taken} already exists", "is not a directory"):
        assert needle in message, (needle, message)
    with pytest.raises(ValueError, match="no training rows; no held-out rows"):
        train_lora(tiny_checkpoint, [], [], CONFIG, tmp_path / "empty")
    assert LoraTrainingConfig().problems() == []


def test_a_diverging_training_writes_nothing(tiny_checkpoint, data, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k in sorted(weights) if "layers.1.mlp.down_proj" in k)
    weights[name][0, 0] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingDiverged, match="step 1 of"):
        train_lora(broken, data.train, data.eval, CONFIG, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_a_bf16_base_trains_an_fp32_adapter(tiny_checkpoint, data, tmp_path):
    """The CUDA default's mixed precision (base weights bf16, adapter fp32), here on the CPU."""
    from safetensors import safe_open

    config = LoraTrainingConfig(**{**CONFIG.__dict__, "epochs": 3})  # bf16 matmuls are slow on this CPU
    result = train_lora(tiny_checkpoint, data.train, data.eval, config, tmp_path / "bf16", dtype=torch.bfloat16)
    assert result.dtype == "bfloat16"
    assert math.isclose(result.eval_loss_before, hf_loss(load_hf(tiny_checkpoint), data.eval), rel_tol=2e-2)
    assert result.train_loss < result.step_losses[0] - 1.0
    with safe_open(str(result.output_dir / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    load_adapter_dir(result.output_dir, ModelConfig.from_checkpoint(tiny_checkpoint))
