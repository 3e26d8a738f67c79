"""Facts about the Hugging Face PEFT LoRA format that every other adapter module shares: the file
names, the adaptable projections and their order, the safetensors key of each factor, the dtypes
accepted, and the one error every refusal raises."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The adaptable projections, in the order every per-layer layout uses."""

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections the model computes from one input, each family in one ``LoraApplier.apply`` call."""

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

SUBMODULE = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in MODULE_ORDER}
"""The decoder-layer submodule (attention or MLP) that holds each projection."""

_KEY_PREFIX = "base_model.model."
_LIST_LIMIT = 5  # how many keys a missing/unexpected-key message names before giving a count


class AdapterValidationError(ValueError):
    """An adapter was refused. ``problems`` lists every violation found; ``str()`` shows them all."""

    def __init__(self, problems: Sequence[str]):
        self.problems: list[str] = list(problems) or ["unknown problem"]
        count = len(self.problems)
        header = f"invalid LoRA adapter ({count} problem{'s' if count != 1 else ''}):"
        super().__init__(header + "".join(f"\n  - {p}" for p in self.problems))


def lora_key(layer: int, module: str, factor: str) -> str:
    """The safetensors key PEFT writes for ``factor`` ("A" or "B") of ``module`` in ``layer``."""
    return f"{_KEY_PREFIX}model.layers.{layer}.{SUBMODULE[module]}.{module}.lora_{factor}.weight"


def name_list(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    """The first ``limit`` names, then how many more (for error messages)."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
