"""The base model's architecture, read from a Hugging Face ``config.json`` and validated.

Only what the engine's Llama implementation computes is accepted. Anything it would silently get
wrong (biases, other activations, unknown RoPE scaling types, sliding windows) is refused with an
error naming every offending field at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something the engine does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    ``rope_type`` is ``default``, ``linear`` (positions divided by ``factor``) or ``llama3``
    (frequency-dependent scaling with ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``, as Llama 3.1 uses).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-family decoder. Widths are in elements, not bytes."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        """Width of the concatenated query heads: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of one token's K (or V) row in one layer: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each per-layer projection, keyed by PEFT module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Validate a parsed ``config.json``; raise :class:`UnsupportedModelError` naming every problem."""
        problems: list[str] = []
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        unsupported_arch = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if unsupported_arch:
            problems.append(
                f"architectures {unsupported_arch} not supported (supported: {list(SUPPORTED_ARCHITECTURES)})"
            )
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(f"model_type {model_type!r} not supported (supported: {list(SUPPORTED_MODEL_TYPES)})")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        if raw.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {raw.get('hidden_act')!r} not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                problems.append(f"{flag}=true not supported")
        if raw.get("sliding_window"):
            problems.append("sliding_window attention not supported")
        rope, rope_problems = _parse_rope(raw)
        problems.extend(rope_problems)
        if problems:
            raise UnsupportedModelError("unsupported model config: " + "; ".join(problems))

        num_heads = raw["num_attention_heads"]
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        shape_problems = []
        if num_heads % num_kv_heads:
            shape_problems.append(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        if head_dim % 2:
            shape_problems.append(f"head_dim {head_dim} must be even for rotary embeddings")
        if shape_problems:
            raise UnsupportedModelError("unsupported model config: " + "; ".join(shape_problems))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=rope,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> "ModelConfig":
        """Read and validate ``checkpoint_dir/config.json``."""
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{checkpoint_dir} is not a model checkpoint directory: config.json is missing")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)


def _parse_rope(raw: dict[str, Any]) -> tuple[RopeConfig, list[str]]:
    """Read RoPE settings from either the classic (``rope_theta`` + ``rope_scaling``) or the
    transformers-5 (``rope_parameters``) spelling."""
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    problems = []
    if rope_type not in SUPPORTED_ROPE_TYPES:
        problems.append(f"rope scaling type {rope_type!r} not supported (supported: {list(SUPPORTED_ROPE_TYPES)})")
        return RopeConfig(theta=theta), problems
    if not math.isfinite(theta) or theta <= 0:
        problems.append(f"rope_theta must be positive, got {theta}")
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and (not math.isfinite(factor) or factor <= 0):
        problems.append(f"rope scaling factor must be positive, got {factor}")
    return (
        RopeConfig(
            theta=theta,
            rope_type=rope_type,
            factor=factor,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        ),
        problems,
    )
