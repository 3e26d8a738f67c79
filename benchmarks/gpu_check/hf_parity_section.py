"""Section ``hf_parity``: the engine's greedy tokens against HF transformers on the same weights.

A small Llama (GQA, vocab 32000) with random weights is saved with ``save_pretrained``
(safetensors, fp32) into a temporary folder; the engine and ``AutoModelForCausalLM`` load it in
fp32 and in bf16. Every prompt goes to the engine in one batch (prefill and decode mixed, as
served); HF decodes each prompt alone with its own KV cache.

Pass, fp32: token-identical for every prompt. bf16 rounds differently in every implementation, so
greedy paths drift apart at near-ties and the token agreement is reported, not judged. What is
judged is precision under teacher forcing: at every position of HF fp32's continuation, the
log-probability each bf16 run gives HF fp32's token. The engine passes when its mean deviation
from HF fp32 is at most 3x HF bf16's own + 0.01.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.gpu_check.checkpoints import (
    close_engine, common_prefix, engine_greedy, hf_forced_logprobs, hf_greedy, load_hf, make_engine,
    random_prompts, write_llama,
)
from benchmarks.gpu_check.report import free_device_memory
from benchmarks.gpu_check.sizes import Context

COLUMNS = ["comparison", "dtype", "prompts", "identical", "prefix_agreement", "mean_forced_logprob_dev",
           "max_forced_logprob_dev", "min_gap_at_divergence", "status"]
TOP = 20


def _agreement(ours: list[dict], ref: list[dict], n: int) -> dict:
    prefixes = [common_prefix(a["tokens"], b["tokens"]) for a, b in zip(ours, ref)]
    gaps = [b["gaps"][k] for b, k in zip(ref, prefixes) if k < n]
    return {
        "prompts": len(ours),
        "identical": sum(k == n for k in prefixes),
        "prefix_agreement": sum(prefixes) / (n * max(1, len(ours))),
        "min_gap_at_divergence": min(gaps) if gaps else "",
    }


def _deviation(forced: list[list[float | None]], ref: list[dict]) -> dict:
    devs = [abs(x - y) if x is not None else float("inf")
            for xs, r in zip(forced, ref) for x, y in zip(xs, r["logprobs"])]
    return {"mean_forced_logprob_dev": statistics.fmean(devs), "max_forced_logprob_dev": max(devs)}


def _hf_runs(checkpoint: Path, prompts, n: int, device) -> tuple[dict, list]:
    """HF greedy in fp32 and bf16, and HF bf16's teacher-forced logprobs of the fp32 tokens."""
    runs, forced = {}, []
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = load_hf(checkpoint, device, dtype)
        runs[name] = [hf_greedy(model, p, n, device) for p in prompts]
        if name == "bfloat16":
            forced = [hf_forced_logprobs(model, p, r["tokens"], device) for p, r in zip(prompts, runs["float32"])]
        del model
        free_device_memory(device)
    return runs, forced


def _engine_forced(engine, prompts, ref: list[dict]) -> list[list[float | None]]:
    """The engine's logprob of HF fp32's token at each position (one request per prefix, in one
    batch; None when the token is not among the engine's top 20)."""
    jobs = [(p + r["tokens"][:j], None) for p, r in zip(prompts, ref) for j in range(len(r["tokens"]))]
    outs = iter(engine_greedy(engine, jobs, 1, top_logprobs=TOP))
    forced = []
    for r in ref:
        row = []
        for token in r["tokens"]:
            out = next(outs)
            row.append(out["logprobs"][0] if out["tokens"][0] == token else out["top"][0].get(token))
        forced.append(row)
    return forced


def _engine_runs(checkpoint: Path, prompts, n: int, device, hf32: list[dict]) -> tuple[dict, list]:
    runs, forced = {}, []
    for dtype in ("float32", "bfloat16"):
        engine = make_engine(checkpoint, device, dtype, pool_bytes=64 << 20 if device.type == "cpu" else 1 << 30)
        try:
            runs[dtype] = engine_greedy(engine, [(p, None) for p in prompts], n)
            if dtype == "bfloat16":
                forced = _engine_forced(engine, prompts, hf32)
        finally:
            close_engine(engine)
            del engine
            free_device_memory(device)
    return runs, forced


def run(ctx: Context) -> dict:
    z = ctx.sizes
    n = z.hf_new_tokens
    prompts = random_prompts(z.hf_prompts, z.small_model["vocab_size"], torch.Generator().manual_seed(ctx.seed))
    with tempfile.TemporaryDirectory(prefix="gpu-check-hf-") as tmp:
        checkpoint = write_llama(Path(tmp) / "llama", z.small_model, seed=ctx.seed)
        hf, hf_forced = _hf_runs(checkpoint, prompts, n, ctx.device)
        ours, our_forced = _engine_runs(checkpoint, prompts, n, ctx.device, hf["float32"])
    fp32 = {"comparison": "engine vs HF", "dtype": "float32", **_agreement(ours["float32"], hf["float32"], n)}
    fp32["passed"] = fp32["identical"] == fp32["prompts"]
    engine_bf16 = {"comparison": "engine bf16 vs HF fp32", "dtype": "bfloat16",
                   **_agreement(ours["bfloat16"], hf["float32"], n), **_deviation(our_forced, hf["float32"])}
    hf_bf16 = {"comparison": "HF bf16 vs HF fp32", "dtype": "bfloat16",
               **_agreement(hf["bfloat16"], hf["float32"], n), **_deviation(hf_forced, hf["float32"])}
    bound = 3 * hf_bf16["mean_forced_logprob_dev"] + 0.01
    engine_bf16["passed"] = engine_bf16["mean_forced_logprob_dev"] <= bound
    same_dtype = {"comparison": "engine bf16 vs HF bf16", "dtype": "bfloat16",
                  **_agreement(ours["bfloat16"], hf["bfloat16"], n)}
    rows = [fp32, engine_bf16, hf_bf16, same_dtype]
    for row in rows:
        row["status"] = {True: "pass", False: "fail"}.get(row.get("passed"), "info")
    return {
        "passed": fp32["passed"] and engine_bf16["passed"],
        "model": {**z.small_model, "new_tokens": n},
        "bf16_bound": bound,
        "columns": COLUMNS,
        "rows": rows,
        "notes": [
            "identical: prompts whose generated tokens all match; prefix_agreement: mean matching prefix / new tokens; "
            "min_gap_at_divergence: the reference's top-2 logit gap where the tokens first differ (small: a near-tie); "
            "forced_logprob_dev: |logprob of HF fp32's token - HF fp32's| at each position of HF fp32's continuation",
            f"pass: fp32 identical for every prompt; bf16: engine mean_forced_logprob_dev <= 3 x HF bf16's + 0.01 "
            f"= {bound:.4g}",
        ],
    }
