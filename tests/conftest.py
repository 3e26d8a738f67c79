"""Shared fixtures: the bundled model, tiny random Llama checkpoints, engines built on them."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported (the engine imports it); without a GPU
# every Triton kernel test runs under the interpreter, so set it before anything imports triton.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.backends.cpu import staging
from inference.bundled_model import prepare_bundled_model

pytest_plugins = ["support.service_fixtures"]


SEED_VARIABLE = "TAILOR_TEST_SEED"


@pytest.fixture(autouse=True)
def random_seed(request) -> int:
    """Each test runs on fresh random inputs from a new seed, printed and named in the report of a
    failed test; ``TAILOR_TEST_SEED=<seed>`` replays one. It seeds Python's ``random``, numpy's and
    torch's global generators; a test that makes its own generator draws that one's seed from them
    (``random.Random(random.getrandbits(64))``), so the one seed replays everything."""
    text = os.environ.get(SEED_VARIABLE, "").strip()
    seed = int(text) if text else random.SystemRandom().randrange(2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    request.node.user_properties.append((SEED_VARIABLE, seed))
    print(f"{SEED_VARIABLE}={seed}")
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = dict(item.user_properties).get(SEED_VARIABLE)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"replay with {SEED_VARIABLE}={seed}"))


@pytest.fixture(autouse=True)
def _staged_regions_start_as_nan(monkeypatch):
    """The engine leaves a staging region's new memory unfilled (``staging.unwritten``), because
    every position is written before any group reads it. Uninitialised memory is often zero, which
    would hide a read of it; here it is NaN, so any LoRA product that read it would not be finite."""

    def nan_filled(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(staging, "unwritten", nan_filled)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="session")
def bundled_checkpoint() -> Path:
    """The prepared SmolLM2-135M-Instruct checkpoint directory (converted once, then cached)."""
    return prepare_bundled_model().path


def write_tiny_llama(
    out_dir: Path,
    tokenizer_from: Path,
    *,
    seed: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    tie: bool = True,
    rope_scaling: dict | None = None,
    max_shard_size: str | None = None,
    vocab_size: int = 49152,
) -> Path:
    """Save a random-weight HF Llama checkpoint that shares the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope_parameters = {"rope_theta": 500000.0, **rope_scaling}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
        rope_parameters=rope_parameters,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-init weights so that random models have peaked, non-tied logits
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, bundled_checkpoint) -> Path:
    """A 2-layer GQA Llama with random weights (fast engine tests)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), bundled_checkpoint, seed=1234)


TOOL_TOKENS = ("<tool_call>", "</tool_call>")
HERMES_TEMPLATE = Path(__file__).parent / "support" / "chat_templates" / "hermes_tools.jinja"


@pytest.fixture(scope="session")
def tools_checkpoint(tmp_path_factory, bundled_checkpoint) -> Path:
    """The tiny Llama with a tool-calling tokenizer as Qwen2.5 has it: the bundled (ChatML)
    tokenizer plus ``<tool_call>`` and ``</tool_call>`` as added, non-special tokens, and a
    Hermes-format chat template that renders tools (tests/support/chat_templates/hermes_tools.jinja)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_checkpoint))
    tokenizer.add_tokens(list(TOOL_TOKENS), special_tokens=False)
    out = write_tiny_llama(tmp_path_factory.mktemp("tools"), bundled_checkpoint, seed=4321, vocab_size=len(tokenizer))
    tokenizer.chat_template = HERMES_TEMPLATE.read_text()
    tokenizer.save_pretrained(out)
    return out
