"""Loading and complete validation of a Hugging Face PEFT LoRA adapter against the base model.

An adapter is the two files ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``. Everything is checked before any tensor reaches the engine: the
config (only plain LoRA on the decoder's seven projections, in every layer; see
``peft_config``), the exact key set of the weights, every shape against the base model, dtypes
and finiteness (``peft_tensors``). All problems found are reported together in one
:class:`AdapterValidationError`. An adapter is validated once, when it is uploaded or registered;
later reads of the same bytes (identified by their sha256) only load them.

Pickle-based files (``*.bin``, ``*.pt``, ...) are refused without being opened: this package never
calls ``torch.load`` or ``pickle``. Weights are parsed with ``safetensors`` only.

The result, :class:`LoraAdapterWeights` (``lora_weights``), holds per-module stacks over layers
in float32 on the CPU. This module is the home of the public names of the format, the checks and
the weights, wherever they are defined.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from inference.adapters.lora_weights import LoraAdapterWeights, LoraModuleWeights, layer_offsets, pack_layers  # noqa: F401
from inference.adapters.peft_config import (  # noqa: F401  (re-exported)
    ALLOWED_TASK_TYPES,
    PEFT_DEFAULT_ALPHA,
    PEFT_DEFAULT_R,
    SAFE_INIT_LORA_WEIGHTS,
    check_config,
    is_int,
)
from inference.adapters.peft_format import (  # noqa: F401  (re-exported)
    ALLOWED_DTYPES,
    CONFIG_FILE,
    MODULE_ORDER,
    PICKLE_SUFFIXES,
    SHARED_INPUT,
    WEIGHTS_FILE,
    AdapterValidationError,
    lora_key,
)
from inference.adapters.peft_tensors import (
    check_finite_each,
    check_rank_dims,
    check_tensors,
    expected_shapes,
    parse_safetensors,
    stack_checked,
)
from inference.adapters.safetensors_header import (  # noqa: F401  (MAX_... re-exported)
    MAX_SAFETENSORS_HEADER_BYTES,
    read_safetensors_header,
)
from inference.model_config import ModelConfig
from inference.openmp_workers import releases_openmp_workers

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Directory
# --------------------------------------------------------------------------------------------


def _scan_dir(directory: Path, problems: list[str]) -> set[str]:
    """The entries' names; pickle files and symlinks leaving the directory are problems."""
    root = os.path.realpath(directory)
    names: set[str] = set()
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            names.add(entry.name)
            if entry.name.lower().endswith(PICKLE_SUFFIXES):
                problems.append(
                    f"{entry.name}: pickle files are not loaded (they can run arbitrary code); "
                    f"save the adapter as {WEIGHTS_FILE} (safetensors)"
                )
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.commonpath([root, target]) != root:
                    problems.append(f"{entry.name} is a symlink pointing outside the adapter directory")
    return names


