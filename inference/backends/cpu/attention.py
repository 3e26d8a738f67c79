"""The CPU backend's paged attention: one gather plan per step, shared by every layer.

The plain reference (:func:`kernels.paged_attention.paged_attention_ref`) loops over sequences;
this path batches them. It splits a step's sequences into work items (a long prefill into row
blocks), groups the items into padded chunks by dynamic programming so that decodes are not padded
to a prefill's length, builds every chunk's gather indices and causal mask once per step
(:func:`plan_cpu_attention`), and computes each chunk with one ``index_select`` of K/V and two
batched matmuls (:func:`cpu_paged_attention`). Tested against the reference and a float64
computation (tests/kernels/test_paged_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.paged_attention import batch_lengths, validate_operands

# Upper bound, in fp32 elements, on the largest temporary the reference builds
# per chunk (attention scores [C, n_heads, q, ctx] or gathered K/V
# [C, ctx, n_kv_heads, head_dim]).  2**24 elements = 64 MiB.  Module-level so
# tests can shrink it to exercise the chunking paths.
CHUNK_ELEMS = 1 << 24
# The chunk planner's fixed cost of one more chunk, in the unit of its padding cost (fp32
# elements gathered or scored per key position): a chunk runs about a dozen torch ops. Tuned on
# the 2-core CI machine with decode batches of 16-128 sequences of spread context lengths, a 30-layer
# pool and caches evicted between layers: 2**15..2**16 best, 2**14 or 2**18 up to 10% slower.
CHUNK_OVERHEAD = 1 << 16
# Largest additive mask, in fp32 elements, the reference materialises per chunk and step (one
# baddbmm then applies scale, q . k and the mask); bigger chunks use masked_fill_ instead.
BIAS_ELEMS = 1 << 20
# Items the planner's dynamic programme looks back over per cut, so also the most items in one
# chunk (bounds the planning cost: about 1 ms per step for 128 decodes on a CI core).
PLAN_WINDOW = 32



# A work item (b, tok_start, n_q, ctx): n_q consecutive queries of sequence b starting at row
# tok_start of q, the last of them at absolute position ctx - 1.
_Item = tuple[int, int, int, int]


def plan_chunks(
    q_starts: list[int],
    q_lens: list[int],
    ctx_lens: list[int],
    n_heads: int,
    kv_row_elems: int,
    budget: int,
) -> list[list[_Item]]:
    """Split the batch into work items and group them into padded chunks.

    A long prefill is split into row blocks whose temporaries fit in ``budget`` elements; this is
    exact, since a block needs only keys ``< ctx``. Items are sorted by ``(n_q, ctx)``
    descending and the sorted list is cut into consecutive chunks by dynamic programming,
    minimising the summed cost of the chunks: ``CHUNK_OVERHEAD`` each plus the elements
    they gather and score per padded key (a chunk pads every item to its longest query run and
    context) subject to each chunk's temporaries
    (``C * max_ctx * max(n_heads * max_q, kv_row_elems)`` elements) fitting in ``budget``. So
    decodes are not padded to a prefill's query length, and decodes of very different context
    lengths go to separate chunks once the padding costs more than another chunk's fixed
    overhead. The search looks back at most ``PLAN_WINDOW`` items per cut.
    """
    items: list[_Item] = []
    for b, (start, n_q, ctx) in enumerate(zip(q_starts, q_lens, ctx_lens)):
        if n_q == 0:
            continue
        rows = max(1, budget // max(1, n_heads * ctx))
        first_pos = ctx - n_q
        for j0 in range(0, n_q, rows):
            j1 = min(n_q, j0 + rows)
            items.append((b, start + j0, j1 - j0, first_pos + j1))
    items.sort(key=lambda it: (it[2], it[3]), reverse=True)

    n = len(items)
    best = [0] * (n + 1)  # best[j]: least cost of items[:j]
    cut = [0] * (n + 1)  # cut[j]: where the last chunk of that optimum starts
    head_rows = [n_heads * it[2] for it in items]  # score rows per key of an item's chunk
    for j in range(1, n + 1):
        best_j, cut_j, max_ctx = -1, j - 1, 0
        for i in range(j - 1, max(-1, j - 1 - PLAN_WINDOW), -1):
            # Sorted by n_q descending: the chunk's first item, items[i], has the longest run.
            ctx = items[i][3]
            if ctx > max_ctx:
                max_ctx = ctx
            size = j - i
            if size > 1 and size * max_ctx * max(head_rows[i], kv_row_elems) > budget:
                break  # a single item always fits (rows were split to the budget)
            cost = best[i] + CHUNK_OVERHEAD + size * max_ctx * (kv_row_elems + head_rows[i])
            if best_j < 0 or cost < best_j:
                best_j, cut_j = cost, i
        best[j], cut[j] = best_j, cut_j
    chunks: list[list[_Item]] = []
    j = n
    while j > 0:
        chunks.append(items[cut[j] : j])
        j = cut[j]
    chunks.reverse()
    return chunks


@dataclass(frozen=True)
class _Chunk:
    """Index tensors of one padded chunk of C work items (queries padded to ``max_q``, keys to
    ``max_ctx``); all int64 unless noted, on the batch's device."""

    n_items: int
    max_q: int
    max_ctx: int
    page: Tensor  # [C, max_ctx] page id of each key position
    offset: Tensor  # [C, max_ctx] token offset of each key position within its page
    kv_rows: Tensor  # [2 * C * n_kv * max_ctx] rows of a contiguous pool viewed as [-1, head_dim]: K then V
    tok: Tensor  # [C * max_q] row of q of each padded query (0 for padding), item-major
    out_rows: Tensor  # [valid] rows of the output this chunk writes, in padded (item, query) order
    valid_rows: Tensor | None  # [valid] positions of those rows among the C * max_q padded ones; None: all
    blocked: Tensor  # [C, 1, 1, max_q, max_ctx] bool, True where a key is masked out
    # [C * n_kv, group * max_q, max_ctx] fp32, 0 or -inf: the same mask as an additive term for
    # one baddbmm, materialised while at most BIAS_ELEMS (decode chunks); else None.
    bias: Tensor | None


