"""Section ``peft_parity``: one engine batch mixing LoRA adapters and base rows against PEFT.

Random adapters of different ranks and target modules (one with rsLoRA scaling) are made with
PEFT (``get_peft_model``, B drawn at random since PEFT starts it at zero) and saved with
``save_pretrained``; PEFT then decodes every prompt with each adapter alone (fp32, HF's KV
cache). The engine (fp32) registers the folders and serves every (prompt, adapter) pair plus the
prompts without an adapter in one batch. Pass: token-identical for every request, the logprobs of
the matching tokens within 1e-3, and at least one adapter changing some base output (otherwise
the comparison would prove nothing).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.gpu_check.checkpoints import (
    close_engine, common_prefix, engine_greedy, hf_greedy, load_hf, make_engine, random_prompts, write_llama,
)
from benchmarks.gpu_check.report import free_device_memory
from benchmarks.gpu_check.sizes import Context
from benchmarks.synthetic_adapters import peft_adapter

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
SPECS = (
    dict(r=8, targets=ATTN, alpha=16),
    dict(r=16, targets=MLP, alpha=16),
    dict(r=4, targets=["q_proj", "v_proj"], alpha=32),
    dict(r=32, targets=ATTN + MLP, alpha=16, rslora=True),
)
COLUMNS = ["adapter", "rank", "targets", "requests", "identical", "max_logprob_diff", "changes_base", "status"]
LOGPROB_TOL = 1e-3


def make_peft_adapter(base, out_dir: Path, spec: dict, seed: int, b_std: float = 0.05):
    """Inject a LoRA with PEFT, randomise B and save it; returns the PeftModel."""
    return peft_adapter(base, out_dir, r=spec["r"], targets=spec["targets"], alpha=spec["alpha"],
                        rslora=spec.get("rslora", False), b_std=b_std, seed=seed)


def _peft_runs(checkpoint: Path, adapters_dir: Path, prompts, n: int, specs, device, seed: int):
    """Base tokens per prompt; per adapter its folder and PEFT's greedy runs."""
    base = load_hf(checkpoint, device, torch.float32)
    base_runs = [hf_greedy(base, p, n, device) for p in prompts]
    expected = {}
    for i, spec in enumerate(specs):
        folder = adapters_dir / f"a{i}"
        model = make_peft_adapter(base, folder, spec, seed=seed + i)
        expected[f"a{i}"] = (folder, [hf_greedy(model, p, n, device) for p in prompts])
        base = model.unload()
    del base
    free_device_memory(device)
    return base_runs, expected


def _row(name: str, spec: dict | None, ours: list[dict], ref: list[dict], base: list[dict], n: int) -> dict:
    prefixes = [common_prefix(a["tokens"], b["tokens"]) for a, b in zip(ours, ref)]
    diffs = [abs(x - y) for a, b, k in zip(ours, ref, prefixes) for x, y in zip(a["logprobs"][:k], b["logprobs"][:k])]
    identical = sum(k == n for k in prefixes)
    max_diff = max(diffs) if diffs else 0.0
    ok = identical == len(ours) and max_diff <= LOGPROB_TOL
    return {
        "adapter": name, "rank": spec["r"] if spec else 0,
        "targets": ",".join(spec["targets"]) + (" (rslora)" if spec and spec.get("rslora") else "") if spec else "",
        "requests": len(ours), "identical": identical, "max_logprob_diff": max_diff,
        "changes_base": sum(r["tokens"] != b["tokens"] for r, b in zip(ref, base)) if spec else "",
        "passed": ok, "status": "pass" if ok else "fail",
    }


def run(ctx: Context) -> dict:
    z = ctx.sizes
    n = z.peft_new_tokens
    specs = SPECS[: z.peft_adapters]
    prompts = random_prompts(z.peft_prompts, z.small_model["vocab_size"], torch.Generator().manual_seed(ctx.seed + 7))
    with tempfile.TemporaryDirectory(prefix="gpu-check-peft-") as tmp:
        checkpoint = write_llama(Path(tmp) / "llama", z.small_model, seed=ctx.seed + 1)
        base_runs, expected = _peft_runs(checkpoint, Path(tmp) / "adapters", prompts, n, specs, ctx.device, ctx.seed)
        # a small token budget per step: prefill chunks and decode rows share steps, so the Triton
        # backend's mixed steps (decode and segment launches together) are checked against PEFT too
        engine = make_engine(checkpoint, ctx.device, "float32", pool_bytes=64 << 20 if ctx.smoke else 1 << 30,
                             max_num_batched_tokens=48)
        try:
            for name, (folder, _) in expected.items():
                engine.adapters.register_dir(name, folder)
            jobs = [(p, None) for p in prompts] + [(p, name) for name in expected for p in prompts]
            results = engine_greedy(engine, jobs, n)
        finally:
            close_engine(engine)
            del engine
    k = len(prompts)
    rows = [_row("(none)", None, results[:k], base_runs, base_runs, n)]
    for i, (name, (_, ref)) in enumerate(expected.items()):
        rows.append(_row(name, specs[i], results[k * (i + 1):k * (i + 2)], ref, base_runs, n))
    changed = sum(r["changes_base"] for r in rows[1:])
    return {
        "passed": all(r["passed"] for r in rows) and changed > 0,
        "adapters_changing_outputs": changed,
        "model": {**z.small_model, "new_tokens": n},
        "columns": COLUMNS,
        "rows": rows,
        "notes": [
            "all requests in one engine batch; identical: requests whose tokens all match PEFT's; max_logprob_diff over "
            f"the matching tokens (<= {LOGPROB_TOL}); changes_base: prompts whose PEFT output differs from the base "
            f"model's (the section needs at least one; here {changed})",
        ],
    }
