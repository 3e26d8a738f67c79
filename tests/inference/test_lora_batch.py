"""LoraBatch (the per-step LoRA applier) against a float64 computation from the adapters' weights."""

import random

import pytest
import torch

from inference.adapters.lora_batch import LoraBatch
from inference.adapters.peft_checkpoint import load_adapter_dir
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from support.adapters import synthetic_adapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("decode", [True, False], ids=["decode-dense", "prefill-segments"])
def test_lora_batch_matches_float64(tmp_path, tiny_checkpoint, decode):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    engine = LLMEngine(tiny_checkpoint, EngineConfig(page_tokens=4, cpu_pool_bytes=8 << 20))
    cfg = engine.model_config
    specs = [(1, ("q_proj", "v_proj")), (8, ALL), (5, ("gate_proj", "down_proj")), (16, ("k_proj", "o_proj", "up_proj"))]
    residents, host = [], []
    for i, (r, targets) in enumerate(specs):
        path = synthetic_adapter(tmp_path / f"a{i}", cfg, r=r, targets=targets, alpha=rng.uniform(1, 32), seed=seed + i)
        ref = engine.adapters.register_dir(f"a{i}", path)
        assert engine.adapters.admit(ref).value == "ready"
        residents.append(engine.adapters.resident(ref.uid))
        host.append(load_adapter_dir(path, cfg))
    lengths = [1] * 7 if decode else [3, 1, 5, 2, 1, 4, 2]
    chunk_slots = [rng.choice([-1, 0, 1, 2, 3]) for _ in lengths]
    batch = LoraBatch(engine.pool, residents, chunk_slots, lengths)
    rows = [s for s, n in zip(chunk_slots, lengths) for _ in range(n)]
    layer = rng.randrange(cfg.num_layers)
    for module, (in_f, out_f) in cfg.linear_shapes().items():
        x = torch.randn(len(rows), in_f)
        base = torch.randn(len(rows), out_f)
        out = base.clone()
        batch.apply(layer, module, x, out)
        expected = base.double().clone()
        for t, s in enumerate(rows):
            if s < 0 or module not in host[s].modules:
                continue
            m = host[s].modules[module]
            expected[t] += host[s].scaling * (x[t].double() @ m.a[layer].double().T) @ m.b_t[layer].double()
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=f"{module} seed {seed}")
    dense_modules = [m for m in batch.modules.values() if m.dense is not None]
    assert bool(dense_modules) == decode