def adapter_files_from_dir(path: str | Path) -> tuple[bytes, bytes]:
    """Return ``(adapter_config.json bytes, adapter_model.safetensors bytes)`` from a PEFT directory.

    Refuses (one :class:`AdapterValidationError` listing everything): a missing directory or file,
    any pickle-style file (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``; never opened), and
    symlinks that resolve outside the directory. Only the two adapter files are read.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterValidationError([f"{directory} is not a directory"])
    problems: list[str] = []
    names = _scan_dir(directory, problems)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in names:
            problems.append(f"{name} is missing from {directory}")
        elif not (directory / name).is_file():
            problems.append(f"{name} is not a regular file")
    if problems:
        raise AdapterValidationError(problems)
    return (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes()


def load_adapter_dir(path: str | Path, model: ModelConfig, max_rank: int = 128) -> LoraAdapterWeights:
    """Read and validate a PEFT LoRA directory against ``model``; see :func:`validate_adapter_files`."""
    config_bytes, weights_bytes = adapter_files_from_dir(path)
    return validate_adapter_files(config_bytes, weights_bytes, model, max_rank)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_PARSE_ERRORS = (ValueError, TypeError, LookupError, OverflowError, RecursionError, re.error)


@contextmanager
def _unparseable_refused() -> Iterator[None]:
    """The last line of defence: input that makes a parsing step raise anything other than
    AdapterValidationError is refused with that error (and logged, so that the gap gets a check
    of its own). User input must never surface as an unexpected exception (an api 500, a crashed
    validation task)."""
    try:
        yield
    except AdapterValidationError:
        raise
    except _PARSE_ERRORS as exc:
        log.warning("adapter refused on an unexpected %s while parsing it", type(exc).__name__, exc_info=True)
        raise AdapterValidationError(
            [f"the adapter could not be parsed ({type(exc).__name__}: {str(exc)[:200]})"]
        ) from exc


@dataclass(frozen=True)
class AdapterSummary:
    """What a header check learned: the rank and the target modules (in ``MODULE_ORDER``)."""

    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]


def check_adapter_header(
    config_bytes: bytes, weights_path: str | Path, model: ModelConfig, max_rank: int = 128
) -> AdapterSummary:
    """Every check of :func:`validate_adapter_files` that needs no tensor data: the config, the
    safetensors framing, the exact key set, shapes, dtypes and rank dimensions. Cheap for any
    size (the upload path runs it before storing anything). Finiteness is left to the full check.
    Raises :class:`AdapterValidationError` listing every problem."""
    problems: list[str] = []
    with _unparseable_refused():
        cfg = check_config(config_bytes, model, max_rank, problems)
        tensors = read_safetensors_header(weights_path, problems)
        if tensors is not None:
            check_tensors(tensors, expected_shapes(cfg, model), problems)
            check_rank_dims(tensors, cfg, problems)
    if problems:
        raise AdapterValidationError(problems)
    assert cfg.rank is not None and cfg.lora_alpha is not None and cfg.targets is not None
    return AdapterSummary(cfg.rank, cfg.lora_alpha, tuple(m for m in MODULE_ORDER if m in cfg.targets))


@releases_openmp_workers  # it runs on fetcher and request threads, not the engine's
def validate_adapter_files(
    config_bytes: bytes, weights_bytes: bytes, model: ModelConfig, max_rank: int = 128
) -> LoraAdapterWeights:
    """Validate a PEFT LoRA adapter (``adapter_config.json`` and ``adapter_model.safetensors`` bytes)
    against the base ``model`` and return its weights as float32 per-module stacks.

    Checks: config semantics (plain LoRA, ``1 <= r <= max_rank``, positive finite ``lora_alpha``,
    targets resolving to whole-model projections, no unsupported PEFT features), the exact key set
    for every layer and target, each tensor's shape ([r, in] for ``lora_A``, [out, r] for
    ``lora_B``), dtype (fp16/bf16/fp32) and finiteness. Raises :class:`AdapterValidationError`
    listing every problem found (whatever the bytes are, it raises nothing else).
    """
    if not is_int(max_rank) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    problems: list[str] = []
    modules = {}
    with _unparseable_refused():
        cfg = check_config(config_bytes, model, max_rank, problems)
        tensors = parse_safetensors(weights_bytes, problems)
        if tensors is not None:
            expected = expected_shapes(cfg, model)
            check_tensors(tensors, expected, problems)
            check_rank_dims(tensors, cfg, problems)
            if problems:  # still name the non-finite tensors, checking them one by one
                present = list(tensors) if expected is None else [k for k in expected if k in tensors]
                check_finite_each(tensors, present, problems)
            else:
                modules = stack_checked(tensors, model.num_layers, cfg.targets, problems)
    if problems:
        raise AdapterValidationError(problems)
    assert cfg.raw is not None and cfg.rank is not None and cfg.lora_alpha is not None and cfg.targets is not None
    rank, alpha = cfg.rank, cfg.lora_alpha
    scaling = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank
    return LoraAdapterWeights(
        rank=rank,
        lora_alpha=alpha,
        use_rslora=cfg.use_rslora,
        scaling=scaling,
        modules=modules,
        sha256=hashlib.sha256(weights_bytes).hexdigest(),
        config=cfg.raw,
    )
