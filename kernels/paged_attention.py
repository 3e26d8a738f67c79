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
(the plain torch reference, per sequence), :func:`paged_attention_triton`
(one Triton kernel, the CUDA path; also runs under ``TRITON_INTERPRET=1`` on
CPU tensors for tests), :func:`batch_lengths` (the complete check of a batch
description) and :func:`write_kv`. The engine's tuned CPU path lives in
``inference/backends/cpu/attention.py`` and is tested against the reference.
"""

from __future__ import annotations

import math
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
    "batch_lengths",
    "write_kv",
    "triton_available",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)

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


def validate_operands(q: Tensor, kv: Tensor) -> None:
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
    validate_operands(q, kv)
    _validate_batch(page_table, seq_lens, query_start_loc)
    if page_table.device != q.device:
        raise ValueError(f"page_table is on {page_table.device} but q is on {q.device}")


# --------------------------------------------------------------------------
# Torch reference (CPU path)
# --------------------------------------------------------------------------

def batch_lengths(
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    *,
    n_heads: int,
    kv_shape: tuple[int, ...],
) -> tuple[list[int], list[int]]:
    """Check a batch description completely and return ``(query_start_loc, seq_lens)`` as host
    lists (one sync each when they live on a GPU). ValueError names the first problem."""
    _validate_batch(page_table, seq_lens, query_start_loc)
    _validate_kv_shape(tuple(kv_shape))
    page_tokens, n_kv_heads = int(kv_shape[2]), int(kv_shape[3])
    _validate_heads(n_heads, n_kv_heads)
    qsl, ctx_lens = query_start_loc.tolist(), seq_lens.tolist()
    if ctx_lens and qsl[0] < 0:
        raise ValueError(f"query_start_loc must start at >= 0, got {qsl[0]}")
    for b, ctx in enumerate(ctx_lens):
        q_len = qsl[b + 1] - qsl[b]
        if q_len < 0:
            raise ValueError(f"query_start_loc must be non-decreasing (sequence {b})")
        if ctx < q_len:
            raise ValueError(f"seq_lens[{b}] = {ctx} is smaller than its query length {q_len}")
    pages = -(-max(ctx_lens, default=0) // page_tokens)
    if pages > page_table.shape[1]:
        raise ValueError(
            f"a context of {max(ctx_lens)} tokens needs {pages} pages "
            f"but page_table has only {page_table.shape[1]} columns"
        )
    return qsl, ctx_lens


def paged_attention_ref(
    q: Tensor,
    kv: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    *,
    max_q_len: int | None = None,
) -> Tensor:
    """Torch reference of :func:`paged_attention`: per sequence, read its keys and values
    through the page table and run causal softmax attention in float32. Plain and slow on
    purpose (the engine's CPU path is ``inference.backends.cpu.attention``, tested against this).

    Args: as :func:`paged_attention` (``max_q_len`` is unused).

    Returns:
        ``[num_tokens, n_heads, head_dim]`` in ``q.dtype``; rows of ``q`` not covered by
        ``query_start_loc`` are zero.
    """
    del max_q_len
    validate_operands(q, kv)
    if page_table.device != q.device:
        raise ValueError(f"page_table is on {page_table.device} but q is on {q.device}")
    qsl, ctx_lens = batch_lengths(
        page_table, seq_lens, query_start_loc, n_heads=q.shape[1], kv_shape=tuple(kv.shape)
    )
    if qsl and qsl[-1] > q.shape[0]:
        raise ValueError(f"query_start_loc spans {qsl[-1]} queries but q has {q.shape[0]} tokens")
    page_tokens, group = kv.shape[2], q.shape[1] // kv.shape[3]
    out = torch.zeros_like(q)
    for b, ctx in enumerate(ctx_lens):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        pos = torch.arange(ctx, device=q.device)
        pages = page_table[b].long()[pos // page_tokens]
        k = kv[pages, 0, pos % page_tokens].float().repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = kv[pages, 1, pos % page_tokens].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
        q_pos = torch.arange(ctx - (q1 - q0), ctx, device=q.device)
        scores.masked_fill_(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
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
    # Triton's own combiners (private names; the interpreter maps them to numpy reductions).
    # Other Triton versions may lack them: then plain jitted combiners, which compiled kernels
    # accept (the interpreter tests run with the versions pinned here).
    _max_combine = getattr(getattr(tl, "standard", None), "_elementwise_max", None)
    _sum_combine = getattr(getattr(tl, "standard", None), "_sum_combine", None)
    if _max_combine is None:  # pragma: no cover - other triton versions

        @triton.jit
        def _max_combine(a, b):
            return tl.maximum(a, b)

    if _sum_combine is None:  # pragma: no cover - other triton versions

        @triton.jit
        def _sum_combine(a, b):
            return a + b

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
    """``triton.jit(_paged_attention_kernel)``, cached per interpreter mode. ``stride_pt_seq``
    (the page table's width: the step's longest context in pages) changes from step to step, so it
    is not specialised (a new value class would otherwise compile inside the serving loop)."""
    mode = _interpret_mode()
    kernel = _JIT_CACHE.get(mode)
    if kernel is None:
        kernel = triton.jit(_paged_attention_kernel, do_not_specialize=["stride_pt_seq"])
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

    Returns:
        ``[num_tokens, n_heads, head_dim]`` in ``q.dtype``.
    """
    if resolve_use_triton("paged_attention", q.device, use_triton):
        return paged_attention_triton(
            q, kv, page_table, seq_lens, query_start_loc, scale, max_q_len=max_q_len
        )
    return paged_attention_ref(q, kv, page_table, seq_lens, query_start_loc, scale)


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
