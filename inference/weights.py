"""Load a Llama-family checkpoint's weights from safetensors files (one file or a sharded index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from inference.model_config import ModelConfig

# Keys that some checkpoints carry but that the engine recomputes or never needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the engine needs, by checkpoint key, with its shape ``(out, in)`` or ``(n,)``."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (h,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (h,)
        for name, (in_f, out_f) in config.linear_shapes().items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            shapes[f"{prefix}.{group}.{name}.weight"] = (out_f, in_f)
    return shapes


def safetensors_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: those named by ``model.safetensors.index.json`` or all
    ``*.safetensors`` in the directory. Pickle checkpoints (``*.bin``, ``*.pt``) are never read."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted({checkpoint_dir / name for name in weight_map.values()})
    else:
        files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{checkpoint_dir} has no .safetensors weights (pickle .bin checkpoints are not loaded)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"safetensors files named by the index are missing: {missing}")
    return files


def load_weights(
    checkpoint_dir: Path, config: ModelConfig, device: torch.device | str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Read every expected weight, cast to ``dtype`` on ``device``.

    Raises ValueError naming all missing keys, unexpected keys and wrong shapes at once.
    """
    expected = expected_shapes(config)
    found: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in safetensors_files(checkpoint_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if key in expected:
                        found[key] = handle.get_tensor(key)
                    elif not key.endswith(_IGNORED_SUFFIXES) and not (
                        key == "lm_head.weight" and config.tie_word_embeddings
                    ):
                        unexpected.append(key)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read weights from {path}: {exc}") from exc
    problems = []
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected weights {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    bad_shapes = [
        f"{k}: {tuple(t.shape)} != {expected[k]}" for k, t in found.items() if tuple(t.shape) != expected[k]
    ]
    if bad_shapes:
        problems.append("wrong shapes " + ", ".join(bad_shapes[:8]))
    if problems:
        raise ValueError(f"checkpoint {checkpoint_dir} does not match its config: " + "; ".join(problems))
    return {k: t.to(device=device, dtype=dtype) for k, t in found.items()}
