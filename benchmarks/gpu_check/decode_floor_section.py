"""Section ``decode_floor``: one decode step of a Llama-7B-shaped model against the weight-read floor.

The model (hidden 4096, 32 layers, 32 heads, 32 KV heads, intermediate 11008, vocab 32000) is
built by ``benchmarks.decode_step.build``: random bf16 weights made directly on the GPU, no
checkpoint, about 13.5 GB. B sequences each hold ``context - 1`` tokens of random KV in the page
pool and decode one token; ``LlamaModel.forward`` is timed with CUDA events (median of N after a
warm-up that also compiles the attention kernel). A decode step reads every weight once, so

    floor = weight bytes / measured copy bandwidth      (and / 4.8 TB/s, the H200's datasheet)

and, with the KV cache the step must also read, ``(weights + B * context * KV bytes per token) / copy
bandwidth``. Batches whose pool does not fit in free memory are skipped and say so. A step faster
than 0.8x the weight floor would mean broken timing: the section then fails.
"""

from __future__ import annotations

import torch

from benchmarks.decode_step import PRESETS, build, decode_batch, weight_tensors
from benchmarks.gpu_check.compare import copy_bandwidth, median, time_ms
from benchmarks.gpu_check.sizes import Context
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry, PagePool

NOMINAL_BYTES_PER_S = 4.8e12  # H200 HBM3e, datasheet
PAGE_TOKENS = 16
COLUMNS = ["batch", "context", "step_ms", "floor_ms", "ratio", "floor_nominal_ms", "floor_with_kv_ms",
           "ratio_with_kv", "status"]
PLAUSIBLE = 0.8


def _fits(device: torch.device, nbytes: int) -> bool:
    if device.type != "cuda":
        return True
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free * 0.9


def _time_batch(model, pool, batch: int, ctx: Context) -> float:
    z = ctx.sizes
    fb = decode_batch(batch, z.decode_context, PAGE_TOKENS, ctx.device)
    fb.input_ids.random_(0, model.config.vocab_size)
    return median(time_ms(lambda: model.forward(fb, pool), ctx.device, iters=z.decode_iters, warmup=2))


def run(ctx: Context) -> dict:
    z, dev = ctx.sizes, ctx.device
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                    "max_position_embeddings": max(4096, z.decode_context), **PRESETS[z.decode_preset]})
    copy = copy_bandwidth(dev, z.copy_bytes, iters=5)
    model = build(config, dev, dtype)
    weight_bytes = sum(t.numel() * t.element_size() for t in weight_tensors(model))
    geometry = PageGeometry.for_model(config, PAGE_TOKENS, dtype)
    pages_per_seq = -(-z.decode_context // PAGE_TOKENS)
    fitting = [b for b in z.decode_batches if _fits(dev, b * pages_per_seq * geometry.page_bytes)]
    rows = [{"batch": b, "context": z.decode_context, "status": "skipped",
             "note": "the pool for this batch does not fit in free GPU memory"}
            for b in z.decode_batches if b not in fitting]
    if not fitting:
        return {"passed": False, "columns": COLUMNS, "rows": rows, "notes": ["no batch fits in free memory"]}
    pool = PagePool(geometry, max(fitting) * pages_per_seq, dev, dtype)
    pool.tensor.normal_(0.0, 1.0, generator=ctx.generator(303))
    kv_per_token = 2 * config.kv_size * config.num_layers * geometry.element_bytes
    floor_ms = weight_bytes / copy["bytes_per_s"] * 1e3
    for batch in fitting:
        if ctx.expired():
            rows.append({"batch": batch, "context": z.decode_context, "status": "skipped", "note": "time cap"})
            continue
        step_ms = _time_batch(model, pool, batch, ctx)
        with_kv = (weight_bytes + batch * z.decode_context * kv_per_token) / copy["bytes_per_s"] * 1e3
        ok = step_ms >= PLAUSIBLE * floor_ms
        rows.append({"batch": batch, "context": z.decode_context, "step_ms": step_ms, "floor_ms": floor_ms,
                     "ratio": step_ms / floor_ms, "floor_nominal_ms": weight_bytes / NOMINAL_BYTES_PER_S * 1e3,
                     "floor_with_kv_ms": with_kv, "ratio_with_kv": step_ms / with_kv,
                     "status": "pass" if ok else "fail", "passed": ok})
    rows.sort(key=lambda r: r["batch"])
    measured = [r for r in rows if "step_ms" in r]
    return {
        "passed": bool(measured) and all(r["passed"] for r in measured) and len(measured) == len(z.decode_batches),
        "model": {"preset": z.decode_preset, "dtype": str(dtype).replace("torch.", ""), "weight_bytes": weight_bytes},
        "copy_bytes_per_s": copy["bytes_per_s"],
        "columns": COLUMNS,
        "rows": rows,
        "notes": [f"weights {weight_bytes / 1e9:.2f} GB; copy bandwidth {copy['bytes_per_s'] / 1e9:.0f} GB/s "
                  f"(read + written); ratio = step / floor (1.0 = at the floor); the nominal floor uses 4.8 TB/s",
                  "eager LlamaModel.forward (no CUDA graph): the step includes the per-launch CPU overhead"],
    }
