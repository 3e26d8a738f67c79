"""Write random LoRA adapters in Hugging Face PEFT's exact on-disk format (for tests and benchmarks)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def synthetic_adapter(
    out_dir: Path,
    model_config,
    *,
    r: int,
    targets: Sequence[str],
    alpha: float,
    seed: int,
    std: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for a rank-``r`` LoRA on
    ``targets`` of every layer of ``model_config`` (an ``inference.model_config.ModelConfig``),
    with N(0, std) weights drawn from ``seed``. PEFT's ``PeftModel.from_pretrained`` loads it."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model_config.linear_shapes()
    tensors = {}
    for layer in range(model_config.num_layers):
        for name in targets:
            group = "self_attn" if name in ATTENTION_MODULES else "mlp"
            in_f, out_f = shapes[name]
            prefix = f"base_model.model.model.layers.{layer}.{group}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * std).to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


def peft_adapter(base_model, out_dir: Path, *, r: int, targets, alpha: float | None = None,
                 rslora: bool = False, b_std: float = 0.02, seed: int = 0):
    """Inject a LoRA with PEFT into ``base_model``, randomise B (PEFT initialises it to zero) and
    save it to ``out_dir``. Returns the PeftModel (call ``.unload()`` to get the base back)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets)
                        if not isinstance(targets, str) else targets, use_rslora=rslora, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    model.eval()
    model.save_pretrained(str(out_dir))
    return model