@dataclass(frozen=True)
class CpuAttentionPlan:
    """What :func:`cpu_paged_attention` derives from the batch description alone: the chunking,
    gather indices and causal masks. Every layer of a step shares one batch description, so the
    engine builds this once per step (:func:`plan_cpu_attention`) instead of once per layer.
    Valid only for the batch tensors and the kv geometry it was made from."""

    n_heads: int
    page_tokens: int
    n_kv_heads: int
    head_dim: int
    num_queries: int  # query_start_loc[-1]: q must have at least this many rows
    device: torch.device
    chunks: tuple[_Chunk, ...]


def plan_cpu_attention(
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    *,
    n_heads: int,
    kv_shape: tuple[int, ...],
) -> CpuAttentionPlan:
    """Build the plan for a batch (see :class:`CpuAttentionPlan`).

    Args:
        page_table, seq_lens, query_start_loc: the batch description of :func:`paged_attention`.
        n_heads: query heads.
        kv_shape: ``(num_pages, 2, T, n_kv_heads, head_dim)`` of a layer's pool.

    Reads ``seq_lens`` and ``query_start_loc`` on the host (one sync each on a GPU). Raises
    ValueError for an inconsistent batch description.
    """
    qsl, ctx_lens = batch_lengths(page_table, seq_lens, query_start_loc, n_heads=n_heads, kv_shape=kv_shape)
    _, _, page_tokens, n_kv_heads, head_dim = (int(x) for x in kv_shape)
    dev = page_table.device
    batch = len(ctx_lens)
    q_lens = [qsl[b + 1] - qsl[b] for b in range(batch)]

    chunks: list[_Chunk] = []
    if batch:
        kv_heads = torch.arange(n_kv_heads, device=dev)
        planned = plan_chunks(
            qsl[:-1], q_lens, ctx_lens, n_heads, 2 * n_kv_heads * head_dim, CHUNK_ELEMS
        )
        for chunk in planned:
            chunks.append(_chunk_indices(chunk, page_table, page_tokens, n_heads, kv_heads, dev))
    return CpuAttentionPlan(
        n_heads=n_heads,
        page_tokens=page_tokens,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        num_queries=qsl[-1] if batch else 0,
        device=dev,
        chunks=tuple(chunks),
    )


