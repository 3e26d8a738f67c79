"""``write_kv`` and ``paged_attention_triton`` against float64 references.

One mixed batch per case: decode sequences (one query token, random context), chunked-prefill
sequences (several query tokens after a random cached prefix) and one sequence with no query
token, in random order; GQA; pages taken in random order from a pool poisoned with NaN, so a read
of a slot that no token wrote turns the output into NaN. The reference is dense causal softmax
attention in float64 over the keys and values as drawn (rounded to the dtype), not over the pool.

Tolerance (per element): ``C * (eps_out * |ref| + (eps_pv + 2 * eps32 * sqrt(D) * smag) * mag)``,
``mag = P @ |V|``: the probabilities sum to one, so rounding in P @ V grows with no power of the
context length (each p is rounded once: TF32 for fp16/bf16 operands, IEEE fp32 for fp32); a score
error ``ds`` (an fp32 reduction over head_dim D of terms up to ``smag``, the largest
``scale * sum_d |q_d k_d|`` of the row) moves the output by at most ``2 * ds * mag``.
"""

from __future__ import annotations

import math

import torch

from benchmarks.gpu_check.compare import SAFETY, TF32_EPS, compare, eps
from benchmarks.gpu_check.sizes import Context
from kernels.paged_attention import paged_attention_triton, write_kv


def _rand_int(lo: int, hi: int, gen, device) -> int:
    """Uniform in [lo, hi] inclusive."""
    return lo + int(torch.randint(0, hi - lo + 1, (1,), generator=gen, device=device))


