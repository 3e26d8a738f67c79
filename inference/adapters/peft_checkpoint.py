"""Loading and complete validation of a Hugging Face PEFT LoRA adapter against the base model.

An adapter is the two files ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``. Everything is checked before any tensor reaches the engine: the
config (only plain LoRA on the decoder's seven projections, in every layer), the exact key set of
the weights, every shape against the base model, dtypes and finiteness. All problems found are
reported together in one :class:`AdapterValidationError`.

Pickle-based files (``*.bin``, ``*.pt``, ...) are refused without being opened: this module never
calls ``torch.load`` or ``pickle``. Weights are parsed with ``safetensors`` only.

The result, :class:`LoraAdapterWeights`, holds per-module stacks over layers in float32 on the CPU:
``a`` is PEFT's ``lora_A.weight`` ([r, in]) stacked to [num_layers, r, in]; ``b_t`` is PEFT's
``lora_B.weight`` ([out, r]) transposed and stacked to [num_layers, r, out]. The adapter's
contribution to a projection is ``y += scaling * (x @ a[l].T) @ b_t[l]``.
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
from typing import Any, Iterable, Iterator, Sequence

import torch

from inference.adapters.safetensors_header import (  # noqa: F401  (MAX_... re-exported)
    MAX_SAFETENSORS_HEADER_BYTES,
    parse_json,
    read_safetensors_header,
)
from inference.model_config import ModelConfig
from inference.openmp_workers import releases_openmp_workers

log = logging.getLogger(__name__)

MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The adaptable projections, in the order every per-layer layout uses."""

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections the model computes from one input, each family in one ``LoraApplier.apply`` call."""

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALLOWED_TASK_TYPES = (None, "CAUSAL_LM")
# init_lora_weights values that leave the base model untouched. The others (pissa, olora, corda,
# loftq, lora_ga, mica, ...) rewrite the base weights or change the forward, so the adapter would
# not apply to the unmodified base model.
SAFE_INIT_LORA_WEIGHTS = (True, False, None, "gaussian", "eva", "orthogonal")
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
_LIST_LIMIT = 5  # how many keys a missing/unexpected-key message names before giving a count
_SHAPE_LIMIT = 10  # how many wrong shapes are named individually

_SUBMODULE = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in MODULE_ORDER}
_KEY_PREFIX = "base_model.model."

# Config keys whose truthy value asks for something the engine does not compute: key -> feature name.
_UNSUPPORTED_IF_TRUTHY = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D-style weights)",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "use_qalora": "QALoRA (use_qalora)",
    "trainable_token_indices": "trainable_token_indices (trainable embedding rows)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication",
    "megatron_config": "megatron_config (Megatron parallel layers)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}


class AdapterValidationError(ValueError):
    """An adapter was refused. ``problems`` lists every violation found; ``str()`` shows them all."""

    def __init__(self, problems: Sequence[str]):
        self.problems: list[str] = list(problems) or ["unknown problem"]
        count = len(self.problems)
        header = f"invalid LoRA adapter ({count} problem{'s' if count != 1 else ''}):"
        super().__init__(header + "".join(f"\n  - {p}" for p in self.problems))


@dataclass(frozen=True, eq=False)
class LoraModuleWeights:
    """One projection's LoRA factors, stacked over all decoder layers.

    ``a``: [num_layers, r, in_features], float32, CPU, contiguous (PEFT ``lora_A.weight``).
    ``b_t``: [num_layers, r, out_features], float32, CPU, contiguous (PEFT ``lora_B.weight``
    [out, r] transposed). Other dtypes/devices are allowed for copies (e.g. pinned fp16).
    """

    a: torch.Tensor
    b_t: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.dim() != 3 or self.b_t.dim() != 3 or self.a.shape[:2] != self.b_t.shape[:2]:
            raise ValueError(
                "LoRA factors must be a [L, r, in] and b_t [L, r, out], "
                f"got {tuple(self.a.shape)} and {tuple(self.b_t.shape)}"
            )

    @property
    def num_layers(self) -> int:
        return self.a.shape[0]

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def in_features(self) -> int:
        return self.a.shape[2]

    @property
    def out_features(self) -> int:
        return self.b_t.shape[2]


@dataclass(frozen=True, eq=False)
class LoraAdapterWeights:
    """A validated adapter.

    ``scaling`` multiplies the low-rank update: ``lora_alpha / rank``, or ``lora_alpha / sqrt(rank)``
    with rsLoRA. ``modules`` holds only the targeted projections, in :data:`MODULE_ORDER`.
    ``sha256`` is the hex digest of the ``adapter_model.safetensors`` bytes (the adapter's identity);
    ``config`` is the parsed ``adapter_config.json``.
    """

    rank: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    modules: dict[str, LoraModuleWeights]
    sha256: str
    config: dict

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Names of the adapted projections, in :data:`MODULE_ORDER`."""
        return tuple(m for m in MODULE_ORDER if m in self.modules)

    @property
    def num_layers(self) -> int:
        return next(iter(self.modules.values())).num_layers if self.modules else 0

    def layer_elems(self) -> int:
        """Elements of one layer's factors: sum over modules of ``r * (in + out)``."""
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules.values())

    def nbytes(self, element_bytes: int) -> int:
        """Bytes of all layers' factors stored at ``element_bytes`` per element."""
        return self.layer_elems() * self.num_layers * element_bytes


