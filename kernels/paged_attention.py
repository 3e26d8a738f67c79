"""Paged (varlen) attention over the unified KV page pool.

One call serves prefill, chunked prefill and decode for a whole batch.

Memory layout (fixed; the engine codes against it)
--------------------------------------------------
For one layer the KV cache is a tensor::

    kv: [num_pages, 2, T, n_kv_heads, head_dim]     (contiguous)

(A non-contiguous per-layer view of a bigger pool also works as long as
``head_dim`` has unit stride; the contiguous case is the fast one on CPU.)

where ``T`` is the page size in tokens, ``kv[:, 0]`` holds keys and
``kv[:, 1]`` values.  Sequence ``b`` owns the pages listed in
``page_table[b, :]`` (int32; entries past the sequence's last used page are
padding and may be any valid page id, e.g. 0).  The key of its token at
absolute position ``p`` is ``kv[page_table[b, p // T], 0, p % T]``; a flat
*slot* is ``page_id * T + p % T`` (see :func:`write_kv`).

Batch description (varlen)
--------------------------
* ``q``: ``[num_tokens, n_heads, head_dim]``, the new query tokens of all
  ``B`` sequences concatenated in sequence order.
* ``query_start_loc``: ``[B + 1]`` int32, cumulative token offsets into ``q``;
  sequence ``b`` owns ``q[query_start_loc[b]:query_start_loc[b + 1]]``
  (``q_len_b`` tokens, possibly 0; decode is ``q_len_b == 1``).
* ``seq_lens``: ``[B]`` int32, total context length in tokens of sequence
  ``b`` *including* its new tokens, whose K/V must already be in the pages.
  Local query ``j`` of sequence ``b`` sits at absolute position
  ``seq_lens[b] - q_len_b + j`` and attends causally to keys ``0..position``.
* Grouped-query attention: query head ``h`` reads kv head
  ``h // (n_heads // n_kv_heads)``.

Public API: :func:`paged_attention` (dispatcher), :func:`paged_attention_ref`
(vectorised torch reference, the CPU path), :func:`paged_attention_triton`
(one Triton kernel, the CUDA path; also runs under ``TRITON_INTERPRET=1`` on
CPU tensors for tests), :func:`plan_paged_attention` (the reference's gather
plan for a batch, built once and shared by every layer's call) and
:func:`write_kv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kernels.triton_support import HAVE_TRITON as _HAVE_TRITON
from kernels.triton_support import interpret_mode as _interpret_mode
from kernels.triton_support import resolve_use_triton, tl, triton, triton_available

__all__ = [
    "paged_attention",
    "paged_attention_ref",
    "paged_attention_triton",
    "plan_paged_attention",
    "plan_paged_attention_ref",
    "RefAttentionPlan",
    "write_kv",
    "triton_available",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)

# Upper bound, in fp32 elements, on the largest temporary the reference builds
# per chunk (attention scores [C, n_heads, q, ctx] or gathered K/V
# [C, ctx, n_kv_heads, head_dim]).  2**24 elements = 64 MiB.  Module-level so
# tests can shrink it to exercise the chunking paths.
_REF_CHUNK_ELEMS = 1 << 24
# The chunk planner's fixed cost of one more chunk, in the unit of its padding cost (fp32
# elements gathered or scored per key position): a chunk runs about a dozen torch ops. Tuned on
# the 2-core CI machine with decode batches of 16-128 sequences of spread context lengths, a 30-layer
# pool and caches evicted between layers: 2**15..2**16 best, 2**14 or 2**18 up to 10% slower.
_REF_CHUNK_OVERHEAD = 1 << 16
# Largest additive mask, in fp32 elements, the reference materialises per chunk and step (one
# baddbmm then applies scale, q . k and the mask); bigger chunks use masked_fill_ instead.
_REF_BIAS_ELEMS = 1 << 20
# Items the planner's dynamic programme looks back over per cut, so also the most items in one
# chunk (bounds the planning cost: about 1 ms per step for 128 decodes on a CI core).
_REF_PLAN_WINDOW = 32


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _validate_batch(page_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor) -> None:
    """Shape/dtype/device checks of the batch description (no device synchronisation)."""
    if page_table.dim() != 2:
        raise ValueError(
            f"page_table must be [B, max_pages], got shape {tuple(page_table.shape)}"
        )
    if seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be [B], got shape {tuple(seq_lens.shape)}")
    batch = seq_lens.shape[0]
    if query_start_loc.dim() != 1 or query_start_loc.shape[0] != batch + 1:
        raise ValueError(
            f"query_start_loc must be [B + 1] = [{batch + 1}], got shape "
            f"{tuple(query_start_loc.shape)}"
        )
    if page_table.shape[0] != batch:
        raise ValueError(
            f"page_table has {page_table.shape[0]} rows but seq_lens describes {batch} sequences"
        )
    for name, t in (
        ("page_table", page_table),
        ("seq_lens", seq_lens),
        ("query_start_loc", query_start_loc),
    ):
        if t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 (or int64), got {t.dtype}")
    for name, t in (("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.device != page_table.device:
            raise ValueError(f"{name} is on {t.device} but page_table is on {page_table.device}")


def _validate_heads(n_heads: int, n_kv_heads: int) -> None:
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})"
        )


def _validate_kv_shape(kv_shape: tuple[int, ...]) -> None:
    if len(kv_shape) != 5 or kv_shape[1] != 2:
        raise ValueError(
            "kv must be [num_pages, 2, page_tokens, n_kv_heads, head_dim], "
            f"got shape {tuple(kv_shape)}"
        )


def _validate_operands(q: Tensor, kv: Tensor) -> None:
    """Shape/dtype/device checks of the queries and the pool."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, n_heads, head_dim], got shape {tuple(q.shape)}")
    _validate_kv_shape(tuple(kv.shape))
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float32/float16/bfloat16, got {q.dtype}")
    if kv.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kv must be float32/float16/bfloat16, got {kv.dtype}")
    if kv.shape[4] != q.shape[2]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[2]}, kv has {kv.shape[4]}")
    _validate_heads(q.shape[1], kv.shape[3])
    if kv.device != q.device:
        raise ValueError(f"kv is on {kv.device} but q is on {q.device}")