def _chunk_indices(
    chunk: list[_Item],
    page_table: Tensor,
    page_tokens: int,
    n_heads: int,
    kv_heads: Tensor,
    dev: torch.device,
) -> _Chunk:
    n_chunk = len(chunk)
    n_kv_heads = kv_heads.shape[0]
    group = n_heads // n_kv_heads
    max_q = max(it[2] for it in chunk)
    max_ctx = max(it[3] for it in chunk)
    n_pages = -(-max_ctx // page_tokens)
    meta = torch.tensor(chunk, dtype=torch.long).to(dev, non_blocking=True)
    b_idx, tok0, n_q, ctx = meta.unbind(1)  # each [C]

    # Key slots past a sequence's context read its position 0 instead: pool slots past the
    # context may hold garbage (NaN/inf) and 0 * NaN = NaN in probs @ v, while position 0 is
    # always written (ctx >= 1) and gets probability 0.
    kpos = torch.arange(max_ctx, device=dev)
    pos = torch.where(kpos[None, :] < ctx[:, None], kpos[None, :], 0)  # [C, max_ctx]
    pages = page_table.index_select(0, b_idx)[:, :n_pages].long()
    page = pages.gather(1, pos // page_tokens)  # [C, max_ctx]
    offset = pos % page_tokens
    # Row of (page, kind, t, head) in a contiguous pool's [-1, head_dim] view; V rows are
    # T * n_kv further than K rows.
    k_rows = (page * (2 * page_tokens) + offset) * n_kv_heads
    k_rows = (k_rows[:, None, :] + kv_heads[None, :, None]).reshape(-1)
    kv_rows = torch.cat((k_rows, k_rows + page_tokens * n_kv_heads))

    qj = torch.arange(max_q, device=dev)
    q_valid = qj[None, :] < n_q[:, None]  # [C, max_q]
    tok = torch.where(q_valid, tok0[:, None] + qj[None, :], 0)
    all_valid = all(it[2] == max_q for it in chunk)
    # Query j of an item sits at position ctx - n_q + j. Padded rows (j >= n_q) get positions
    # >= ctx, so no row is fully masked.
    qpos = (ctx - n_q)[:, None] + qj[None, :]  # [C, max_q]
    blocked = (kpos[None, None, :] > qpos[:, :, None])[:, None, None]  # [C, 1, 1, max_q, max_ctx]
    bias = None
    if n_chunk * n_heads * max_q * max_ctx <= BIAS_ELEMS:
        bias = torch.zeros((n_chunk, n_kv_heads, group, max_q, max_ctx), dtype=torch.float32, device=dev)
        bias.masked_fill_(blocked, float("-inf"))
        bias = bias.view(n_chunk * n_kv_heads, group * max_q, max_ctx)
    return _Chunk(
        n_items=n_chunk,
        max_q=max_q,
        max_ctx=max_ctx,
        page=page,
        offset=offset,
        kv_rows=kv_rows,
        tok=tok.reshape(-1),
        out_rows=tok.reshape(-1) if all_valid else tok[q_valid],
        valid_rows=None if all_valid else q_valid.reshape(-1).nonzero().squeeze(1),
        blocked=blocked,
        bias=bias,
    )


def cpu_paged_attention(q: Tensor, kv: Tensor, plan: CpuAttentionPlan, scale: float) -> Tensor:
    """:func:`kernels.paged_attention.paged_attention` for the batch ``plan`` was made from.

    Vectorised over the batch: for each chunk of the plan the pages are gathered into padded
    ``[C, n_kv_heads, ctx, head_dim]`` K/V tensors (one ``index_select``) and attention is two
    batched matmuls with the causal mask, computed in float32 (inputs of any supported dtype are
    upcast).

    Args:
        q: ``[num_tokens, n_heads, head_dim]`` queries (fp32/fp16/bf16).
        kv: ``[num_pages, 2, T, n_kv_heads, head_dim]`` page pool of one layer.
        plan: from :func:`plan_cpu_attention` for this batch and kv geometry.
        scale: softmax scale applied to ``q . k`` (typically ``head_dim**-0.5``).

    Returns:
        ``[num_tokens, n_heads, head_dim]`` in ``q.dtype``; rows not covered by the batch are zero.
    """
    validate_operands(q, kv)
    num_tokens, n_heads, head_dim = q.shape
    n_kv_heads = kv.shape[3]
    if (plan.n_heads, plan.page_tokens, plan.n_kv_heads, plan.head_dim, plan.device) != (
        n_heads, kv.shape[2], n_kv_heads, head_dim, q.device
    ):
        raise ValueError(
            "plan was made for (n_heads, page_tokens, n_kv_heads, head_dim, device) = "
            f"{(plan.n_heads, plan.page_tokens, plan.n_kv_heads, plan.head_dim, plan.device)}, "
            f"got {(n_heads, kv.shape[2], n_kv_heads, head_dim, q.device)}"
        )
    if plan.num_queries > num_tokens:
        raise ValueError(f"query_start_loc spans {plan.num_queries} queries but q has {num_tokens} tokens")

    out = torch.zeros_like(q)
    # Contiguous pool: gather K/V rows of head_dim elements from a flat [num_pages * 2 * T * n_kv,
    # head_dim] view with one index_select. Otherwise (e.g. a per-layer view of a bigger pool)
    # use strided indexing.
    flat_kv = kv.view(-1, head_dim) if kv.is_contiguous() else None
    for chunk in plan.chunks:
        k, v = _chunk_kv(kv, flat_kv, chunk)
        o = _chunk_attention(q, k, v, chunk, scale)
        if chunk.valid_rows is not None:
            o = o.index_select(0, chunk.valid_rows)
        out.index_copy_(0, chunk.out_rows, o.to(q.dtype))
    return out


def _chunk_kv(kv: Tensor, flat_kv: Tensor | None, chunk: _Chunk) -> tuple[Tensor, Tensor]:
    """K and V of a chunk's padded contexts: each [C * n_kv_heads, max_ctx, head_dim] fp32."""
    n_kv_heads, head_dim = kv.shape[3], kv.shape[4]
    if flat_kv is not None:
        kv_g = flat_kv.index_select(0, chunk.kv_rows).view(2, chunk.n_items, n_kv_heads, chunk.max_ctx, head_dim)
        k, v = kv_g[0], kv_g[1]
    else:
        page_i, off_i = chunk.page[:, None, :], chunk.offset[:, None, :]
        head_i = torch.arange(n_kv_heads, device=kv.device)[None, :, None]
        k = kv[page_i, 0, off_i, head_i]
        v = kv[page_i, 1, off_i, head_i]
    shape = (chunk.n_items * n_kv_heads, chunk.max_ctx, head_dim)
    return k.to(torch.float32).reshape(shape), v.to(torch.float32).reshape(shape)


def _chunk_attention(q: Tensor, k: Tensor, v: Tensor, chunk: _Chunk, scale: float) -> Tensor:
    """Attention of a chunk's padded queries: [C * max_q, n_heads, head_dim] fp32."""
    n_chunk, max_q, max_ctx = chunk.n_items, chunk.max_q, chunk.max_ctx
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads = k.shape[0] // n_chunk
    group = n_heads // n_kv_heads
    # Queries [C * max_q, H, hd] -> [C * n_kv, group * max_q, hd].
    qc = q.index_select(0, chunk.tok).to(torch.float32)
    qc = qc.view(n_chunk, max_q, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qc = qc.reshape(n_chunk * n_kv_heads, group * max_q, head_dim)
    if chunk.bias is not None:  # scale, q . k and the mask in one op
        scores = torch.baddbmm(chunk.bias, qc, k.transpose(1, 2), alpha=scale)
    else:
        scores = torch.bmm(qc, k.transpose(1, 2)).mul_(scale)
        scores.view(n_chunk, n_kv_heads, group, max_q, max_ctx).masked_fill_(chunk.blocked, float("-inf"))
    o = torch.bmm(torch.softmax(scores, dim=-1), v)  # [C * n_kv, group * max_q, hd]
    o = o.view(n_chunk, n_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    return o.reshape(n_chunk * max_q, n_heads, head_dim)
