"""Compile the Triton kernels' variants for one model before the first request.

Triton compiles a kernel per variant: its block-size constants (chosen from the rank, the rows of a
segment and the query rows per program) and the divisibility of its integer arguments (strides,
feature sizes, the rank). Launching each variant once, on tensors shaped and strided like the
model's, moves every compile to start-up (compiled kernels are also cached on disk by Triton, so a
restart on the same machine is quick).
"""

from __future__ import annotations

import logging
import time

import torch

from inference.model_config import ModelConfig
from inference.page_pool import PagePool
from kernels.lora import lora_expand, lora_shrink
from kernels.paged_attention import paged_attention_triton

log = logging.getLogger(__name__)

# Ranks that reach every LoRA block-size variant (block ranks 1-32, powers of two) and both sides
# of the kernels' divisibility-by-16 specialisation of the rank.
WARM_RANKS = (1, 2, 3, 4, 5, 8, 9, 12, 16, 17, 24, 32, 33, 48, 64, 128)
# Segment lengths that reach each row-tile size of the segment kernels (16, 32, 64).
WARM_SEGMENT_ROWS = (16, 32, 64)


def warm_up(config: ModelConfig, pool: PagePool, max_rank: int) -> None:
    """Launch every LoRA and attention kernel variant the engine can use for ``config`` (CUDA
    only: interpreted kernels compile nothing)."""
    if pool.tensor.device.type != "cuda":
        return
    started = time.monotonic()
    ranks = sorted({r for r in WARM_RANKS if r <= max_rank} | {max_rank})
    for rank in ranks:
        _warm_lora(config, pool, rank)
    _warm_attention(config, pool)
    torch.cuda.synchronize(pool.tensor.device)
    log.info("compiled the Triton kernels for ranks %s in %.1f s", ranks, time.monotonic() - started)


def _model_like_calls(config: ModelConfig, rows: int, device, dtype) -> list[tuple[torch.Tensor, dict]]:
    """(x, outs) pairs with the shapes and strides of the model's four LoRA calls per layer."""
    q, kv, hidden, inter = config.q_size, config.kv_size, config.hidden_size, config.intermediate_size
    qkv = torch.zeros((rows, q + 2 * kv), dtype=dtype, device=device)
    gate_up = torch.zeros((rows, 2 * inter), dtype=dtype, device=device)
    return [
        (torch.zeros((rows, hidden), dtype=dtype, device=device),
         {"q_proj": qkv[:, :q], "k_proj": qkv[:, q : q + kv], "v_proj": qkv[:, q + kv :]}),
        (torch.zeros((rows, q), dtype=dtype, device=device), {"o_proj": torch.zeros((rows, hidden), dtype=dtype, device=device)}),
        (torch.zeros((rows, hidden), dtype=dtype, device=device),
         {"gate_proj": gate_up[:, :inter], "up_proj": gate_up[:, inter:]}),
        (torch.zeros((rows, inter), dtype=dtype, device=device), {"down_proj": torch.zeros((rows, hidden), dtype=dtype, device=device)}),
    ]


def _warm_lora(config: ModelConfig, pool: PagePool, rank: int) -> None:
    device, dtype = pool.tensor.device, pool.tensor.dtype
    widest = max(config.hidden_size, config.intermediate_size, config.q_size)
    pages = pool.geometry.pages_for_elems(rank * widest)
    if pages > pool.num_pages:
        return
    layer = pool.layer(0)
    table = torch.arange(pages, dtype=torch.int32, device=device)[None, :]
    ranks = torch.tensor([rank], dtype=torch.int32, device=device)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    scaling = torch.ones(1, dtype=torch.float32, device=device)
    rows = max(WARM_SEGMENT_ROWS)
    launches = [{"row_slot": torch.zeros(rows, dtype=torch.int32, device=device)}]
    for length in WARM_SEGMENT_ROWS:
        launches.append({"seg_start": torch.tensor([0, length], dtype=torch.int32, device=device),
                         "seg_slot": torch.zeros(1, dtype=torch.int32, device=device), "max_seg_len": length})
    for x, outs in _model_like_calls(config, rows, device, dtype):
        for out in outs.values():
            for launch in launches:
                y = lora_shrink(x, layer, table, offset, ranks, rank, use_triton=True, **launch)
                lora_expand(out, y, layer, table, offset, ranks, scaling, use_triton=True, **launch)


def _warm_attention(config: ModelConfig, pool: PagePool) -> None:
    device, dtype = pool.tensor.device, pool.tensor.dtype
    kv = pool.kv_layer(0)
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    group = heads // kv_heads
    page_tokens = pool.geometry.page_tokens
    # query rows per program (q_len * group) of 1-16, 17-32 and more: each row-tile size
    for q_len in sorted({1, -(-17 // group), -(-33 // group)}):
        qk = torch.zeros((q_len, heads + kv_heads, head_dim), dtype=dtype, device=device)
        pages = -(-q_len // page_tokens)
        if pages > pool.num_pages:
            continue
        paged_attention_triton(
            qk[:, :heads], kv, torch.arange(pages, dtype=torch.int32, device=device)[None, :],
            torch.tensor([q_len], dtype=torch.int32, device=device),
            torch.tensor([0, q_len], dtype=torch.int32, device=device), head_dim**-0.5, max_q_len=q_len,
        )
