"""Train a LoRA adapter on the base model's checkpoint with Hugging Face PEFT: a plain torch loop
(AdamW, linear decay, gradient clipping), loss on the labelled (assistant) tokens only.

Input: the checkpoint directory, rows from ``tenants.training.examples`` (training and held-out),
a :class:`LoraTrainingConfig`, and either nothing (a fresh adapter) or the directory of an adapter
to continue from (loaded trainable, with its own rank, alpha and targets). Output: the adapter in
PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), written to the caller's
directory only when the training succeeded; a cancelled or failed training leaves nothing there.

Losses are per labelled token (nats): the sum of the token cross-entropies over the rows divided by
the number of labelled tokens, so the evaluation loss does not depend on the batch size or the
padding. The evaluation loss is computed on the held-out rows before the first step (of the starting
point: the base model, or the adapter continued from) and after the last.

Determinism: on the CPU, the same checkpoint, rows, config (seed included), starting adapter and
thread count give bit-identical adapters. The fresh ``lora_A`` is drawn from a generator seeded with
``seed`` (PEFT's distribution, Kaiming-uniform; ``lora_B`` starts at zero), the batch order from
another, and dropout is off, so nothing reads torch's global random state. CUDA kernels are not
bitwise reproducible in general.

Threads: torch's intra-op thread count is per calling thread in this torch build; the trainer sets
the calling thread's count to ``config.max_threads`` for the training and restores it afterwards,
then gives its OpenMP workers back (``inference.openmp_workers``), so a training on a helper thread
leaves the engine thread alone.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from inference.adapters.peft_format import CONFIG_FILE, MODULE_ORDER, WEIGHTS_FILE
from tenants.training.examples import IGNORE_INDEX, TrainingRow

# Bounds of the settings a caller may choose (the API's 422s use them).
MIN_RANK, MAX_RANK = 1, 64
MIN_EPOCHS, MAX_EPOCHS = 1, 20
MAX_LEARNING_RATE = 1e-2
MAX_BATCH_SIZE = 64

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

ProgressCallback = Callable[[int, int, float], None]
"""``(step, total_steps, train_loss)``: called after each optimizer step; ``step`` counts from 1,
``train_loss`` is that step's batch loss per labelled token (nats)."""


class TrainingCancelled(Exception):
    """The cancellation callable answered True; nothing was written. ``step`` steps of
    ``total_steps`` had run."""

    def __init__(self, step: int, total_steps: int):
        self.step, self.total_steps = step, total_steps
        super().__init__(f"training cancelled after {step} of {total_steps} steps")


class TrainingDiverged(RuntimeError):
    """A step's loss was not finite (a learning rate too high for the data); nothing was written."""


