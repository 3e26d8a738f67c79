"""Helpers that compute reference outputs with Hugging Face transformers (independent of our model)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load_hf(checkpoint: Path):
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one unpadded prompt, exactly ``max_new_tokens`` tokens.

    A plain argmax loop over HF's own KV-cached forward: EOS is neither suppressed (as
    ``min_new_tokens`` would) nor a stop, matching the engine with ``ignore_eos=True``.
    """
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@torch.no_grad()
def hf_last_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt_ids])).logits[0, -1].float()