def lora_key(layer: int, module: str, factor: str) -> str:
    """The safetensors key PEFT writes for ``factor`` ("A" or "B") of ``module`` in ``layer``."""
    return f"{_KEY_PREFIX}model.layers.{layer}.{_SUBMODULE[module]}.{module}.lora_{factor}.weight"


# --------------------------------------------------------------------------------------------
# Directory
# --------------------------------------------------------------------------------------------


def adapter_files_from_dir(path: str | Path) -> tuple[bytes, bytes]:
    """Return ``(adapter_config.json bytes, adapter_model.safetensors bytes)`` from a PEFT directory.

    Refuses (one :class:`AdapterValidationError` listing everything): a missing directory or file,
    any pickle-style file (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``; never opened), and
    symlinks that resolve outside the directory. Only the two adapter files are read.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterValidationError([f"{directory} is not a directory"])
    root = os.path.realpath(directory)
    problems: list[str] = []
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
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class _ParsedConfig:
    raw: dict | None = None
    rank: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    targets: tuple[str, ...] | None = None  # None: could not be resolved


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _module_paths(num_layers: int) -> list[str]:
    """Every module path (``named_modules`` keys, root excluded) of a transformers LlamaForCausalLM."""
    paths = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(num_layers):
        layer = f"model.layers.{i}"
        paths += [layer, f"{layer}.self_attn", f"{layer}.mlp", f"{layer}.mlp.act_fn"]
        paths += [f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm"]
        paths += [f"{layer}.{_SUBMODULE[m]}.{m}" for m in MODULE_ORDER]
    return paths


def _name_list(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _suffix_match(names: Iterable[str], path: str) -> bool:
    """PEFT's list semantics: a path matches a name equal to it or that it ends with (as ``.name``)."""
    return any(path == n or path.endswith("." + n) for n in names)


def _compile(spec: str, field: str, problems: list[str]) -> re.Pattern | None:
    """Compile a config regex; any failure (syntax, nesting too deep for the parser, a pattern
    too large) is a problem naming ``field``."""
    try:
        return re.compile(spec)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        shown = spec if len(spec) <= 80 else spec[:80] + "..."
        problems.append(f"{field} regex {shown!r} is invalid: {type(exc).__name__}: {str(exc)[:200]}")
        return None


