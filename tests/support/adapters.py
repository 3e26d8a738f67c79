"""Make LoRA adapters for tests: with real PEFT, or synthetic files in PEFT's exact format."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.synthetic_adapters import synthetic_adapter  # noqa: F401  (re-exported for tests)


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
