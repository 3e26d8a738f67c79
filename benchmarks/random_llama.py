"""Random-weight Llama checkpoints of published shapes, written without downloading anything.

S-LoRA's evaluation runs Llama-7B and Llama-13B; what the speed of serving depends on is their
shapes, not their weights. :func:`write_random_llama` writes a checkpoint directory that the engine
(and Hugging Face ``from_pretrained``, for the PEFT baseline) loads like any other: ``config.json``,
one safetensors file per layer with ``model.safetensors.index.json``, and a word-level tokenizer
(``t0 .. t{V-1}``; t1 = BOS, t2 = EOS, from ``benchmarks.gpu_check.checkpoints``) with a plain
chat template (``t3 <content> ... t4``) so that the chat endpoints serve it too. Matrices are
N(0, ``std``) in ``dtype`` (fp16 by default, as S-LoRA ran), norms are ones. Tensors are drawn on
``generate_on`` (a GPU draws 7B parameters in about a second; the CPU takes minutes), one layer
at a time, so host memory holds one layer, not the model.

:func:`random_checkpoint` keeps a finished checkpoint in a cache folder (keyed by shape, dtype and
seed; a ``.complete`` marker is written last, so a half-written one is rewritten) so that repeated
runs pay the write once: 13.5 GB for Llama-7B in fp16, 26 GB for Llama-13B.

Model names for the benchmarks: ``random:llama-7b``, ``random:llama-13b``, ``random:tiny`` (see
:data:`SHAPES`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.decode_step import PRESETS
from benchmarks.gpu_check.checkpoints import write_tokenizer
from inference.model_config import ModelConfig
from inference.weights import expected_shapes

PREFIX = "random:"
SHAPES: dict[str, dict] = {
    "llama-7b": PRESETS["llama-7b"],
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
# every message's words after t3, then t4 where the answer starts
CHAT_TEMPLATE = ("{% for message in messages %}t3 {{ message['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}t4{% endif %}")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def hf_config(shape: dict, dtype: str, max_positions: int = 4096) -> dict:
    """The ``config.json`` of a random Llama of ``shape`` (HF ``LlamaConfig`` fields)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, **shape}


def write_random_llama(out_dir: Path, shape: dict, *, dtype: str = "float16", seed: int = 0, std: float = 0.02,
                       generate_on: str | torch.device = "cpu") -> Path:
    """Write a random Llama of ``shape`` to ``out_dir`` (see the module docstring); returns it."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = hf_config(shape, dtype)
    config = ModelConfig.from_dict(raw)
    torch_dtype = _DTYPES[dtype]
    generator = torch.Generator(device=generate_on).manual_seed(seed)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, size in expected_shapes(config).items():
        parts = key.split(".")
        group = f"layer-{int(parts[2]):03d}" if parts[1] == "layers" else "outer"
        groups.setdefault(group, {})[key] = size
    weight_map = {}
    for group, shapes in sorted(groups.items()):
        tensors = {}
        for key, size in shapes.items():
            if len(size) == 1:
                tensors[key] = torch.ones(size, dtype=torch_dtype)
            else:
                drawn = torch.randn(size, generator=generator, device=generate_on, dtype=torch.float32)
                tensors[key] = (drawn * std).to(torch_dtype).cpu()
        filename = f"model-{group}.safetensors"
        save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
        weight_map.update({key: filename for key in tensors})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    write_tokenizer(out_dir, shape["vocab_size"])
    tokenizer_config = out_dir / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "chat_template": CHAT_TEMPLATE}))
    return out_dir


def random_checkpoint(name: str, cache_dir: Path, *, dtype: str = "float16", seed: int = 0,
                      generate_on: str | torch.device = "cpu") -> Path:
    """The checkpoint for ``random:<shape>`` in ``cache_dir`` (written the first time)."""
    shape_name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if shape_name not in SHAPES:
        raise ValueError(f"unknown random model {name!r}: choose from {[PREFIX + s for s in SHAPES]}")
    folder = Path(cache_dir) / f"{shape_name}-{dtype}-seed{seed}"
    marker = folder / ".complete"
    if not marker.is_file():
        write_random_llama(folder, SHAPES[shape_name], dtype=dtype, seed=seed, generate_on=generate_on)
        marker.write_text("ok\n")
    return folder


def is_random_model(name: str) -> bool:
    return str(name).startswith(PREFIX)


def checkpoint_for(name: str, cache_dir: Path, **random_options) -> Path:
    """The checkpoint a benchmark's ``--model`` names: ``random:<shape>`` written into ``cache_dir``
    (``random_options`` go to :func:`random_checkpoint`), else a bundled model or a directory."""
    if is_random_model(name):
        return random_checkpoint(name, cache_dir, **random_options)
    from inference.engine import resolve_model

    return Path(resolve_model(name))