def _resolve_targets(raw: dict, num_layers: int, problems: list[str]) -> tuple[str, ...] | None:
    """Resolve ``target_modules`` (minus ``exclude_modules``) to a subset of MODULE_ORDER, PEFT-style."""
    spec = raw.get("target_modules")
    paths = _module_paths(num_layers)
    linear = {f"model.layers.{i}.{_SUBMODULE[m]}.{m}": (i, m) for i in range(num_layers) for m in MODULE_ORDER}
    start = len(problems)

    if isinstance(spec, str) and spec.lower() == "all-linear":
        matched = set(linear)  # every nn.Linear except the output head (lm_head), as PEFT does
    elif isinstance(spec, str):
        pattern = _compile(spec, "target_modules", problems)
        if pattern is None:
            return None
        matched = {p for p in paths if pattern.fullmatch(p)}
        unsupported = sorted(p for p in matched if p not in linear)
        if unsupported:
            problems.append(
                f"target_modules regex {spec!r} matches {_name_list(unsupported)}: target not supported "
                f"(only {', '.join(MODULE_ORDER)} can be adapted)"
            )
    elif isinstance(spec, list) and spec:
        bad_types = [t for t in spec if not isinstance(t, str)]
        if bad_types:
            problems.append(f"target_modules entries must be strings, got {bad_types!r}")
        matched = set()
        for name in (t for t in spec if isinstance(t, str)):
            hits = {p for p in paths if _suffix_match((name,), p)}
            if not hits:
                problems.append(
                    f"target {name!r} not supported: it names no module of the base model "
                    f"(only {', '.join(MODULE_ORDER)} can be adapted)"
                )
            elif any(p not in linear for p in hits):
                problems.append(f"target {name!r} not supported (only {', '.join(MODULE_ORDER)} can be adapted)")
            else:
                matched |= hits
    elif spec is None or spec == [] or spec == "":
        problems.append("target_modules is missing or empty")
        return None
    else:
        problems.append(f"target_modules must be a list of names or a regex string, got {spec!r}")
        return None

    exclude = raw.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            ex_pattern = _compile(exclude, "exclude_modules", problems)
            if ex_pattern is not None:
                matched = {p for p in matched if not ex_pattern.fullmatch(p)}
        elif isinstance(exclude, list) and all(isinstance(e, str) for e in exclude):
            matched = {p for p in matched if not _suffix_match(exclude, p)}
        else:
            problems.append(f"exclude_modules must be a list of names or a regex string, got {exclude!r}")

    targets = []
    for m in MODULE_ORDER:
        layers = sorted(i for p, (i, mod) in linear.items() if mod == m and p in matched)
        if len(layers) == num_layers:
            targets.append(m)
        elif layers:
            prefix = layers == list(range(len(layers)))
            hint = " (was the adapter trained for a model with fewer layers?)" if prefix else ""
            problems.append(
                f"target_modules select {m} in only layers {layers} of {num_layers}; "
                f"per-layer targeting is not supported{hint}"
            )
    if not targets and len(problems) == start:
        problems.append(f"target_modules {spec!r} selects none of {', '.join(MODULE_ORDER)}")
    return tuple(targets) if len(problems) == start else None


def _check_config(config_bytes: bytes, model: ModelConfig, max_rank: int, problems: list[str]) -> _ParsedConfig:
    parsed = _ParsedConfig()
    raw = parse_json(config_bytes, CONFIG_FILE, problems, allow_bom=True, finite=False)
    if raw is None:
        return parsed
    if not isinstance(raw, dict):
        problems.append(f"{CONFIG_FILE} must hold a JSON object, got {type(raw).__name__}")
        return parsed
    parsed.raw = raw

    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type must be 'LORA', got {peft_type!r}")
    task_type = raw.get("task_type")
    if task_type not in ALLOWED_TASK_TYPES:
        problems.append(f"task_type {task_type!r} not supported (only 'CAUSAL_LM' or null)")

    r = raw.get("r", PEFT_DEFAULT_R)
    if not _is_int(r):
        problems.append(f"r must be an integer, got {r!r}")
    elif not 1 <= r <= max_rank:
        problems.append(f"r={r} is out of range: the rank must be in [1, {max_rank}] (max_rank)")
    else:
        parsed.rank = r

    alpha = raw.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not _finite(alpha) or alpha <= 0:
        problems.append(f"lora_alpha must be a finite number > 0, got {alpha!r}")
    else:
        parsed.lora_alpha = float(alpha)

    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        problems.append(f"use_rslora must be true or false, got {use_rslora!r}")
    else:
        parsed.use_rslora = use_rslora

    parsed.targets = _resolve_targets(raw, model.num_layers, problems)

    for key, feature in _UNSUPPORTED_IF_TRUTHY.items():
        if raw.get(key):
            problems.append(f"{feature} not supported ({key}={raw[key]!r})")
    modules_to_save = raw.get("modules_to_save")
    if modules_to_save:
        problems.append(
            f"modules_to_save {modules_to_save!r} not supported (full trained copies of base modules, e.g. lm_head)"
        )
    bias = raw.get("bias", "none")
    if bias not in ("none", None):
        problems.append(f"bias={bias!r} not supported (only 'none': LoRA adapters may not train base biases)")
    layers_to_transform = raw.get("layers_to_transform")
    if layers_to_transform is not None and layers_to_transform != []:
        problems.append(f"layers_to_transform={layers_to_transform!r} not supported (every layer must be adapted)")
    layers_pattern = raw.get("layers_pattern")
    if layers_pattern not in (None, "", []):
        problems.append(f"layers_pattern={layers_pattern!r} not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            problems.append(f"{key} {raw[key]!r} not supported (per-module ranks/alphas)")
    init = raw.get("init_lora_weights", True)
    if not any(init is v or (isinstance(init, str) and init == v) for v in SAFE_INIT_LORA_WEIGHTS):
        problems.append(
            f"init_lora_weights={init!r} not supported: that initialisation changes the base weights or the "
            "LoRA forward (convert PiSSA/OLoRA/CorDA adapters to plain LoRA when saving)"
        )
    return parsed


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _parse_safetensors(weights_bytes: bytes, problems: list[str]) -> dict[str, torch.Tensor] | None:
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


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, int]] | None, problems: list[str]
) -> None:
    """Key set, shapes and dtypes (metadata only). ``expected`` maps key -> shape (None: config unusable)."""
    bad_dtypes = sorted(
        (k, str(t.dtype).replace("torch.", "")) for k, t in tensors.items() if t.dtype not in ALLOWED_DTYPES
    )
    if bad_dtypes:
        by_dtype: dict[str, list[str]] = {}
        for key, dtype in bad_dtypes:
            by_dtype.setdefault(dtype, []).append(key)
        for dtype, keys in by_dtype.items():
            problems.append(
                f"dtype {dtype} not supported (only float16, bfloat16, float32): "
                f"{len(keys)} tensor(s): {_name_list(keys)}"
            )

    if expected is not None:
        missing = [k for k in expected if k not in tensors]
        unexpected = sorted(k for k in tensors if k not in expected)
        if missing:
            problems.append(f"{len(missing)} missing key(s) in {WEIGHTS_FILE}: {_name_list(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) in {WEIGHTS_FILE}: {_name_list(unexpected)}")
        wrong = [
            f"{k}: expected shape {list(shape)}, got {_shape(tensors[k])}"
            for k, shape in expected.items()
            if k in tensors and tuple(tensors[k].shape) != shape
        ]
        if wrong:
            more = len(wrong) - _SHAPE_LIMIT
            extra = f" (and {more} more tensors with wrong shapes)" if more > 0 else ""
            problems.append(f"{len(wrong)} tensor(s) have the wrong shape: " + "; ".join(wrong[:_SHAPE_LIMIT]) + extra)


