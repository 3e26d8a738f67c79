"""Parsing and validation of ``adapter_config.json`` against the base model.

Only plain LoRA on the decoder's seven projections, in every layer, is accepted: ``r`` within
``[1, max_rank]``, a positive finite ``lora_alpha``, targets that resolve (PEFT's list and regex
semantics, ``exclude_modules`` included) to whole projections, and none of the PEFT features the
engine does not compute. Problems are appended to a list so that one error can report them all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from inference.adapters.peft_format import CONFIG_FILE, MODULE_ORDER, SUBMODULE, name_list
from inference.adapters.safetensors_header import parse_json
from inference.model_config import ModelConfig

ALLOWED_TASK_TYPES = (None, "CAUSAL_LM")
# init_lora_weights values that leave the base model untouched. The others (pissa, olora, corda,
# loftq, lora_ga, mica, ...) rewrite the base weights or change the forward, so the adapter would
# not apply to the unmodified base model.
SAFE_INIT_LORA_WEIGHTS = (True, False, None, "gaussian", "eva", "orthogonal")
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8

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


@dataclass
class ParsedConfig:
    """What a config check learned; a field stays None when its value was refused."""

    raw: dict | None = None
    rank: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    targets: tuple[str, ...] | None = None  # None: could not be resolved


def is_int(value: Any) -> bool:
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
        paths += [f"{layer}.{SUBMODULE[m]}.{m}" for m in MODULE_ORDER]
    return paths


def _linear_paths(num_layers: int) -> dict[str, tuple[int, str]]:
    """The adaptable projections' module paths -> (layer, module)."""
    return {f"model.layers.{i}.{SUBMODULE[m]}.{m}": (i, m) for i in range(num_layers) for m in MODULE_ORDER}


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


def _match_regex(spec: str, num_layers: int, problems: list[str]) -> set[str] | None:
    pattern = _compile(spec, "target_modules", problems)
    if pattern is None:
        return None
    linear = _linear_paths(num_layers)
    matched = {p for p in _module_paths(num_layers) if pattern.fullmatch(p)}
    unsupported = sorted(p for p in matched if p not in linear)
    if unsupported:
        problems.append(
            f"target_modules regex {spec!r} matches {name_list(unsupported)}: target not supported "
            f"(only {', '.join(MODULE_ORDER)} can be adapted)"
        )
    return matched


def _match_names(spec: list, num_layers: int, problems: list[str]) -> set[str]:
    bad_types = [t for t in spec if not isinstance(t, str)]
    if bad_types:
        problems.append(f"target_modules entries must be strings, got {bad_types!r}")
    paths, linear = _module_paths(num_layers), _linear_paths(num_layers)
    matched: set[str] = set()
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
    return matched


def _match_targets(spec: Any, num_layers: int, problems: list[str]) -> set[str] | None:
    """The module paths ``target_modules`` selects (None when it is unusable)."""
    if isinstance(spec, str) and spec.lower() == "all-linear":
        return set(_linear_paths(num_layers))  # every nn.Linear except the output head, as PEFT does
    if isinstance(spec, str):
        return _match_regex(spec, num_layers, problems)
    if isinstance(spec, list) and spec:
        return _match_names(spec, num_layers, problems)
    if spec is None or spec == [] or spec == "":
        problems.append("target_modules is missing or empty")
    else:
        problems.append(f"target_modules must be a list of names or a regex string, got {spec!r}")
    return None


def _exclude(matched: set[str], exclude: Any, problems: list[str]) -> set[str]:
    """``matched`` minus what ``exclude_modules`` names."""
    if not exclude:
        return matched
    if isinstance(exclude, str):
        pattern = _compile(exclude, "exclude_modules", problems)
        return matched if pattern is None else {p for p in matched if not pattern.fullmatch(p)}
    if isinstance(exclude, list) and all(isinstance(e, str) for e in exclude):
        return {p for p in matched if not _suffix_match(exclude, p)}
    problems.append(f"exclude_modules must be a list of names or a regex string, got {exclude!r}")
    return matched


def _whole_modules(matched: set[str], num_layers: int, problems: list[str]) -> list[str]:
    """The projections selected in every layer; one selected in only some layers is a problem."""
    linear = _linear_paths(num_layers)
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
    return targets


def resolve_targets(raw: dict, num_layers: int, problems: list[str]) -> tuple[str, ...] | None:
    """Resolve ``target_modules`` (minus ``exclude_modules``) to a subset of MODULE_ORDER, PEFT-style."""
    start = len(problems)
    spec = raw.get("target_modules")
    matched = _match_targets(spec, num_layers, problems)
    if matched is None:
        return None
    matched = _exclude(matched, raw.get("exclude_modules"), problems)
    targets = _whole_modules(matched, num_layers, problems)
    if not targets and len(problems) == start:
        problems.append(f"target_modules {spec!r} selects none of {', '.join(MODULE_ORDER)}")
    return tuple(targets) if len(problems) == start else None


def _check_numbers(raw: dict, max_rank: int, parsed: ParsedConfig, problems: list[str]) -> None:
    """``r``, ``lora_alpha`` and ``use_rslora`` (PEFT's defaults when absent)."""
    r = raw.get("r", PEFT_DEFAULT_R)
    if not is_int(r):
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


def _check_unsupported(raw: dict, problems: list[str]) -> None:
    """PEFT features the engine does not compute."""
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


def check_config(config_bytes: bytes, model: ModelConfig, max_rank: int, problems: list[str]) -> ParsedConfig:
    """Parse and check ``adapter_config.json``; every problem found is appended to ``problems``."""
    parsed = ParsedConfig()
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
    _check_numbers(raw, max_rank, parsed, problems)
    parsed.targets = resolve_targets(raw, model.num_layers, problems)
    _check_unsupported(raw, problems)
    return parsed