def _validate(
    q: Tensor,
    kv: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
) -> None:
    """Cheap shape/dtype/device checks (no device synchronisation)."""
    _validate_operands(q, kv)
    _validate_batch(page_table, seq_lens, query_start_loc)
    if page_table.device != q.device:
        raise ValueError(f"page_table is on {page_table.device} but q is on {q.device}")


# --------------------------------------------------------------------------
# Torch reference (CPU path)
# --------------------------------------------------------------------------

# A work item (b, tok_start, n_q, ctx): n_q consecutive queries of sequence b starting at row
# tok_start of q, the last of them at absolute position ctx - 1.
_Item = tuple[int, int, int, int]


def _plan_ref_chunks(
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
    minimising the summed cost of the chunks: ``_REF_CHUNK_OVERHEAD`` each plus the elements
    they gather and score per padded key (a chunk pads every item to its longest query run and
    context) subject to each chunk's temporaries
    (``C * max_ctx * max(n_heads * max_q, kv_row_elems)`` elements) fitting in ``budget``. So
    decodes are not padded to a prefill's query length, and decodes of very different context
    lengths go to separate chunks once the padding costs more than another chunk's fixed
    overhead. The search looks back at most ``_REF_PLAN_WINDOW`` items per cut.
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
        for i in range(j - 1, max(-1, j - 1 - _REF_PLAN_WINDOW), -1):
            # Sorted by n_q descending: the chunk's first item, items[i], has the longest run.
            ctx = items[i][3]
            if ctx > max_ctx:
                max_ctx = ctx
            size = j - i
            if size > 1 and size * max_ctx * max(head_rows[i], kv_row_elems) > budget:
                break  # a single item always fits (rows were split to the budget)
            cost = best[i] + _REF_CHUNK_OVERHEAD + size * max_ctx * (kv_row_elems + head_rows[i])
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
class _RefChunk:
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
    # one baddbmm, materialised while at most _REF_BIAS_ELEMS (decode chunks); else None.
    bias: Tensor | None


@dataclass(frozen=True)
class RefAttentionPlan:
    """What :func:`paged_attention_ref` derives from the batch description alone: the chunking,
    gather indices and causal masks. Every layer of a step shares one batch description, so the
    engine builds this once per step (:func:`plan_paged_attention`) instead of once per layer.
    Valid only for the batch tensors and the kv geometry it was made from."""

    n_heads: int
    page_tokens: int
    n_kv_heads: int
    head_dim: int
    num_queries: int  # query_start_loc[-1]: q must have at least this many rows
    device: torch.device
    chunks: tuple[_RefChunk, ...]


def plan_paged_attention_ref(
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    *,
    n_heads: int,
    kv_shape: tuple[int, ...],
) -> RefAttentionPlan:
    """Build the reference's plan for a batch (see :class:`RefAttentionPlan`).

    Args:
        page_table, seq_lens, query_start_loc: the batch description of :func:`paged_attention`.
        n_heads: query heads.
        kv_shape: ``(num_pages, 2, T, n_kv_heads, head_dim)`` of a layer's pool.

    Reads ``seq_lens`` and ``query_start_loc`` on the host (one sync each on a GPU). Raises
    ValueError for an inconsistent batch description.
    """
    _validate_batch(page_table, seq_lens, query_start_loc)
    _validate_kv_shape(tuple(kv_shape))
    _, _, page_tokens, n_kv_heads, head_dim = (int(x) for x in kv_shape)
    _validate_heads(n_heads, n_kv_heads)
    dev = page_table.device

    qsl = query_start_loc.tolist()
    ctx_lens = seq_lens.tolist()
    batch = len(ctx_lens)
    q_lens = [qsl[b + 1] - qsl[b] for b in range(batch)]
    if batch and qsl[0] < 0:
        raise ValueError(f"query_start_loc must start at >= 0, got {qsl[0]}")
    for b in range(batch):
        if q_lens[b] < 0:
            raise ValueError(f"query_start_loc must be non-decreasing (sequence {b})")
        if ctx_lens[b] < q_lens[b]:
            raise ValueError(
                f"seq_lens[{b}] = {ctx_lens[b]} is smaller than its query length {q_lens[b]}"
            )
    max_ctx_all = max(ctx_lens, default=0)
    if -(-max_ctx_all // page_tokens) > page_table.shape[1]:
        raise ValueError(
            f"a context of {max_ctx_all} tokens needs {-(-max_ctx_all // page_tokens)} pages "
            f"but page_table has only {page_table.shape[1]} columns"
        )

    chunks: list[_RefChunk] = []
    if batch:
        kv_heads = torch.arange(n_kv_heads, device=dev)
        planned = _plan_ref_chunks(
            qsl[:-1], q_lens, ctx_lens, n_heads, 2 * n_kv_heads * head_dim, _REF_CHUNK_ELEMS
        )
        for chunk in planned:
            chunks.append(_ref_chunk(chunk, page_table, page_tokens, n_heads, kv_heads, dev))
    return RefAttentionPlan(
        n_heads=n_heads,
        page_tokens=page_tokens,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        num_queries=qsl[-1] if batch else 0,
        device=dev,
        chunks=tuple(chunks),
    )


def _ref_chunk(
    chunk: list[_Item],
    page_table: Tensor,
    page_tokens: int,
    n_heads: int,
    kv_heads: Tensor,
    dev: torch.device,
) -> _RefChunk:
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
    if n_chunk * n_heads * max_q * max_ctx <= _REF_BIAS_ELEMS:
        bias = torch.zeros((n_chunk, n_kv_heads, group, max_q, max_ctx), dtype=torch.float32, device=dev)
        bias.masked_fill_(blocked, float("-inf"))
        bias = bias.view(n_chunk * n_kv_heads, group * max_q, max_ctx)
    return _RefChunk(
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


def paged_attention_ref(
    q: Tensor,
    kv: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    *,
    max_q_len: int | None = None,
    plan: RefAttentionPlan | None = None,
) -> Tensor:
    """Torch reference of :func:`paged_attention` (the CPU path of the engine).

    Vectorised over the batch: work items are grouped into chunks; for each chunk the pages are
    gathered into padded ``[C, n_kv_heads, ctx, head_dim]`` K/V tensors (one ``index_select``)
    and attention is two batched matmuls with a boolean causal mask, computed in float32 (inputs
    of any supported dtype are upcast).

    Args:
        q: ``[num_tokens, n_heads, head_dim]`` queries (fp32/fp16/bf16).
        kv: ``[num_pages, 2, T, n_kv_heads, head_dim]`` page pool of one layer.
        page_table: ``[B, max_pages]`` int32 page ids per sequence.
        seq_lens: ``[B]`` int32, context length in tokens incl. the new tokens.
        query_start_loc: ``[B + 1]`` int32 cumulative query offsets into ``q``.
        scale: softmax scale applied to ``q . k`` (typically ``head_dim**-0.5``).
        max_q_len: unused (accepted for signature parity with the Triton path).
        plan: the batch's :class:`RefAttentionPlan` from :func:`plan_paged_attention_ref`
            (built here when None; pass it to share one plan across layers).

    Returns:
        ``[num_tokens, n_heads, head_dim]`` in ``q.dtype``.  Rows of ``q`` not
        covered by ``query_start_loc`` are zero.

    Note:
        Without a plan, reads ``seq_lens`` and ``query_start_loc`` on the host (one sync each
        when they live on a GPU).
    """
    del max_q_len
    _validate_operands(q, kv)
    num_tokens, n_heads, head_dim = q.shape
    n_kv_heads = kv.shape[3]
    if plan is None:  # the plan's builder checks the batch description
        if page_table.device != q.device:
            raise ValueError(f"page_table is on {page_table.device} but q is on {q.device}")
        plan = plan_paged_attention_ref(
            page_table, seq_lens, query_start_loc, n_heads=n_heads, kv_shape=tuple(kv.shape)
        )
    elif (plan.n_heads, plan.page_tokens, plan.n_kv_heads, plan.head_dim, plan.device) != (
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
    group = n_heads // n_kv_heads
    for chunk in plan.chunks:
        n_chunk, max_q, max_ctx = chunk.n_items, chunk.max_q, chunk.max_ctx
        if flat_kv is not None:
            kv_g = flat_kv.index_select(0, chunk.kv_rows).view(2, n_chunk, n_kv_heads, max_ctx, head_dim)
            k, v = kv_g[0], kv_g[1]
        else:
            page_i, off_i = chunk.page[:, None, :], chunk.offset[:, None, :]
            head_i = torch.arange(n_kv_heads, device=q.device)[None, :, None]
            k = kv[page_i, 0, off_i, head_i]
            v = kv[page_i, 1, off_i, head_i]
        k = k.to(torch.float32)
        v = v.to(torch.float32)

        k = k.reshape(n_chunk * n_kv_heads, max_ctx, head_dim)
        v = v.reshape(n_chunk * n_kv_heads, max_ctx, head_dim)

        # Queries [C * max_q, H, hd] -> [C * n_kv, group * max_q, hd].
        qc = q.index_select(0, chunk.tok).to(torch.float32)
        qc = qc.view(n_chunk, max_q, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        qc = qc.reshape(n_chunk * n_kv_heads, group * max_q, head_dim)

        if chunk.bias is not None:  # scale, q . k and the mask in one op
            scores = torch.baddbmm(chunk.bias, qc, k.transpose(1, 2), alpha=scale)
        else:
            scores = torch.bmm(qc, k.transpose(1, 2)).mul_(scale)
            scores.view(n_chunk, n_kv_heads, group, max_q, max_ctx).masked_fill_(
                chunk.blocked, float("-inf")
            )
        probs = torch.softmax(scores, dim=-1)
        o = torch.bmm(probs, v)  # [C * n_kv, group * max_q, hd]
        o = o.view(n_chunk, n_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(n_chunk * max_q, n_heads, head_dim)
        if chunk.valid_rows is not None:
            o = o.index_select(0, chunk.valid_rows)
        out.index_copy_(0, chunk.out_rows, o.to(q.dtype))
    return out


# --------------------------------------------------------------------------
# Triton kernel (CUDA path)
# --------------------------------------------------------------------------

# Triton decides interpreter vs. compiler for every @jit function when it is
# decorated, including its own library helpers (tl.zeros, tl.max, tl.sum, ...)
# which are decorated when triton is first imported.  To keep
# TRITON_INTERPRET=1 usable no matter when triton was imported (e.g. by
# transformers before a test module sets the variable), the kernel uses only
# builtins -- tl.full instead of tl.zeros, tl.reduce with triton's own max/sum
# combiners instead of tl.max/tl.sum (the interpreter maps those combiners to
# numpy) -- and is itself jitted on first use, per interpreter mode.
if _HAVE_TRITON:
    _max_combine = tl.standard._elementwise_max
    _sum_combine = tl.standard._sum_combine

    def _paged_attention_kernel(
        q_ptr,
        kv_ptr,
        out_ptr,
        page_table_ptr,
        seq_lens_ptr,
        query_start_loc_ptr,
        qk_scale_log2,  # softmax scale * log2(e)
        stride_q_tok,
        stride_q_head,
        stride_o_tok,
        stride_o_head,
        stride_kv_page,
        stride_kv_kind,  # K -> V offset
        stride_kv_tok,
        stride_kv_head,
        stride_pt_seq,
        HEAD_DIM: tl.constexpr,
        PAGE_TOKENS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_IEEE: tl.constexpr,
    ):
        """One program = one sequence x one kv head x BLOCK_M (query, group head) rows.

        Row r of the block is local query ``r // GROUP`` with query head
        ``kv_head * GROUP + r % GROUP``, so a decode step streams each K/V
        page once per kv head for the whole GQA group.  Keys are visited
        BLOCK_N tokens at a time (>= one page) with an online softmax in fp32.
        """
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        m_block = tl.program_id(2)

        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
        q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        first_pos = seq_len - q_len  # absolute position of local query 0

        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        q_local = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_valid = q_local < q_len
        q_pos = first_pos + q_local

        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        q_ptrs = (
            q_ptr
            + (q_start + q_local.to(tl.int64))[:, None] * stride_q_tok
            + head[:, None] * stride_q_head
            + offs_d[None, :]
        )
        q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        q = q.to(tl.float32)

        # Keys needed by this block: positions < kv_end (causal limit of its
        # last valid row); 0 when the block holds no valid row.
        n_rows = q_len * GROUP
        last_row = tl.minimum((m_block + 1) * BLOCK_M, n_rows) - 1
        kv_end = tl.where(m_block * BLOCK_M < n_rows, first_pos + last_row // GROUP + 1, 0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

        offs_n = tl.arange(0, BLOCK_N)
        pt_row = page_table_ptr + seq.to(tl.int64) * stride_pt_seq
        for start in range(0, kv_end, BLOCK_N):
            k_pos = start + offs_n
            k_valid = k_pos < kv_end
            page = tl.load(pt_row + k_pos // PAGE_TOKENS, mask=k_valid, other=0).to(tl.int64)
            slot = (
                page * stride_kv_page
                + (k_pos % PAGE_TOKENS).to(tl.int64) * stride_kv_tok
                + kv_head * stride_kv_head
            )
            kv_mask = k_valid[:, None] & d_valid[None, :]
            k_ptrs = kv_ptr + slot[:, None] + offs_d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            v = tl.load(k_ptrs + stride_kv_kind, mask=kv_mask, other=0.0).to(tl.float32)

            if DOT_IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale_log2
            allowed = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :] & row_valid[:, None]
            s = tl.where(allowed, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
            if DOT_IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p, v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = (
            out_ptr
            + (q_start + q_local.to(tl.int64))[:, None] * stride_o_tok
            + head[:, None] * stride_o_head
            + offs_d[None, :]
        )
        tl.store(
            o_ptrs,
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )


_JIT_CACHE: dict[bool, Any] = {}


def _jit_kernel() -> Any:
    """``triton.jit(_paged_attention_kernel)``, cached per interpreter mode."""
    mode = _interpret_mode()
    kernel = _JIT_CACHE.get(mode)
    if kernel is None:
        kernel = triton.jit(_paged_attention_kernel)
        _JIT_CACHE[mode] = kernel
    return kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def paged_attention_triton(
    q: Tensor,
    kv: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    *,
    max_q_len: int | None = None,
) -> Tensor:
    """Triton implementation of :func:`paged_attention` (one kernel launch).

    Grid ``(B, n_kv_heads, cdiv(max_q_len * group, BLOCK_M))``; the M axis
    enumerates (query, head within the GQA group) pairs.  Each program walks
    the sequence's keys up to the causal limit of its last query, BLOCK_N
    tokens at a time (BLOCK_N = max(16, T) rounded to a power of two, i.e. one
    page for T >= 16), with an fp32 online softmax.  Inputs are upcast to
    fp32 in-kernel.  If q or kv is fp32 the dots use IEEE fp32 (exact but
    without tensor cores); if both are fp16/bf16 they use the backend default
    (TF32 on NVIDIA: exact products of fp16/bf16 operands, the probabilities
    in P @ V rounded to 10 mantissa bits, as in other flash kernels).

    Args: as :func:`paged_attention`; ``max_q_len`` (tokens) is the largest
        ``q_len_b`` in the batch. Pass it from the scheduler to avoid a device
        sync; if ``None`` it is computed from ``query_start_loc``.

    Returns:
        ``[num_tokens, n_heads, head_dim]`` in ``q.dtype``.  Rows of ``q``
        not covered by ``query_start_loc`` are zero.

    Requirements: CUDA tensors (or CPU tensors with ``TRITON_INTERPRET=1``),
    ``q`` and ``kv`` with unit stride on ``head_dim``; arguments are not range
    checked (use the reference for validation-heavy debugging).
    """
    if not _HAVE_TRITON:
        raise RuntimeError("paged_attention_triton requires the 'triton' package")
    _validate(q, kv, page_table, seq_lens, query_start_loc)
    if not q.is_cuda and not _interpret_mode():
        raise ValueError(
            "paged_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        )
    num_tokens, n_heads, head_dim = q.shape
    page_tokens, n_kv_heads = kv.shape[2], kv.shape[3]
    group = n_heads // n_kv_heads
    batch = seq_lens.shape[0]

    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv.stride(-1) != 1:
        raise ValueError("kv must have unit stride on head_dim (expected a contiguous pool)")
    if page_table.stride(-1) != 1:
        page_table = page_table.contiguous()

    # zeros: rows not covered by query_start_loc (e.g. CUDA-graph padding)
    # come back as 0, as in the reference.
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0:
        return out
    if max_q_len is None:
        max_q_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if max_q_len <= 0:
        return out

    rows = max_q_len * group
    block_m = min(64, max(16, _next_pow2(rows)))
    block_n = max(16, _next_pow2(page_tokens))
    block_d = max(16, _next_pow2(head_dim))
    grid = (batch, n_kv_heads, triton.cdiv(rows, block_m))
    _jit_kernel()[grid](
        q,
        kv,
        out,
        page_table,
        seq_lens,
        query_start_loc,
        float(scale) * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        kv.stride(3),
        page_table.stride(0),
        HEAD_DIM=head_dim,
        PAGE_TOKENS=page_tokens,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_IEEE=(q.dtype == torch.float32 or kv.dtype == torch.float32),
        num_warps=4,
    )
    return out


# --------------------------------------------------------------------------
# Dispatcher and KV writes
# --------------------------------------------------------------------------


def plan_paged_attention(
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    *,
    n_heads: int,
    kv_shape: tuple[int, ...],
    use_triton: bool | None = None,
) -> RefAttentionPlan | None:
    """The plan to pass to every layer's :func:`paged_attention` call of one batch.

    The reference path gets a :class:`RefAttentionPlan` (its gather indices and masks, built
    once instead of once per layer); the Triton path needs none and gets None. Arguments as in
    :func:`plan_paged_attention_ref`; ``use_triton`` as in :func:`paged_attention`.
    """
    if resolve_use_triton("paged_attention", page_table.device, use_triton):
        return None
    return plan_paged_attention_ref(
        page_table, seq_lens, query_start_loc, n_heads=n_heads, kv_shape=kv_shape
    )


def paged_attention(
    q: Tensor,
    kv: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    *,
    use_triton: bool | None = None,
    max_q_len: int | None = None,
    plan: RefAttentionPlan | None = None,
) -> Tensor:
    """Causal varlen attention of new query tokens over paged K/V.

    Serves prefill, chunked prefill and decode in one call.  Local query ``j``
    of sequence ``b`` (``q_len_b = query_start_loc[b+1] - query_start_loc[b]``)
    sits at absolute position ``seq_lens[b] - q_len_b + j`` and attends to the
    keys at positions ``0..that position`` inclusive, read through
    ``page_table[b]``.  Output row = ``softmax(scale * q . k) @ v`` accumulated
    in fp32.

    Args:
        q: ``[num_tokens, n_heads, head_dim]`` queries of all sequences,
            concatenated in sequence order (fp32/fp16/bf16).
        kv: ``[num_pages, 2, T, n_kv_heads, head_dim]`` page pool of this layer
            (``kv[:, 0]`` K, ``kv[:, 1]`` V); the new tokens' K/V must already
            be written (see :func:`write_kv`).
        page_table: ``[B, max_pages]`` int32 page ids; padding entries must be
            valid page ids (e.g. 0).
        seq_lens: ``[B]`` int32 context lengths in tokens, incl. new tokens.
        query_start_loc: ``[B + 1]`` int32 cumulative query offsets into ``q``.
        scale: softmax scale (typically ``head_dim ** -0.5``).
        use_triton: ``None`` picks Triton for CUDA tensors and the torch
            reference otherwise; ``True`` forces Triton (CUDA tensors, or CPU
            tensors with ``TRITON_INTERPRET=1``); ``False`` forces the reference.
        max_q_len: optional host-side ``max_b q_len_b`` (avoids a sync).
        plan: the reference path's plan for this batch from :func:`plan_paged_attention`
            (optional; ignored by the Triton path).

    Returns:
        ``[num_tokens, n_heads, head_dim]`` in ``q.dtype``.
    """
    if resolve_use_triton("paged_attention", q.device, use_triton):
        return paged_attention_triton(
            q, kv, page_table, seq_lens, query_start_loc, scale, max_q_len=max_q_len
        )
    return paged_attention_ref(q, kv, page_table, seq_lens, query_start_loc, scale, plan=plan)


def write_kv(kv: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store new keys/values into the page pool in place.

    Token ``i`` goes to flat slot ``s = slot_mapping[i] = page_id * T + offset``:
    ``kv[s // T, 0, s % T] = k[i]`` and ``kv[s // T, 1, s % T] = v[i]``.

    Args:
        kv: ``[num_pages, 2, T, n_kv_heads, head_dim]`` pool (updated); contiguous
            is the fast path, a strided per-layer view also works.
        k: ``[num_tokens, n_kv_heads, head_dim]`` new keys (cast to ``kv.dtype``).
        v: ``[num_tokens, n_kv_heads, head_dim]`` new values (cast to ``kv.dtype``).
        slot_mapping: ``[num_tokens]`` int64 (or int32) flat slots; must be in
            ``[0, num_pages * T)`` and distinct (duplicates: unspecified winner).

    Works on any device with plain torch index ops (one ``index_copy_`` for a
    contiguous pool).
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(
            "kv must be [num_pages, 2, page_tokens, n_kv_heads, head_dim], "
            f"got shape {tuple(kv.shape)}"
        )
    num_pages, _, page_tokens, n_kv_heads, head_dim = kv.shape
    if slot_mapping.dim() != 1:
        raise ValueError(
            f"slot_mapping must be [num_tokens], got shape {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.dtype not in _INDEX_DTYPES:
        raise ValueError(f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    expected = (slot_mapping.shape[0], n_kv_heads, head_dim)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must be [num_tokens, n_kv_heads, head_dim] = {expected}, "
                f"got {tuple(t.shape)}"
            )
        if t.device != kv.device:
            raise ValueError(f"{name} is on {t.device} but kv is on {kv.device}")
    if slot_mapping.device != kv.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but kv is on {kv.device}")
    if slot_mapping.numel() == 0:
        return
    slots = slot_mapping.long()
    page, offset = slots // page_tokens, slots % page_tokens
    if not kv.is_contiguous():
        kv[page, 0, offset] = k.to(kv.dtype)
        kv[page, 1, offset] = v.to(kv.dtype)
        return
    # Flat row index over [num_pages, 2, T]: page * 2T + kind * T + offset.
    k_rows = page * (2 * page_tokens) + offset
    flat = kv.view(num_pages * 2 * page_tokens, n_kv_heads, head_dim)
    flat.index_copy_(
        0,
        torch.cat([k_rows, k_rows + page_tokens]),
        torch.cat([k.to(kv.dtype), v.to(kv.dtype)]),
    )