@dataclass(frozen=True)
class LoraTrainingConfig:
    """What to train and how. Defaults (reasons in docs/personalization.md, "Training"):

    rank 8 and alpha 16 (``alpha=None`` means ``2 * rank``, a scaling of 2) on the attention
    projections, 3 epochs at a peak learning rate of 2e-3 decayed linearly to 0, batches of 2 rows,
    gradients clipped to norm 1, no weight decay. ``max_threads`` (None: leave the calling thread's
    count) is torch's intra-op thread budget for the training. ``rank``, ``alpha`` and
    ``target_modules`` apply to a fresh adapter only; continuing keeps the adapter's own.
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    epochs: int = 3
    learning_rate: float = 2e-3
    batch_size: int = 2
    seed: int = 0
    max_threads: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def problems(self) -> list[str]:
        """Every setting out of bounds, one message each (empty when the config is usable)."""
        problems: list[str] = []

        def integer(name: str, value: object, low: int, high: int | None) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{name} must be an integer, got {value!r}")
            elif value < low or (high is not None and value > high):
                problems.append(f"{name} must be between {low} and {high}, got {value}" if high is not None
                                else f"{name} must be at least {low}, got {value}")

        def number(name: str, value: object, low: float, high: float, low_open: bool) -> None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
            elif (value <= low if low_open else value < low) or value > high:
                bracket = "(" if low_open else "["
                problems.append(f"{name} must be in {bracket}{low}, {high}], got {value}")

        integer("rank", self.rank, MIN_RANK, MAX_RANK)
        if self.alpha is not None:
            number("alpha", self.alpha, 0.0, 1024.0, low_open=True)
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets:
            problems.append(f"target_modules must be a non-empty list of {', '.join(MODULE_ORDER)}, got {targets!r}")
        else:
            unknown = [t for t in targets if t not in MODULE_ORDER]
            if unknown:
                problems.append(f"target_modules {unknown!r} are not adaptable (only {', '.join(MODULE_ORDER)})")
            if len(set(targets)) != len(targets):
                problems.append(f"target_modules has duplicates: {list(targets)!r}")
        integer("epochs", self.epochs, MIN_EPOCHS, MAX_EPOCHS)
        number("learning_rate", self.learning_rate, 0.0, MAX_LEARNING_RATE, low_open=True)
        integer("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        integer("seed", self.seed, 0, 2**63 - 1)
        if self.max_threads is not None:
            integer("max_threads", self.max_threads, 1, None)
        number("weight_decay", self.weight_decay, 0.0, 1.0, low_open=False)
        number("max_grad_norm", self.max_grad_norm, 0.0, 1e6, low_open=True)
        return problems


@dataclass
class TrainingResult:
    """What a successful training produced. Losses are per labelled token (nats)."""

    output_dir: Path
    started_from: str  # "base" (a fresh adapter) or "adapter" (continued from one)
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]  # in MODULE_ORDER
    train_examples: int
    eval_examples: int
    train_tokens: int  # labelled tokens in the training rows
    steps: int
    epochs: int
    train_loss: float  # over the last epoch's steps
    eval_loss_before: float
    eval_loss_after: float
    seconds: float  # wall time from loading the model to the saved adapter
    device: str
    dtype: str
    threads: int  # torch's intra-op thread count during the training
    step_losses: list[float] = field(default_factory=list)  # each step's batch loss


# --------------------------------------------------------------------------------------------
# Batches and losses
# --------------------------------------------------------------------------------------------


def collate(rows: Sequence[TrainingRow], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows padded on the right to the longest: ``input_ids``, ``labels`` and ``attention_mask``,
    each ``[B, T]`` (int64; padding is ``pad_id`` / ``IGNORE_INDEX`` / 0)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        mask[b, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def batch_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum of the labelled tokens' cross-entropies (fp32 scalar, nats), labelled token count)``
    for a collated batch. ``model`` is a PEFT model over a Llama-style causal LM: the decoder runs
    on every position, the output head only on the positions whose next token is labelled (the
    head is a large share of a small model's compute and is not adapted)."""
    base = model.get_base_model()
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    logits = base.lm_head(hidden[:, :-1][keep]).float()  # [N, vocab]
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, rows: Sequence[TrainingRow], batch_size: int, pad_id: int,
              device: torch.device) -> float:
    """The loss per labelled token over ``rows`` (nats), in batches of ``batch_size`` in order."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        loss, n = batch_loss_sum(model, collate(rows[start:start + batch_size], pad_id, device))
        total += float(loss)
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("the rows have no labelled token")
    return total / count


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU (bf16 matmuls are slow there without AMX); bf16 on a CUDA device that has
    it, else fp32. The adapter's own weights are trained and saved in fp32 either way."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _load_base(checkpoint_dir: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype)
    model.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _fresh_adapter(base: torch.nn.Module, config: LoraTrainingConfig) -> torch.nn.Module:
    """A new LoRA on ``base``: ``lora_B`` zero (the model starts as the base), ``lora_A`` drawn from
    a generator seeded with ``config.seed`` with PEFT's own init (Kaiming-uniform, ``a = sqrt(5)``)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name:
                weight = torch.empty(param.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                param.copy_(weight)
            elif "lora_B" in name:
                param.zero_()
    return model


def _continued_adapter(base: torch.nn.Module, adapter_dir: Path, checkpoint_dir: Path) -> torch.nn.Module:
    """The adapter in ``adapter_dir``, loaded trainable, after the engine's own validation (which
    refuses pickle files, a wrong shape or a config the engine cannot serve, before PEFT reads
    anything)."""
    from peft import PeftModel

    from inference.adapters.peft_checkpoint import load_adapter_dir
    from inference.model_config import ModelConfig

    load_adapter_dir(adapter_dir, ModelConfig.from_checkpoint(checkpoint_dir))
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    for module in model.modules():  # no dropout: deterministic, and nothing reads the global RNG
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@contextmanager
def thread_budget(threads: int | None) -> Iterator[int]:
    """Run the block with the calling thread's torch intra-op count at ``threads`` (None: as it
    is); restore it afterwards and give the thread's idle OpenMP workers back. Yields the count."""
    from inference.openmp_workers import release_openmp_workers

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
        release_openmp_workers()


def _save(model: torch.nn.Module, checkpoint_dir: Path, output_dir: Path) -> None:
    """Write the adapter's two PEFT files into a fresh temporary directory next to ``output_dir``,
    validate them as the engine will (``AdapterValidationError`` otherwise) and rename the directory
    to ``output_dir`` (atomic on one file system): it appears complete or not at all."""
    from inference.adapters.peft_checkpoint import load_adapter_dir
    from inference.model_config import ModelConfig

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex}"
    try:
        model.peft_config["default"].base_model_name_or_path = checkpoint_dir.name  # not the server's path
        model.save_pretrained(str(partial), safe_serialization=True, save_embedding_layers=False)
        for entry in list(partial.iterdir()):  # PEFT also writes a model card (README.md): keep the two files
            if entry.name not in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        load_adapter_dir(partial, ModelConfig.from_checkpoint(checkpoint_dir))  # what serving it will check
        os.rename(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _adapter_summary(model: torch.nn.Module) -> tuple[int, float, tuple[str, ...]]:
    """``(rank, lora_alpha, adapted projections in MODULE_ORDER)`` of the model's adapter."""
    cfg = model.peft_config["default"]
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    return int(cfg.r), float(cfg.lora_alpha), tuple(m for m in MODULE_ORDER if m in adapted)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_lora(
    checkpoint_dir: str | Path,
    train_rows: Sequence[TrainingRow],
    eval_rows: Sequence[TrainingRow],
    config: LoraTrainingConfig,
    output_dir: str | Path,
    *,
    start_adapter: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on ``train_rows`` and save it to ``output_dir`` (which must not exist).

    ``start_adapter``: a PEFT adapter directory to continue from (None: a fresh adapter). ``device``:
    "cpu" or a CUDA device; ``dtype``: the base model's dtype (None: :func:`default_dtype`).
    ``on_progress(step, total_steps, train_loss)`` is called after each step; ``should_cancel()`` is
    asked once the model is loaded, before each step and before saving; True raises
    :class:`TrainingCancelled`. A
    non-finite loss raises :class:`TrainingDiverged`. Bad input raises ValueError naming every
    problem before anything is loaded. On any exception ``output_dir`` is not created.
    """
    started = time.monotonic()
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    device = torch.device(device)
    problems = config.problems()
    if not train_rows:
        problems.append("no training rows")
    if not eval_rows:
        problems.append("no held-out rows (the evaluation loss needs at least one)")
    overlap = {r.key for r in train_rows} & {r.key for r in eval_rows}
    if overlap:
        problems.append(f"examples both trained on and held out: {', '.join(sorted(overlap)[:5])}")
    for row in [*train_rows, *eval_rows]:
        if len(row.input_ids) != len(row.labels) or row.labelled_tokens == 0:
            problems.append(f"row {row.key} has no labelled token or labels of another length than its ids")
    if output_dir.exists():
        problems.append(f"the output directory {output_dir} already exists")
    if start_adapter is not None and not Path(start_adapter).is_dir():
        problems.append(f"the adapter to continue from, {start_adapter}, is not a directory")
    if problems:
        raise ValueError("cannot train: " + "; ".join(problems))
    cancelled = should_cancel or (lambda: False)
    dtype = dtype or default_dtype(device)
    total_steps = math.ceil(len(train_rows) / config.batch_size) * config.epochs

    with thread_budget(config.max_threads) as threads:
        base = _load_base(checkpoint_dir, dtype, device)
        if start_adapter is None:
            model = _fresh_adapter(base, config)
        else:
            model = _continued_adapter(base, Path(start_adapter), checkpoint_dir)
        if cancelled():
            raise TrainingCancelled(0, total_steps)
        pad_id = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        eval_before = mean_loss(model, eval_rows, config.batch_size, pad_id, device)

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total_steps)
        order = torch.Generator().manual_seed(config.seed)
        step, step_losses, epoch_sums = 0, [], (0.0, 0)
        model.train()
        for _epoch in range(config.epochs):
            epoch_sums = (0.0, 0)
            permutation = torch.randperm(len(train_rows), generator=order).tolist()
            for start in range(0, len(permutation), config.batch_size):
                if cancelled():
                    raise TrainingCancelled(step, total_steps)
                batch = collate([train_rows[i] for i in permutation[start:start + config.batch_size]], pad_id, device)
                loss_sum, count = batch_loss_sum(model, batch)
                loss = loss_sum / count
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"the training loss was not finite at step {step + 1} of {total_steps}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                schedule.step()
                step += 1
                value = float(loss.detach())
                step_losses.append(value)
                epoch_sums = (epoch_sums[0] + float(loss_sum.detach()), epoch_sums[1] + count)
                if on_progress is not None:
                    on_progress(step, total_steps, value)
        eval_after = mean_loss(model, eval_rows, config.batch_size, pad_id, device)
        if cancelled():
            raise TrainingCancelled(step, total_steps)
        rank, alpha, targets = _adapter_summary(model)
        _save(model, checkpoint_dir, output_dir)

    return TrainingResult(
        output_dir=output_dir,
        started_from="base" if start_adapter is None else "adapter",
        rank=rank,
        lora_alpha=alpha,
        target_modules=targets,
        train_examples=len(train_rows),
        eval_examples=len(eval_rows),
        train_tokens=sum(r.labelled_tokens for r in train_rows),
        steps=step,
        epochs=config.epochs,
        train_loss=epoch_sums[0] / epoch_sums[1],
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        seconds=time.monotonic() - started,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=threads,
        step_losses=step_losses,
    )