def make_batch(ctx: Context, dtype: torch.dtype, gen) -> dict:
    """Sequences, K/V as drawn, the poisoned pool written by ``write_kv``, the batch tensors."""
    z, dev = ctx.sizes, ctx.device
    seqs = [(1, _rand_int(1, z.attn_max_ctx, gen, dev)) for _ in range(z.attn_decode_seqs)]
    for _ in range(z.attn_prefill_seqs):
        q_len = _rand_int(2, z.attn_max_q, gen, dev)
        seqs.append((q_len, q_len + _rand_int(0, z.attn_max_ctx - q_len, gen, dev)))
    seqs.append((0, _rand_int(1, z.attn_max_ctx, gen, dev)))  # cached tokens, no query this step
    order = torch.randperm(len(seqs), generator=gen, device=dev).tolist()
    seqs = [seqs[i] for i in order]
    tp = z.attn_page_tokens
    n_pages = [-(-c // tp) for _, c in seqs]
    total = sum(n_pages) + 2
    perm = torch.randperm(total, generator=gen, device=dev)
    table = torch.zeros((len(seqs), max(n_pages)), dtype=torch.int32, device=dev)
    shape = (total, 2, tp, z.attn_kv_heads, z.attn_head_dim)
    kv = torch.full(shape, float("nan"), dtype=dtype, device=dev)
    keys, values, slots, used = [], [], [], 0
    for b, ((_, c), n) in enumerate(zip(seqs, n_pages)):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
        pos = torch.arange(c, device=dev)
        slots.append(table[b].long()[pos // tp] * tp + pos % tp)
        keys.append(torch.randn((c, z.attn_kv_heads, z.attn_head_dim), generator=gen, device=dev).to(dtype))
        values.append(torch.randn((c, z.attn_kv_heads, z.attn_head_dim), generator=gen, device=dev).to(dtype))
    slot_mapping = torch.cat(slots)
    write_kv(kv, torch.cat(keys), torch.cat(values), slot_mapping)
    q_lens = [q for q, _ in seqs]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    q = torch.randn((starts[-1], z.attn_heads, z.attn_head_dim), generator=gen, device=dev).to(dtype)
    return {
        "seqs": seqs, "kv": kv, "keys": keys, "values": values, "slot_mapping": slot_mapping, "q": q,
        "page_table": table, "seq_lens": torch.tensor([c for _, c in seqs], dtype=torch.int32, device=dev),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32, device=dev), "max_q_len": max(q_lens),
    }


def attention_reference(batch: dict, n_heads: int, scale: float):
    """float64 (out, mag = P @ |V|, smag = per (query, head) max_j scale * sum_d |q_d k_jd|)."""
    q64 = batch["q"].double()
    out = torch.zeros_like(q64)
    mag = torch.zeros_like(q64)
    smag = torch.zeros(q64.shape[:2], dtype=torch.float64, device=q64.device)
    start = 0
    for (q_len, c), k, v in zip(batch["seqs"], batch["keys"], batch["values"]):
        if q_len == 0:
            continue
        group = n_heads // k.shape[1]
        k64 = k.double().repeat_interleave(group, dim=1)  # [c, H, D]
        v64 = v.double().repeat_interleave(group, dim=1)
        qs = q64[start:start + q_len]
        scores = torch.einsum("qhd,khd->hqk", qs, k64) * scale
        q_pos = torch.arange(c - q_len, c, device=q64.device)
        causal = torch.arange(c, device=q64.device)[None, None, :] > q_pos[None, :, None]
        p = scores.masked_fill(causal, float("-inf")).softmax(-1)
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", p, v64)
        mag[start:start + q_len] = torch.einsum("hqk,khd->qhd", p, v64.abs())
        smag[start:start + q_len] = (torch.einsum("qhd,khd->hqk", qs.abs(), k64.abs()) * scale).amax(-1).T
        start += q_len
    return out, mag, smag


def write_kv_case(ctx: Context, dtype: torch.dtype, salt: int) -> dict:
    """Every written slot reads back exactly what was written."""
    batch = make_batch(ctx, dtype, ctx.generator(salt))
    kv, slots, tp = batch["kv"], batch["slot_mapping"], ctx.sizes.attn_page_tokens
    got_k = kv[slots // tp, 0, slots % tp]
    got_v = kv[slots // tp, 1, slots % tp]
    want = torch.cat([torch.cat(batch["keys"]), torch.cat(batch["values"])]).double()
    result = compare(torch.cat([got_k, got_v]), want, torch.zeros_like(want))
    return {"case": "write_kv", "dtype": str(dtype).replace("torch.", ""),
            "shape": f"tokens={slots.numel()} kv_heads={ctx.sizes.attn_kv_heads} D={ctx.sizes.attn_head_dim}",
            "reduction_len": 0, **result}


def attention_case(ctx: Context, dtype: torch.dtype, salt: int) -> dict:
    z = ctx.sizes
    batch = make_batch(ctx, dtype, ctx.generator(salt))
    scale = z.attn_head_dim**-0.5
    out = paged_attention_triton(batch["q"], batch["kv"], batch["page_table"], batch["seq_lens"],
                                 batch["query_start_loc"], scale, max_q_len=batch["max_q_len"])
    ref, mag, smag = attention_reference(batch, z.attn_heads, scale)
    eps_pv = eps(torch.float32) if dtype == torch.float32 else TF32_EPS
    eps_s = 2 * eps(torch.float32) * math.sqrt(z.attn_head_dim) * smag[:, :, None]
    tol = SAFETY * (eps(dtype) * ref.abs() + (eps_pv + eps_s) * mag)
    result = compare(out, ref, tol)
    q_lens = [q for q, _ in batch["seqs"]]
    return {
        "case": "paged_attention mixed", "dtype": str(dtype).replace("torch.", ""),
        "shape": (f"seqs={len(q_lens)} (decode {q_lens.count(1)}, prefill {sum(q > 1 for q in q_lens)}, "
                  f"idle {q_lens.count(0)}) H={z.attn_heads} KV={z.attn_kv_heads} D={z.attn_head_dim} "
                  f"max_ctx={max(c for _, c in batch['seqs'])}"),
        "reduction_len": z.attn_head_dim, **result,
    }
