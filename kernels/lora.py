"""Multi-LoRA shrink / expand ops over the unified page pool (S-LoRA style).

Adapter weights live in the same page pool as the KV cache.  For one layer the
pool is ``pool_layer: [num_pages, P]``; an adapter resident in slot ``s`` owns
the pages ``adapter_pages[s, :]`` (any order, padded), which form a *virtual*
buffer: virtual element ``e`` lives at
``pool_layer[adapter_pages[s, e // P], e % P]``.  Per target module the buffer
holds

* ``A``  ``[r, in_features]``  row-major at virtual offset ``a_offset[s]``
* ``Bt`` ``[r, out_features]`` row-major at virtual offset ``b_offset[s]``
  (``Bt = B.T`` where PEFT's ``B`` is ``[out_features, r]``).

Rows are not page aligned: every element is addressed through the page table.

For each token row ``t`` with slot ``s >= 0`` (``-1`` = no adapter)::

    shrink:  y[t, :r_s]  = x[t] @ A_s.T                       (y fp32, y[t, r_s:] = 0)
    expand:  out[t]     += scaling[s] * (y[t, :r_s] @ Bt_s)   (in place)

i.e. ``out[i] += (x[i] @ A[idx[i]].T) @ B[idx[i]].T * scale[idx[i]]``.

A slot whose adapter lacks the module has ``ranks[s] == 0`` and is a no-op
(its offsets are never read).  Two launch shapes are provided:

* decode  (``row_slot: [T]``): one GEMV per row (S-LoRA's MBGMV);
* prefill (``seg_start: [G+1]``, ``seg_slot: [G]``): rows
  ``seg_start[g] .. seg_start[g+1]-1`` use ``seg_slot[g]``; rows are tiled by
  ``BLOCK_M`` inside a segment so each A / Bt tile is reused across the rows of
  the segment (MBGMM, ``tl.dot``).

``lora_shrink`` / ``lora_expand`` dispatch to Triton for CUDA tensors and to the
torch reference ops (``lora_shrink_ref`` / ``lora_expand_ref``) otherwise.
Triton on CPU tensors is possible with ``TRITON_INTERPRET=1`` (tests).  The
kernels avoid triton's @jit library helpers and are jitted lazily per
interpreter mode, so the variable only has to be set when a kernel runs (it
may be set after triton was imported).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from kernels.triton_support import HAVE_TRITON as _HAVE_TRITON
from kernels.triton_support import interpret_mode as _interpret
from kernels.triton_support import resolve_use_triton, tl, triton, triton_available

__all__ = [
    "lora_shrink",
    "lora_expand",
    "lora_shrink_ref",
    "lora_expand_ref",
    "gather_virtual",
    "scatter_virtual",
    "triton_available",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------- #
# virtual buffer helpers
# --------------------------------------------------------------------------- #
def _check_pool(pool_layer: Tensor) -> None:
    if not isinstance(pool_layer, Tensor) or pool_layer.dim() != 2:
        raise ValueError(
            f"pool_layer must be a 2-D tensor [num_pages, page_size], got "
            f"{tuple(pool_layer.shape) if isinstance(pool_layer, Tensor) else type(pool_layer)}"
        )


def _page_span(pool_layer: Tensor, pages: Tensor, offset: int, numel: int, what: str):
    """Validate a virtual range and return (first page index, page ids as int64)."""
    _check_pool(pool_layer)
    if pages.dim() != 1 or pages.dtype not in _INT_DTYPES:
        raise ValueError(f"{what}: pages must be a 1-D int32/int64 tensor, got "
                         f"shape {tuple(pages.shape)} dtype {pages.dtype}")
    if offset < 0:
        raise ValueError(f"{what}: offset must be >= 0, got {offset}")
    page_size = pool_layer.shape[1]
    p0 = offset // page_size
    p1 = (offset + numel - 1) // page_size
    if p1 >= pages.numel():
        raise ValueError(
            f"{what}: virtual range [{offset}, {offset + numel}) needs {p1 + 1} pages "
            f"of {page_size} elements but only {pages.numel()} pages are given")
    ids = pages[p0:p1 + 1].to(device=pool_layer.device, dtype=torch.long)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= pool_layer.shape[0]:
        raise ValueError(f"{what}: page ids must lie in [0, {pool_layer.shape[0]}), "
                         f"got range [{lo}, {hi}] for virtual range [{offset}, {offset + numel})")
    return p0, ids


def gather_virtual(pool_layer: Tensor, pages: Tensor, offset: int, numel: int) -> Tensor:
    """Read ``numel`` elements of a virtual buffer starting at ``offset``.

    Returns a new 1-D tensor (pool dtype, pool device) with
    ``out[i] = pool_layer[pages[(offset + i) // P], (offset + i) % P]``.
    ``pages`` is the 1-D page list of one adapter (e.g. ``adapter_pages[s]``).
    """
    offset, numel = int(offset), int(numel)
    if numel < 0:
        raise ValueError(f"gather_virtual: numel must be >= 0, got {numel}")
    if numel == 0:
        return pool_layer.new_empty(0)
    p0, ids = _page_span(pool_layer, pages, offset, numel, "gather_virtual")
    start = offset - p0 * pool_layer.shape[1]
    return pool_layer.index_select(0, ids).reshape(-1)[start:start + numel]


def scatter_virtual(pool_layer: Tensor, pages: Tensor, offset: int, values: Tensor) -> None:
    """Write ``values`` (flattened, cast to the pool dtype) into a virtual buffer.

    In place: ``pool_layer[pages[(offset + i) // P], (offset + i) % P] = values.flatten()[i]``.
    Used to page an adapter in; only the addressed elements are touched.
    """
    offset = int(offset)
    flat = values.reshape(-1)
    numel = flat.numel()
    if numel == 0:
        return
    p0, ids = _page_span(pool_layer, pages, offset, numel, "scatter_virtual")
    page_size = pool_layer.shape[1]
    e = torch.arange(numel, device=pool_layer.device, dtype=torch.long) + (offset - p0 * page_size)
    pool_layer[ids[e // page_size], e % page_size] = flat.to(device=pool_layer.device,
                                                             dtype=pool_layer.dtype)


# --------------------------------------------------------------------------- #
# argument validation (cheap: shapes / dtypes / devices only, no device syncs)
# --------------------------------------------------------------------------- #
def _check_vec(name: str, t, length: int, dtypes, device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")


def _check_common(op: str, T: int, pool_layer, adapter_pages, offsets, off_name, ranks,
                  row_slot, seg_start, seg_slot, device) -> int:
    """Validate shared arguments; returns the number of slots S."""
    _check_pool(pool_layer)
    if pool_layer.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: pool_layer dtype must be fp16/bf16/fp32, got {pool_layer.dtype}")
    if not isinstance(adapter_pages, Tensor) or adapter_pages.dim() != 2 \
            or adapter_pages.dtype not in _INT_DTYPES:
        raise ValueError(f"{op}: adapter_pages must be a 2-D int32/int64 tensor [S, max_pages]")
    S = adapter_pages.shape[0]
    _check_vec(f"{op}: ranks", ranks, S, _INT_DTYPES, None)
    _check_vec(f"{op}: {off_name}", offsets, S, _INT_DTYPES, None)
    if device is not None:
        for name, t in (("pool_layer", pool_layer), ("adapter_pages", adapter_pages),
                        ("ranks", ranks), (off_name, offsets)):
            if t.device != device:
                raise ValueError(f"{op}: {name} is on {t.device} but the activations are on {device}")
    if row_slot is not None:
        if seg_start is not None or seg_slot is not None:
            raise ValueError(f"{op}: give either row_slot (decode) or seg_start+seg_slot "
                             f"(prefill), not both")
        _check_vec(f"{op}: row_slot", row_slot, T, _INT_DTYPES, device)
    else:
        if seg_start is None or seg_slot is None:
            raise ValueError(f"{op}: give row_slot (decode) or both seg_start and seg_slot (prefill)")
        if seg_slot.dim() != 1:
            raise ValueError(f"{op}: seg_slot must be 1-D [G], got {tuple(seg_slot.shape)}")
        G = seg_slot.shape[0]
        _check_vec(f"{op}: seg_slot", seg_slot, G, _INT_DTYPES, device)
        _check_vec(f"{op}: seg_start", seg_start, G + 1, _INT_DTYPES, device)
    return S


def _row_slots(T: int, row_slot, seg_start, seg_slot, device) -> Tensor:
    """Per-row slot ids (int64, -1 = none) for the reference ops."""
    if row_slot is not None:
        return row_slot.to(device=device, dtype=torch.long)
    rs = torch.full((T,), -1, dtype=torch.long, device=device)
    starts = seg_start.to(device=device, dtype=torch.long)
    if seg_slot.numel() == 0:
        return rs
    lo, hi = int(starts[0]), int(starts[-1])
    lens = starts[1:] - starts[:-1]
    if lo < 0 or hi > T or bool((lens < 0).any()):
        raise ValueError(f"seg_start must be non-decreasing within [0, {T}], got {starts.tolist()}")
    rs[lo:hi] = torch.repeat_interleave(seg_slot.to(device=device, dtype=torch.long), lens)
    return rs


def _groups(rs: Tensor):
    """Yield (slot, row indices) for every slot >= 0 present in ``rs``."""
    if rs.numel() == 0:
        return
    sorted_slots, order = torch.sort(rs, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    for s, idx in zip(uniq.tolist(), torch.split(order, counts.tolist())):
        if s >= 0:
            yield s, idx


# --------------------------------------------------------------------------- #
# reference ops (torch; the CPU engine path)
# --------------------------------------------------------------------------- #
def lora_shrink_ref(x: Tensor, pool_layer: Tensor, adapter_pages: Tensor, a_offset: Tensor,
                    ranks: Tensor, max_rank: int, *, row_slot: Optional[Tensor] = None,
                    seg_start: Optional[Tensor] = None, seg_slot: Optional[Tensor] = None,
                    use_triton=None, max_seg_len: Optional[int] = None) -> Tensor:
    """Reference shrink: ``y[t, :r_s] = x[t] @ A_s.T`` (fp32), see :func:`lora_shrink`.

    Groups rows by slot, gathers each slot's ``A`` once through the page table
    and does one matmul per slot.  ``use_triton`` / ``max_seg_len`` are accepted
    for signature compatibility and ignored.
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError("lora_shrink_ref: x must be a 2-D tensor [T, in_features]")
    T, IN = x.shape
    max_rank = _check_max_rank("lora_shrink_ref", max_rank)
    S = _check_common("lora_shrink_ref", T, pool_layer, adapter_pages, a_offset, "a_offset",
                      ranks, row_slot, seg_start, seg_slot, None)
    y = torch.zeros((T, max_rank), dtype=torch.float32, device=x.device)
    if T == 0 or S == 0:
        return y
    rs = _row_slots(T, row_slot, seg_start, seg_slot, x.device)
    ranks_l, offs_l = ranks.tolist(), a_offset.tolist()
    for s, idx in _groups(rs):
        if s >= S:
            raise ValueError(f"lora_shrink_ref: slot {s} out of range for {S} slots")
        r = min(int(ranks_l[s]), max_rank)
        if r <= 0:
            continue
        A = gather_virtual(pool_layer, adapter_pages[s], offs_l[s], r * IN)
        A = A.to(device=x.device, dtype=torch.float32).view(r, IN)
        y[idx, :r] = x[idx].to(torch.float32) @ A.t()
    return y


def lora_expand_ref(out: Tensor, y: Tensor, pool_layer: Tensor, adapter_pages: Tensor,
                    b_offset: Tensor, ranks: Tensor, scaling: Tensor, *,
                    row_slot: Optional[Tensor] = None, seg_start: Optional[Tensor] = None,
                    seg_slot: Optional[Tensor] = None, use_triton=None,
                    max_seg_len: Optional[int] = None) -> None:
    """Reference expand: ``out[t] += scaling[s] * (y[t, :r_s] @ Bt_s)`` in place.

    Accumulates in fp32 and rounds once to ``out.dtype``.  ``use_triton`` /
    ``max_seg_len`` are accepted for signature compatibility and ignored.
    """
    T, OUT, R = _check_expand_shapes("lora_expand_ref", out, y)
    S = _check_common("lora_expand_ref", T, pool_layer, adapter_pages, b_offset, "b_offset",
                      ranks, row_slot, seg_start, seg_slot, None)
    _check_vec("lora_expand_ref: scaling", scaling, S, _FLOAT_DTYPES, None)
    if T == 0 or S == 0 or OUT == 0:
        return
    rs = _row_slots(T, row_slot, seg_start, seg_slot, out.device)
    ranks_l, offs_l, scal_l = ranks.tolist(), b_offset.tolist(), scaling.tolist()
    for s, idx in _groups(rs):
        if s >= S:
            raise ValueError(f"lora_expand_ref: slot {s} out of range for {S} slots")
        r = min(int(ranks_l[s]), R)
        if r <= 0:
            continue
        Bt = gather_virtual(pool_layer, adapter_pages[s], offs_l[s], r * OUT)
        Bt = Bt.to(device=out.device, dtype=torch.float32).view(r, OUT)
        delta = (y[idx, :r].to(torch.float32) @ Bt) * float(scal_l[s])
        out[idx] = (out[idx].to(torch.float32) + delta).to(out.dtype)


def _check_max_rank(op: str, max_rank) -> int:
    try:
        mr = int(max_rank)
    except Exception:
        raise ValueError(f"{op}: max_rank must be an int, got {max_rank!r}") from None
    if mr < 1:
        raise ValueError(f"{op}: max_rank must be >= 1, got {mr}")
    return mr


def _check_expand_shapes(op: str, out, y):
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(f"{op}: out must be a 2-D tensor [T, out_features]")
    if out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: out dtype must be fp16/bf16/fp32, got {out.dtype}")
    if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != out.shape[0]:
        raise ValueError(f"{op}: y must be a 2-D tensor [T, max_rank] with T == out.shape[0] "
                         f"({out.shape[0]}), got {tuple(y.shape) if isinstance(y, Tensor) else type(y)}")
    if y.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: y dtype must be a float type, got {y.dtype}")
    if y.device != out.device:
        raise ValueError(f"{op}: y is on {y.device} but out is on {out.device}")
    return out.shape[0], out.shape[1], y.shape[1]


# --------------------------------------------------------------------------- #
# Triton kernels (plain functions, jitted lazily by _jit)
#
# Triton decides interpreter vs. compiler for every @jit function when it is
# decorated, including its own library helpers (tl.zeros, tl.sum, ...), which
# are decorated when triton is first imported.  To keep TRITON_INTERPRET=1
# usable no matter when triton was imported, the kernels below use only
# builtins (tl.full instead of tl.zeros, tl.reduce with triton's own add
# combiner instead of tl.sum -- the interpreter maps that combiner to np.sum)
# and are themselves jitted on first use, per interpreter mode.
# --------------------------------------------------------------------------- #
if _HAVE_TRITON:
    _sum_combine = getattr(getattr(tl, "standard", None), "_sum_combine", None)
    if _sum_combine is None:  # pragma: no cover - other triton versions

        @triton.jit
        def _sum_combine(a, b):
            return a + b

def _shrink_decode_kernel(
    x_ptr, y_ptr, pool_ptr, pages_ptr, off_ptr, ranks_ptr, slot_ptr,
    IN, max_rank,
    stride_xm, stride_xk, stride_ym, stride_yr,
    stride_pool_p, stride_pool_e, stride_pages_s, stride_pages_p,
    PAGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program: one row t, ranks [rt*BLOCK_R, (rt+1)*BLOCK_R) -- a GEMV
    t = tl.program_id(0)
    rt = tl.program_id(1)
    s = tl.load(slot_ptr + t)
    if s < 0:
        return
    r = tl.minimum(tl.load(ranks_ptr + s).to(tl.int32), max_rank)
    r0 = rt * BLOCK_R
    if r0 >= r:
        return
    base = tl.load(off_ptr + s).to(tl.int64)
    page_row = pages_ptr + s.to(tl.int64) * stride_pages_s
    x_row = x_ptr + t.to(tl.int64) * stride_xm
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    row_base = base + offs_r.to(tl.int64) * IN  # virtual offset of A[j, 0]
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < IN
        xv = tl.load(x_row + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        e = row_base[:, None] + offs_k[None, :]
        m = mask_r[:, None] & mask_k[None, :]
        pg = tl.load(page_row + (e // PAGE) * stride_pages_p, mask=m, other=0).to(tl.int64)
        a = tl.load(pool_ptr + pg * stride_pool_p + (e % PAGE) * stride_pool_e,
                    mask=m, other=0.0).to(tl.float32)
        acc += tl.reduce(a * xv[None, :], 1, _sum_combine)
    tl.store(y_ptr + t.to(tl.int64) * stride_ym + offs_r * stride_yr, acc, mask=mask_r)


def _shrink_prefill_kernel(
    x_ptr, y_ptr, pool_ptr, pages_ptr, off_ptr, ranks_ptr, seg_start_ptr, seg_slot_ptr,
    IN, max_rank,
    stride_xm, stride_xk, stride_ym, stride_yr,
    stride_pool_p, stride_pool_e, stride_pages_s, stride_pages_p,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    CAST_MODE: tl.constexpr,
):
    # one program: segment g, rows tile mt, ranks tile rt -- a small GEMM whose
    # A tile is shared by the BLOCK_M rows of the segment.
    g = tl.program_id(0)
    mt = tl.program_id(1)
    rt = tl.program_id(2)
    s = tl.load(seg_slot_ptr + g)
    if s < 0:
        return
    r = tl.minimum(tl.load(ranks_ptr + s).to(tl.int32), max_rank)
    r0 = rt * BLOCK_R
    if r0 >= r:
        return
    row_lo = tl.load(seg_start_ptr + g).to(tl.int32)
    row_hi = tl.load(seg_start_ptr + g + 1).to(tl.int32)
    m0 = row_lo + mt * BLOCK_M
    if m0 >= row_hi:
        return
    base = tl.load(off_ptr + s).to(tl.int64)
    page_row = pages_ptr + s.to(tl.int64) * stride_pages_s
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_hi
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    col_base = base + offs_r.to(tl.int64) * IN  # virtual offset of A[j, 0]
    acc = tl.full([BLOCK_M, BLOCK_R], 0.0, tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < IN
        xt = tl.load(x_rows[:, None] + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        # A^T tile [BLOCK_K, BLOCK_R]
        e = col_base[None, :] + offs_k[:, None]
        m = mask_k[:, None] & mask_r[None, :]
        pg = tl.load(page_row + (e // PAGE) * stride_pages_p, mask=m, other=0).to(tl.int64)
        at = tl.load(pool_ptr + pg * stride_pool_p + (e % PAGE) * stride_pool_e,
                     mask=m, other=0.0).to(tl.float32)
        if CAST_MODE == 1:
            acc += tl.dot(xt.to(tl.float16), at.to(tl.float16))
        elif CAST_MODE == 2:
            acc += tl.dot(xt.to(tl.bfloat16), at.to(tl.bfloat16))
        else:
            acc += tl.dot(xt, at, input_precision="ieee")
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_r[None, :] * stride_yr
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


def _expand_decode_kernel(
    out_ptr, y_ptr, pool_ptr, pages_ptr, off_ptr, ranks_ptr, scaling_ptr, slot_ptr,
    OUT, max_rank,
    stride_om, stride_on, stride_ym, stride_yr,
    stride_pool_p, stride_pool_e, stride_pages_s, stride_pages_p,
    PAGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one program: one row t, output columns tile nt -- a GEMV
    t = tl.program_id(0)
    nt = tl.program_id(1)
    s = tl.load(slot_ptr + t)
    if s < 0:
        return
    r = tl.minimum(tl.load(ranks_ptr + s).to(tl.int32), max_rank)
    if r <= 0:
        return
    base = tl.load(off_ptr + s).to(tl.int64)
    scale = tl.load(scaling_ptr + s).to(tl.float32)
    page_row = pages_ptr + s.to(tl.int64) * stride_pages_s
    y_row = y_ptr + t.to(tl.int64) * stride_ym
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < OUT
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for j0 in range(0, r, BLOCK_R):
        offs_r = j0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r
        yv = tl.load(y_row + offs_r * stride_yr, mask=mask_r, other=0.0).to(tl.float32)
        e = base + offs_r.to(tl.int64)[:, None] * OUT + offs_n[None, :]
        m = mask_r[:, None] & mask_n[None, :]
        pg = tl.load(page_row + (e // PAGE) * stride_pages_p, mask=m, other=0).to(tl.int64)
        b = tl.load(pool_ptr + pg * stride_pool_p + (e % PAGE) * stride_pool_e,
                    mask=m, other=0.0).to(tl.float32)
        acc += tl.reduce(yv[:, None] * b, 0, _sum_combine)
    o_ptrs = out_ptr + t.to(tl.int64) * stride_om + offs_n * stride_on
    o = tl.load(o_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (o + scale * acc).to(out_ptr.dtype.element_ty), mask=mask_n)


def _expand_prefill_kernel(
    out_ptr, y_ptr, pool_ptr, pages_ptr, off_ptr, ranks_ptr, scaling_ptr,
    seg_start_ptr, seg_slot_ptr,
    OUT, max_rank,
    stride_om, stride_on, stride_ym, stride_yr,
    stride_pool_p, stride_pool_e, stride_pages_s, stride_pages_p,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    CAST_MODE: tl.constexpr,
):
    # one program: segment g, rows tile mt, output columns tile nt -- a small GEMM
    g = tl.program_id(0)
    mt = tl.program_id(1)
    nt = tl.program_id(2)
    s = tl.load(seg_slot_ptr + g)
    if s < 0:
        return
    r = tl.minimum(tl.load(ranks_ptr + s).to(tl.int32), max_rank)
    if r <= 0:
        return
    row_lo = tl.load(seg_start_ptr + g).to(tl.int32)
    row_hi = tl.load(seg_start_ptr + g + 1).to(tl.int32)
    m0 = row_lo + mt * BLOCK_M
    if m0 >= row_hi:
        return
    base = tl.load(off_ptr + s).to(tl.int64)
    scale = tl.load(scaling_ptr + s).to(tl.float32)
    page_row = pages_ptr + s.to(tl.int64) * stride_pages_s
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_hi
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < OUT
    y_rows = y_ptr + offs_m.to(tl.int64) * stride_ym
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for j0 in range(0, r, BLOCK_R):
        offs_r = j0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r
        yt = tl.load(y_rows[:, None] + offs_r[None, :] * stride_yr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        # Bt tile [BLOCK_R, BLOCK_N]
        e = base + offs_r.to(tl.int64)[:, None] * OUT + offs_n[None, :]
        m = mask_r[:, None] & mask_n[None, :]
        pg = tl.load(page_row + (e // PAGE) * stride_pages_p, mask=m, other=0).to(tl.int64)
        bt = tl.load(pool_ptr + pg * stride_pool_p + (e % PAGE) * stride_pool_e,
                     mask=m, other=0.0).to(tl.float32)
        if CAST_MODE == 1:
            acc += tl.dot(yt.to(tl.float16), bt.to(tl.float16))
        elif CAST_MODE == 2:
            acc += tl.dot(yt.to(tl.bfloat16), bt.to(tl.bfloat16))
        else:
            acc += tl.dot(yt, bt, input_precision="ieee")
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    mo = mask_m[:, None] & mask_n[None, :]
    o = tl.load(o_ptrs, mask=mo, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (o + scale * acc).to(out_ptr.dtype.element_ty), mask=mo)


# --------------------------------------------------------------------------- #
# dispatch helpers
# --------------------------------------------------------------------------- #
_JIT_CACHE: dict = {}


def _jit(fn: Callable):
    """``triton.jit(fn)``, cached per (kernel, interpreter mode).

    Triton compiles a variant per value class of each integer argument (1, a multiple of 16,
    other). ``stride_pages_s`` is the width of the step's adapter page table, which changes from
    step to step with its widest adapter, so it is not specialised: otherwise a step with a wider
    adapter would compile inside the serving loop (the start-up warm-up cannot foresee widths)."""
    key = (fn.__name__, _interpret())
    k = _JIT_CACHE.get(key)
    if k is None:
        k = triton.jit(fn, do_not_specialize=["stride_pages_s"])
        _JIT_CACHE[key] = k
    return k


def _cast_mode(dtype: torch.dtype) -> int:
    """tl.dot operand precision for the prefill kernels: 0 fp32 (ieee), 1 fp16, 2 bf16.

    The interpreter always uses fp32 (its low-precision arithmetic is unreliable).
    """
    if _interpret():
        return 0
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _max_seg_len(seg_start: Tensor, max_seg_len: Optional[int]) -> int:
    if max_seg_len is not None:
        return int(max_seg_len)
    if seg_start.numel() < 2:
        return 0
    return int((seg_start[1:] - seg_start[:-1]).max())  # one host sync


def _block_m(max_len: int) -> int:
    return min(64, max(16, _np2(max_len)))


# --------------------------------------------------------------------------- #
# public ops
# --------------------------------------------------------------------------- #
def lora_shrink(x: Tensor, pool_layer: Tensor, adapter_pages: Tensor, a_offset: Tensor,
                ranks: Tensor, max_rank: int, *, row_slot: Optional[Tensor] = None,
                seg_start: Optional[Tensor] = None, seg_slot: Optional[Tensor] = None,
                use_triton: Optional[bool] = None, max_seg_len: Optional[int] = None) -> Tensor:
    """LoRA shrink over paged adapters: ``y[i, :r] = x[i] @ A[idx[i]].T``.

    Args:
        x: ``[T, in_features]`` activations (fp16/bf16/fp32).
        pool_layer: ``[num_pages, P]`` page pool of this layer.
        adapter_pages: ``[S, max_pages]`` int32 page ids per adapter slot.
        a_offset: ``[S]`` int64 virtual offset of this module's ``A [r, in_features]``.
        ranks: ``[S]`` int32 rank of this module per slot (0 = module absent: no-op).
        max_rank: width of ``y``; ranks above it are clamped.
        row_slot: decode variant, ``[T]`` int32 slot per row (-1 = no adapter).
        seg_start, seg_slot: prefill variant, ``[G+1]`` cumulative row offsets and
            ``[G]`` slot per segment (-1 = no adapter).  Rows outside every
            segment are treated as having no adapter.
        use_triton: None = Triton iff ``x.is_cuda``; True on CPU needs TRITON_INTERPRET=1.
        max_seg_len: optional host-side bound on segment lengths (prefill); when
            omitted it is computed from ``seg_start`` (one device sync).

    Returns:
        ``y``: ``[T, max_rank]`` fp32, ``y[i, r_s:] = 0`` and rows without an
        adapter (or with rank 0) are all zero.

    The Triton path checks shapes / dtypes / devices only (no device sync on
    the decode path); slot ids, ranks, offsets and page ids are trusted.
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError("lora_shrink: x must be a 2-D tensor [T, in_features]")
    if not resolve_use_triton("lora_shrink", x.device, use_triton):
        return lora_shrink_ref(x, pool_layer, adapter_pages, a_offset, ranks, max_rank,
                               row_slot=row_slot, seg_start=seg_start, seg_slot=seg_slot)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"lora_shrink: x dtype must be fp16/bf16/fp32, got {x.dtype}")
    T, IN = x.shape
    max_rank = _check_max_rank("lora_shrink", max_rank)
    S = _check_common("lora_shrink", T, pool_layer, adapter_pages, a_offset, "a_offset", ranks,
                      row_slot, seg_start, seg_slot, x.device)
    y = torch.zeros((T, max_rank), dtype=torch.float32, device=x.device)
    if T == 0 or S == 0 or IN == 0:
        return y
    P = pool_layer.shape[1]
    common = (IN, max_rank, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
              pool_layer.stride(0), pool_layer.stride(1),
              adapter_pages.stride(0), adapter_pages.stride(1))
    if row_slot is not None:
        BLOCK_R = min(_np2(max_rank), 16)
        BLOCK_K = min(max(16, _np2(IN)), 128)
        grid = (T, triton.cdiv(max_rank, BLOCK_R))
        _jit(_shrink_decode_kernel)[grid](
            x, y, pool_layer, adapter_pages, a_offset, ranks, row_slot, *common,
            PAGE=P, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    else:
        G = seg_slot.shape[0]
        max_len = _max_seg_len(seg_start, max_seg_len)
        if G == 0 or max_len <= 0:
            return y
        BLOCK_M = _block_m(max_len)
        BLOCK_R = min(max(16, _np2(max_rank)), 32)
        BLOCK_K = min(max(16, _np2(IN)), 64)
        grid = (G, triton.cdiv(max_len, BLOCK_M), triton.cdiv(max_rank, BLOCK_R))
        _jit(_shrink_prefill_kernel)[grid](
            x, y, pool_layer, adapter_pages, a_offset, ranks, seg_start, seg_slot, *common,
            PAGE=P, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
            CAST_MODE=_cast_mode(x.dtype))
    return y


def lora_expand(out: Tensor, y: Tensor, pool_layer: Tensor, adapter_pages: Tensor,
                b_offset: Tensor, ranks: Tensor, scaling: Tensor, *,
                row_slot: Optional[Tensor] = None, seg_start: Optional[Tensor] = None,
                seg_slot: Optional[Tensor] = None, use_triton: Optional[bool] = None,
                max_seg_len: Optional[int] = None) -> None:
    """LoRA expand over paged adapters, in place:
    ``out[i] += (y[i, :r] @ B[idx[i]].T) * scaling[idx[i]]`` with ``B.T = Bt``.

    Args:
        out: ``[T, out_features]`` (fp16/bf16/fp32), updated in place; rows
            without an adapter (slot -1 or rank 0) are left untouched.
        y: ``[T, max_rank]`` shrink output (fp32); columns ``>= r_s`` are ignored.
        pool_layer, adapter_pages, ranks, row_slot, seg_start, seg_slot,
        use_triton, max_seg_len: as for :func:`lora_shrink`.
        b_offset: ``[S]`` int64 virtual offset of this module's ``Bt [r, out_features]``.
        scaling: ``[S]`` float32 LoRA scaling (alpha / r) per slot.

    The sum is accumulated in fp32 and rounded once to ``out.dtype``.  Rows
    must belong to at most one segment (segments must not overlap).  The
    Triton path checks shapes / dtypes / devices only: slot ids, ranks, offsets
    and page ids are trusted (the reference ops check them).
    """
    T, OUT, R = _check_expand_shapes("lora_expand", out, y)
    if not resolve_use_triton("lora_expand", out.device, use_triton):
        lora_expand_ref(out, y, pool_layer, adapter_pages, b_offset, ranks, scaling,
                        row_slot=row_slot, seg_start=seg_start, seg_slot=seg_slot)
        return
    S = _check_common("lora_expand", T, pool_layer, adapter_pages, b_offset, "b_offset", ranks,
                      row_slot, seg_start, seg_slot, out.device)
    _check_vec("lora_expand: scaling", scaling, S, _FLOAT_DTYPES, out.device)
    if T == 0 or S == 0 or OUT == 0 or R == 0:
        return
    P = pool_layer.shape[1]
    common = (OUT, R, out.stride(0), out.stride(1), y.stride(0), y.stride(1),
              pool_layer.stride(0), pool_layer.stride(1),
              adapter_pages.stride(0), adapter_pages.stride(1))
    if row_slot is not None:
        BLOCK_R = min(_np2(R), 16)
        BLOCK_N = min(max(16, _np2(OUT)), 128)
        grid = (T, triton.cdiv(OUT, BLOCK_N))
        _jit(_expand_decode_kernel)[grid](
            out, y, pool_layer, adapter_pages, b_offset, ranks, scaling, row_slot, *common,
            PAGE=P, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N)
    else:
        G = seg_slot.shape[0]
        max_len = _max_seg_len(seg_start, max_seg_len)
        if G == 0 or max_len <= 0:
            return
        BLOCK_M = _block_m(max_len)
        BLOCK_R = min(max(16, _np2(R)), 32)
        BLOCK_N = min(max(16, _np2(OUT)), 64)
        grid = (G, triton.cdiv(max_len, BLOCK_M), triton.cdiv(OUT, BLOCK_N))
        _jit(_expand_prefill_kernel)[grid](
            out, y, pool_layer, adapter_pages, b_offset, ranks, scaling, seg_start, seg_slot,
            *common, PAGE=P, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
            CAST_MODE=_cast_mode(out.dtype))
