"""Section ``bandwidth``: the bytes the decode kernels must move over their time, against a copy.

* copy: ``dst.copy_(x)`` of a large random tensor, bytes read + written (the ceiling);
* LoRA decode shrink / expand: T rows, each with its own rank-R adapter (so the adapters' bytes
  are several times the L2 cache and each is read once), bf16 (fp32 on the CPU smoke run):
  shrink reads x and every A and writes fp32 y; expand reads y and every Bt and reads and writes
  out;
* attention decode: B sequences of C cached tokens, one query each: reads every K and V once.

Timing: CUDA events around each launch, the median of N after a warm-up (which also compiles).
A measured bandwidth above 1.25x the copy's would mean broken timing or byte counting: the case
then fails.
"""

from __future__ import annotations

import torch

from benchmarks.gpu_check.compare import copy_bandwidth, median, time_ms
from benchmarks.gpu_check.lora_cases import make_adapters
from benchmarks.gpu_check.sizes import Context
from kernels.lora import lora_expand, lora_shrink
from kernels.paged_attention import paged_attention_triton

COLUMNS = ["case", "shape", "bytes", "ms", "GB_per_s", "vs_copy", "status"]
PLAUSIBLE = 1.25


def _row(case: str, shape: str, nbytes: int, ms: float, copy_bps: float) -> dict:
    bps = nbytes / (ms * 1e-3)
    ratio = bps / copy_bps
    ok = ms > 0 and ratio <= PLAUSIBLE
    return {"case": case, "shape": shape, "bytes": nbytes, "ms": ms, "GB_per_s": bps / 1e9, "vs_copy": ratio,
            "status": "pass" if ok else "fail", "passed": ok}


def _lora_rows(ctx: Context, dtype: torch.dtype, copy_bps: float) -> list[dict]:
    z, dev = ctx.sizes, ctx.device
    gen = ctx.generator(101)
    T, R, F = z.bw_rows, z.bw_rank, z.bw_features
    ad = make_adapters([R] * T, F, F, page=F * 16, dtype=dtype, gen=gen, device=dev)
    row_slot = torch.arange(T, dtype=torch.int32, device=dev)
    x = torch.randn((T, F), generator=gen, device=dev).to(dtype)
    out = torch.randn((T, F), generator=gen, device=dev).to(dtype)
    y = torch.randn((T, R), generator=gen, device=dev)
    size = x.element_size()
    shrink_bytes = T * F * size + T * R * F * size + T * R * 4
    expand_bytes = T * R * 4 + T * R * F * size + 2 * T * F * size
    shape = f"T={T} adapters={T} rank={R} features={F} {str(dtype).replace('torch.', '')}"

    def shrink():
        lora_shrink(x, ad.pool, ad.pages, ad.a_offset, ad.ranks, R, row_slot=row_slot, use_triton=True)

    def expand():
        lora_expand(out, y, ad.pool, ad.pages, ad.b_offset, ad.ranks, ad.scaling, row_slot=row_slot,
                    use_triton=True)

    rows = []
    for case, fn, nbytes in (("lora_shrink decode", shrink, shrink_bytes), ("lora_expand decode", expand, expand_bytes)):
        ms = median(time_ms(fn, dev, iters=z.bw_iters, warmup=2))
        rows.append(_row(case, shape, nbytes, ms, copy_bps))
    return rows


def _attention_row(ctx: Context, dtype: torch.dtype, copy_bps: float) -> dict:
    z, dev = ctx.sizes, ctx.device
    gen = ctx.generator(202)
    B, C, H, KV, D, tp = z.bw_attn_seqs, z.bw_attn_ctx, z.bw_attn_heads, z.bw_attn_kv_heads, 128, 16
    if ctx.smoke:
        D = 16
    pages_per_seq = -(-C // tp)
    kv = torch.randn((B * pages_per_seq, 2, tp, KV, D), generator=gen, device=dev).to(dtype)
    table = torch.randperm(B * pages_per_seq, generator=gen, device=dev).to(torch.int32).view(B, pages_per_seq)
    q = torch.randn((B, H, D), generator=gen, device=dev).to(dtype)
    seq_lens = torch.full((B,), C, dtype=torch.int32, device=dev)
    qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
    size = q.element_size()
    nbytes = B * C * 2 * KV * D * size + 2 * q.numel() * size + table.numel() * 4

    def attend():
        paged_attention_triton(q, kv, table, seq_lens, qsl, D**-0.5, max_q_len=1)

    ms = median(time_ms(attend, dev, iters=z.bw_iters, warmup=2))
    shape = f"B={B} ctx={C} H={H} KV={KV} D={D} {str(dtype).replace('torch.', '')}"
    return _row("paged_attention decode", shape, nbytes, ms, copy_bps)


def run(ctx: Context) -> dict:
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    copy = copy_bandwidth(ctx.device, ctx.sizes.copy_bytes, iters=max(3, ctx.sizes.bw_iters))
    rows = [{"case": "device copy", "shape": f"{copy['bytes_moved'] // 2} bytes read + written",
             "bytes": copy["bytes_moved"], "ms": copy["ms"], "GB_per_s": copy["bytes_per_s"] / 1e9,
             "vs_copy": 1.0, "status": "pass", "passed": True}]
    rows += _lora_rows(ctx, dtype, copy["bytes_per_s"])
    rows.append(_attention_row(ctx, dtype, copy["bytes_per_s"]))
    return {
        "passed": all(r["passed"] for r in rows),
        "copy_bytes_per_s": copy["bytes_per_s"],
        "columns": COLUMNS,
        "rows": rows,
        "notes": ["bytes: what each kernel must read and write at least (each input once); GB_per_s = bytes / median "
                  "time; vs_copy = that over the copy's bandwidth (read + written)"],
    }
