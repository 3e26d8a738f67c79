"""The weights file ``adapter_model.safetensors``: its checks against the config and the base
model (exact key set, shapes, dtypes, rank dimension, finiteness) and stacking its tensors into
per-module factors. Problems are appended to a list so that one error can report them all.

:func:`load_registered` is the only loader that checks nothing: it is for bytes whose sha256 is
that of a file that passed :func:`inference.adapters.peft_checkpoint.validate_adapter_files`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from inference.adapters.lora_weights import LoraModuleWeights
from inference.adapters.peft_config import ParsedConfig
from inference.adapters.peft_format import ALLOWED_DTYPES, CONFIG_FILE, WEIGHTS_FILE, lora_key, name_list
from inference.adapters.safetensors_header import read_safetensors_header
from inference.model_config import ModelConfig

_SHAPE_LIMIT = 10  # how many wrong shapes are named individually


def parse_safetensors(weights_bytes: bytes, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file's bytes: the framing is checked first, by the same
    hostile-input-safe parser as the upload gate, then the library loads the data."""
    from safetensors.torch import load as load_safetensors

    if read_safetensors_header(weights_bytes, problems) is None:
        return None
    try:  # the header check above already refused a file without tensors
        return load_safetensors(bytes(weights_bytes))
    except Exception as exc:  # safetensors raises its own error types (and others on odd headers)
        problems.append(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}")
        return None


def expected_shapes(cfg: ParsedConfig, model: ModelConfig) -> dict[str, tuple[int, int]] | None:
    """key -> shape for every tensor the config implies (None when the config is unusable)."""
    if cfg.targets is None or cfg.rank is None:
        return None
    shapes = model.linear_shapes()
    expected = {}
    for i in range(model.num_layers):
        for m in cfg.targets:
            fan_in, fan_out = shapes[m]
            expected[lora_key(i, m, "A")] = (cfg.rank, fan_in)
            expected[lora_key(i, m, "B")] = (fan_out, cfg.rank)
    return expected


def _check_dtypes(tensors: dict, problems: list[str]) -> None:
    bad_dtypes = sorted(
        (k, str(t.dtype).replace("torch.", "")) for k, t in tensors.items() if t.dtype not in ALLOWED_DTYPES
    )
    by_dtype: dict[str, list[str]] = {}
    for key, dtype in bad_dtypes:
        by_dtype.setdefault(dtype, []).append(key)
    for dtype, keys in by_dtype.items():
        problems.append(
            f"dtype {dtype} not supported (only float16, bfloat16, float32): "
            f"{len(keys)} tensor(s): {name_list(keys)}"
        )


def check_tensors(tensors: dict, expected: dict[str, tuple[int, int]] | None, problems: list[str]) -> None:
    """Key set, shapes and dtypes (metadata only: ``tensors`` may be header entries).
    ``expected`` maps key -> shape (None: the config is unusable, only dtypes are checked)."""
    _check_dtypes(tensors, problems)
    if expected is None:
        return
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing:
        problems.append(f"{len(missing)} missing key(s) in {WEIGHTS_FILE}: {name_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in {WEIGHTS_FILE}: {name_list(unexpected)}")
    wrong = [
        f"{k}: expected shape {list(shape)}, got {list(tensors[k].shape)}"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    if wrong:
        more = len(wrong) - _SHAPE_LIMIT
        extra = f" (and {more} more tensors with wrong shapes)" if more > 0 else ""
        problems.append(f"{len(wrong)} tensor(s) have the wrong shape: " + "; ".join(wrong[:_SHAPE_LIMIT]) + extra)


def check_rank_dims(tensors: dict, cfg: ParsedConfig, problems: list[str]) -> None:
    """The rank dimension of every present A ([r, in]) and B ([out, r]) must equal config ``r``."""
    ranks = set()
    for key, t in tensors.items():
        if t.dim() != 2:
            continue
        if key.endswith(".lora_A.weight"):
            ranks.add(t.shape[0])
        elif key.endswith(".lora_B.weight"):
            ranks.add(t.shape[1])
    if cfg.rank is not None and ranks and ranks != {cfg.rank}:
        problems.append(f"the weights' rank dimension is {sorted(ranks)} but {CONFIG_FILE} says r={cfg.rank}")


def _non_finite_message(keys: Sequence[str]) -> str:
    return f"{len(keys)} tensor(s) contain NaN or Inf: {name_list(keys)}"


def check_finite_each(tensors: dict[str, torch.Tensor], keys: Iterable[str], problems: list[str]) -> None:
    """Finiteness tensor by tensor (the reporting path, taken only when other problems were found)."""
    non_finite = [k for k in keys if tensors[k].dtype in ALLOWED_DTYPES and not bool(torch.isfinite(tensors[k]).all())]
    if non_finite:
        problems.append(_non_finite_message(non_finite))


def stack_checked(
    tensors: dict[str, torch.Tensor], num_layers: int, targets: Sequence[str], problems: list[str]
) -> dict[str, LoraModuleWeights]:
    """Stack each module's factors over layers into float32 and check finiteness on the stacks
    (one vectorised check per factor, not one per tensor). Keys and shapes must already be valid."""
    modules: dict[str, LoraModuleWeights] = {}
    non_finite: list[str] = []
    for m in targets:
        stacks = {}
        for factor in ("A", "B"):
            keys = [lora_key(i, m, factor) for i in range(num_layers)]
            stacked = torch.stack([tensors[k] for k in keys]).to(torch.float32)
            finite = torch.isfinite(stacked).flatten(1).all(dim=1)  # [num_layers]
            if not bool(finite.all()):
                non_finite += [keys[i] for i in torch.nonzero(~finite).flatten().tolist()]
            stacks[factor] = stacked
        # A: [L, r, in] as stored; B: [L, out, r] -> B^T [L, r, out]
        modules[m] = LoraModuleWeights(a=stacks["A"].contiguous(), b_t=stacks["B"].transpose(1, 2).contiguous())
    if non_finite:
        problems.append(_non_finite_message(non_finite))
    return modules


def load_registered(weights_bytes: bytes, targets: Sequence[str], num_layers: int) -> dict[str, LoraModuleWeights]:
    """The factors of a weights file that was validated when it was registered (the caller has
    checked that these bytes have the registered sha256): parsed and stacked, nothing checked.
    Factors keep the file's dtype (packing converts them); ``b_t`` is a transposed view."""
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(bytes(weights_bytes))
    modules = {}
    for m in targets:
        a = torch.stack([tensors[lora_key(i, m, "A")] for i in range(num_layers)])
        b = torch.stack([tensors[lora_key(i, m, "B")] for i in range(num_layers)])
        modules[m] = LoraModuleWeights(a=a, b_t=b.transpose(1, 2))
    return modules
