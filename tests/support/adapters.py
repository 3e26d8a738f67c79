"""Make LoRA adapters for tests: with real PEFT, or synthetic files in PEFT's exact format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from benchmarks.synthetic_adapters import peft_adapter, synthetic_adapter  # noqa: F401  (re-exported for tests)
from inference.adapters.object_store import ObjectStore
from inference.adapters.storage_keys import adapter_file_keys
from inference.service.protocol import AdapterSpec


def put_adapter(store: ObjectStore, folder: Path, adapter_id: str, prefix: str) -> AdapterSpec:
    """The PEFT adapter in ``folder`` put into ``store`` under ``prefix`` (the platform's key
    layout); its spec, as the platform hands it to the inference service."""
    keys = adapter_file_keys(prefix)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    store.put(keys.config, (folder / "adapter_config.json").read_bytes())
    store.put(keys.weights, weights)
    return AdapterSpec(id=adapter_id, config_key=keys.config, weights_key=keys.weights,
                       sha256=hashlib.sha256(weights).hexdigest())


def apply_calls(shapes: dict[str, tuple[int, int]], rng) -> list[list[tuple[str, ...]]]:
    """Ways to split the projections ``shapes`` (module -> (in, out) features) into
    ``LoraApplier.apply`` calls, each call's modules sharing one input: as the model calls them
    (``SHARED_INPUT`` families in family order, the others alone), every module alone, and the
    modules of one input width in one call in a random order (families split or out of order)."""
    from inference.adapters.peft_checkpoint import MODULE_ORDER, SHARED_INPUT

    family_of = {m: family for family in SHARED_INPUT for m in family}
    model, seen = [], set()
    for module in MODULE_ORDER:
        if module in shapes and module not in seen:
            call = tuple(m for m in family_of.get(module, (module,)) if m in shapes)
            model.append(call)
            seen.update(call)
    by_width: dict[int, list[str]] = {}
    for module, (in_f, _) in shapes.items():
        by_width.setdefault(in_f, []).append(module)
    mixed = [tuple(rng.sample(modules, len(modules))) for modules in by_width.values()]
    return [model, [(m,) for m in shapes], mixed]


def lora_reference(out: torch.Tensor, x: torch.Tensor, row_adapters: list, module: str, layer: int) -> torch.Tensor:
    """float64 reference for one module of a LoRA step: ``out[t] + scaling * (x[t] @ Aᵀ) @ Bᵀ`` with
    row ``t``'s adapter (a validated host adapter from ``load_adapter_dir``; None, or an adapter not
    targeting ``module``: the row is ``out[t]``). x: [N, in], out: [N, out]; returns [N, out]."""
    expected = out.double().clone()
    for t, adapter in enumerate(row_adapters):
        if adapter is None or module not in adapter.modules:
            continue
        m = adapter.modules[module]
        expected[t] += adapter.scaling * (x[t].double() @ m.a[layer].double().T) @ m.b_t[layer].double()
    return expected