def _non_finite_message(keys: Sequence[str]) -> str:
    return f"{len(keys)} tensor(s) contain NaN or Inf: {_name_list(keys)}"


def _check_finite_each(tensors: dict[str, torch.Tensor], keys: Iterable[str], problems: list[str]) -> None:
    """Finiteness tensor by tensor (the reporting path, taken only when other problems were found)."""
    non_finite = [k for k in keys if tensors[k].dtype in ALLOWED_DTYPES and not bool(torch.isfinite(tensors[k]).all())]
    if non_finite:
        problems.append(_non_finite_message(non_finite))


def _check_rank_dims(tensors: dict[str, torch.Tensor], cfg: _ParsedConfig, problems: list[str]) -> None:
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


def _stack_checked(
    tensors: dict[str, torch.Tensor], model: ModelConfig, targets: Sequence[str], problems: list[str]
) -> dict[str, LoraModuleWeights]:
    """Stack each module's factors over layers into float32 and check finiteness on the stacks
    (one vectorised check per factor, not one per tensor). Keys and shapes must already be valid."""
    modules: dict[str, LoraModuleWeights] = {}
    non_finite: list[str] = []
    for m in targets:
        stacks = {}
        for factor in ("A", "B"):
            keys = [lora_key(i, m, factor) for i in range(model.num_layers)]
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


def _expected_shapes(cfg: _ParsedConfig, model: ModelConfig) -> dict[str, tuple[int, int]] | None:
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
        cfg = _check_config(config_bytes, model, max_rank, problems)
        tensors = read_safetensors_header(weights_path, problems)
        if tensors is not None:
            _check_tensors(tensors, _expected_shapes(cfg, model), problems)
            _check_rank_dims(tensors, cfg, problems)
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
    if not _is_int(max_rank) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    problems: list[str] = []
    modules: dict[str, LoraModuleWeights] = {}
    with _unparseable_refused():
        cfg = _check_config(config_bytes, model, max_rank, problems)
        tensors = _parse_safetensors(weights_bytes, problems)
        if tensors is not None:
            expected = _expected_shapes(cfg, model)
            _check_tensors(tensors, expected, problems)
            _check_rank_dims(tensors, cfg, problems)
            if problems:  # still name the non-finite tensors, checking them one by one
                present = list(tensors) if expected is None else [k for k in expected if k in tensors]
                _check_finite_each(tensors, present, problems)
            else:
                modules = _stack_checked(tensors, model, cfg.targets, problems)
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
