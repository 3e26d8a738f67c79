"""Tests for kernels.lora (multi-LoRA shrink / expand over the unified page pool).

Both the torch reference ops and the Triton kernels are compared against an
independent float64 computation built from dense per-adapter A / B matrices.
The Triton kernels run on CUDA when available, otherwise on CPU tensors under
the Triton interpreter (TRITON_INTERPRET=1: set below before triton's first
import when this module gets there first, and per test via monkeypatch; the
LoRA kernels are jitted lazily per interpreter mode and use no triton @jit
library helpers, so they also work when triton was imported earlier without
the variable).  Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:  # before the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.lora as lora
from kernels.lora import (
    gather_virtual,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    scatter_virtual,
)

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not lora._HAVE_TRITON,
                                  reason="triton is not importable; Triton LoRA kernels untested")


@pytest.fixture(autouse=True)
def _interpret_without_gpu(monkeypatch):
    """Without a GPU the Triton kernels run on CPU tensors under the interpreter."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

IMPLS = [
    pytest.param("ref", id="ref"),
    pytest.param("triton", id="triton", marks=needs_triton),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
VARIANTS = ["decode", "prefill"]

PAGE = 61          # not a multiple of in/out features: rows straddle page boundaries
IN_F, OUT_F = 48, 80
RANKS = [1, 16, 7, 0, 4]   # slot 3 lacks the module (rank 0); max rank 16
MAX_RANK = 16

DECODE_SLOTS = [0, 1, -1, 2, 3, 4, 1, 0, -1, 2, 4, 1, 1, 3]
# segments of different lengths: incl. length 1, an empty one, one spanning
# several BLOCK_M row tiles, one without adapter, a slot used twice
SEG_LENS = [3, 1, 0, 70, 5, 1, 2, 4]
SEG_SLOTS = [1, 0, 2, 4, -1, 3, 1, 2]


# ----------------------------------------------------------------------------
# An independent "world": dense adapters and a pool laid out by hand
# ----------------------------------------------------------------------------
@dataclass
class World:
    pool: torch.Tensor            # [num_pages, PAGE] (a layer view of a 3-D pool)
    adapter_pages: torch.Tensor   # [S, max_pages] int32, padded with -1
    a_offset: torch.Tensor        # [S] int64
    b_offset: torch.Tensor        # [S] int64
    ranks: torch.Tensor           # [S] int32
    scaling: torch.Tensor         # [S] fp32
    A: list                       # dense float64 A_s [r, in] (as stored, i.e. rounded)
    B: list                       # dense float64 B_s [out, r] (PEFT layout)


def _place(pool, page_ids, offset, flat):
    """Write ``flat`` element by element into the virtual buffer (test-side layout)."""
    P = pool.shape[1]
    for i, v in enumerate(flat.tolist()):
        e = offset + i
        pool[page_ids[e // P], e % P] = v


def make_world(in_f, out_f, ranks, dtype, seed, page=PAGE, device=DEVICE) -> World:
    g = torch.Generator().manual_seed(seed)
    S = len(ranks)
    layouts = []
    for s, r in enumerate(ranks):
        lead = int(torch.randint(0, 2 * page, (1,), generator=g))  # start mid-page
        gap = int(torch.randint(0, 5, (1,), generator=g))
        a_off, b_off = lead, lead + r * in_f + gap
        numel = b_off + r * out_f
        layouts.append((a_off, b_off, max(1, math.ceil(numel / page))))
    num_pages = sum(n for _, _, n in layouts) + 9  # a few pages owned by nobody
    # non-contiguous, shuffled page ids per adapter
    perm = torch.randperm(num_pages, generator=g).tolist()
    pool3 = torch.full((2, num_pages, page), float("nan"), dtype=dtype)  # NaN: stray reads show
    pool = pool3[1]
    max_pages = max(n for _, _, n in layouts)
    adapter_pages = torch.full((S, max_pages), -1, dtype=torch.int32)
    A_list, B_list, a_offs, b_offs = [], [], [], []
    cursor = 0
    for s, (r, (a_off, b_off, n)) in enumerate(zip(ranks, layouts)):
        ids = perm[cursor:cursor + n]
        cursor += n
        adapter_pages[s, :n] = torch.tensor(ids, dtype=torch.int32)
        A = (torch.randn(r, in_f, generator=g, dtype=torch.float64) / math.sqrt(in_f))
        B = (torch.randn(out_f, r, generator=g, dtype=torch.float64) / math.sqrt(max(r, 1)))
        A = A.to(dtype).to(torch.float64)
        B = B.to(dtype).to(torch.float64)
        if r > 0:
            _place(pool, ids, a_off, A.reshape(-1))
            _place(pool, ids, b_off, B.t().contiguous().reshape(-1))  # stored as Bt [r, out]
            a_offs.append(a_off)
            b_offs.append(b_off)
        else:  # module missing: offsets must never be read
            a_offs.append(-1)
            b_offs.append(-1)
        A_list.append(A)
        B_list.append(B)
    scaling = 0.5 + torch.rand(S, generator=g)
    return World(
        pool=pool.to(device),
        adapter_pages=adapter_pages.to(device),
        a_offset=torch.tensor(a_offs, dtype=torch.int64, device=device),
        b_offset=torch.tensor(b_offs, dtype=torch.int64, device=device),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        scaling=scaling.to(torch.float32).to(device),
        A=A_list,
        B=B_list,
    )


def routing(variant, device=DEVICE, decode_slots=DECODE_SLOTS, seg_lens=SEG_LENS,
            seg_slots=SEG_SLOTS):
    """(T, per-row slot list, kwargs for the op)."""
    if variant == "decode":
        rows = list(decode_slots)
        kw = dict(row_slot=torch.tensor(rows, dtype=torch.int32, device=device))
    else:
        rows = [s for n, s in zip(seg_lens, seg_slots) for _ in range(n)]
        starts = [0]
        for n in seg_lens:
            starts.append(starts[-1] + n)
        kw = dict(seg_start=torch.tensor(starts, dtype=torch.int32, device=device),
                  seg_slot=torch.tensor(seg_slots, dtype=torch.int32, device=device))
    return len(rows), rows, kw


def expected_shrink(w: World, x64, rows, max_rank):
    y = torch.zeros(len(rows), max_rank, dtype=torch.float64)
    for t, s in enumerate(rows):
        if s >= 0 and w.A[s].shape[0] > 0:
            r = w.A[s].shape[0]
            y[t, :r] = x64[t] @ w.A[s].t()
    return y


def expected_expand(w: World, out64, y64, rows):
    out = out64.clone()
    for t, s in enumerate(rows):
        if s >= 0 and w.B[s].shape[1] > 0:
            r = w.B[s].shape[1]
            out[t] += float(w.scaling[s]) * (y64[t, :r] @ w.B[s].t())
    return out


def run_shrink(impl, x, w: World, max_rank, kw):
    if impl == "ref":
        return lora_shrink_ref(x, w.pool, w.adapter_pages, w.a_offset, w.ranks, max_rank, **kw)
    return lora_shrink(x, w.pool, w.adapter_pages, w.a_offset, w.ranks, max_rank,
                       use_triton=True, **kw)


def run_expand(impl, out, y, w: World, kw):
    if impl == "ref":
        lora_expand_ref(out, y, w.pool, w.adapter_pages, w.b_offset, w.ranks, w.scaling, **kw)
    else:
        lora_expand(out, y, w.pool, w.adapter_pages, w.b_offset, w.ranks, w.scaling,
                    use_triton=True, **kw)


def no_adapter_rows(rows, ranks):
    return [t for t, s in enumerate(rows) if s < 0 or ranks[s] == 0]


def _tol(dtype):
    # shrink / expand accumulate in fp32; fp16 outputs are rounded once.
    return dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)


# ----------------------------------------------------------------------------
# shrink / expand against float64
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_shrink(impl, dtype, variant):
    w = make_world(IN_F, OUT_F, RANKS, dtype, seed=1)
    T, rows, kw = routing(variant)
    x = torch.randn(T, IN_F, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = run_shrink(impl, x.to(DEVICE), w, MAX_RANK, kw)
    assert y.shape == (T, MAX_RANK) and y.dtype == torch.float32
    exp = expected_shrink(w, x.double(), rows, MAX_RANK)
    torch.testing.assert_close(y.cpu().double(), exp, atol=2e-4, rtol=2e-4)
    # exact zeros: columns beyond the slot's rank, rows without adapter / module
    for t, s in enumerate(rows):
        r = RANKS[s] if s >= 0 else 0
        assert torch.all(y[t, r:] == 0), (t, s)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_expand(impl, dtype, variant):
    w = make_world(IN_F, OUT_F, RANKS, dtype, seed=3)
    T, rows, kw = routing(variant)
    g = torch.Generator().manual_seed(4)
    # junk beyond each row's rank must be ignored
    y = torch.randn(T, MAX_RANK, generator=g, dtype=torch.float32)
    out0 = torch.randn(T, OUT_F, generator=g).to(dtype)
    out = out0.clone().to(DEVICE)
    y_dev = y.to(DEVICE)
    run_expand(impl, out, y_dev, w, kw)
    exp = expected_expand(w, out0.double(), y.double(), rows)
    torch.testing.assert_close(out.cpu().double(), exp, **_tol(dtype))
    assert out.dtype == dtype
    untouched = no_adapter_rows(rows, RANKS)
    assert untouched and torch.equal(out.cpu()[untouched], out0[untouched])
    assert torch.equal(y_dev.cpu(), y)  # y is read only


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_shrink_expand_matches_dense_lora(impl, variant):
    """out += scale * (x @ A.T) @ B.T end to end, fp16 activations / weights."""
    dtype = torch.float16
    w = make_world(IN_F, OUT_F, RANKS, dtype, seed=5)
    T, rows, kw = routing(variant)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(T, IN_F, generator=g).to(dtype)
    out0 = torch.randn(T, OUT_F, generator=g).to(dtype)
    out = out0.clone().to(DEVICE)
    y = run_shrink(impl, x.to(DEVICE), w, MAX_RANK, kw)
    run_expand(impl, out, y, w, kw)
    exp = expected_expand(w, out0.double(), expected_shrink(w, x.double(), rows, MAX_RANK), rows)
    torch.testing.assert_close(out.cpu().double(), exp, **_tol(dtype))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_rank_128(impl, variant):
    ranks = [128, 3, 0, 64]
    in_f, out_f, max_rank = 24, 40, 128
    w = make_world(in_f, out_f, ranks, torch.float32, seed=7, page=97)
    T, rows, kw = routing(variant, decode_slots=[0, 1, -1, 3, 0, 2],
                          seg_lens=[2, 1, 3, 1], seg_slots=[0, 3, -1, 1])
    g = torch.Generator().manual_seed(8)
    x = torch.randn(T, in_f, generator=g)
    out0 = torch.randn(T, out_f, generator=g)
    y = run_shrink(impl, x.to(DEVICE), w, max_rank, kw)
    y_exp = expected_shrink(w, x.double(), rows, max_rank)
    torch.testing.assert_close(y.cpu().double(), y_exp, atol=2e-4, rtol=2e-4)
    out = out0.clone().to(DEVICE)
    run_expand(impl, out, y, w, kw)
    exp = expected_expand(w, out0.double(), y_exp, rows)
    torch.testing.assert_close(out.cpu().double(), exp, atol=5e-4, rtol=5e-4)


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_matches_ref_with_partial_segments(variant):
    """Rows outside every segment are untouched; empty batch is fine."""
    w = make_world(IN_F, OUT_F, RANKS, torch.float32, seed=9)
    g = torch.Generator().manual_seed(10)
    T = 9
    x = torch.randn(T, IN_F, generator=g).to(DEVICE)
    out0 = torch.randn(T, OUT_F, generator=g).to(DEVICE)
    if variant == "decode":
        kw = dict(row_slot=torch.tensor([4, 1, 1, 0, -1, 2, 2, 2, 3], dtype=torch.int32,
                                        device=DEVICE))
    else:  # segments cover rows 2..7 only
        kw = dict(seg_start=torch.tensor([2, 5, 7], dtype=torch.int32, device=DEVICE),
                  seg_slot=torch.tensor([1, 4], dtype=torch.int32, device=DEVICE))
    ys = [run_shrink(i, x, w, MAX_RANK, kw) for i in ("ref", "triton")]
    torch.testing.assert_close(ys[1], ys[0], atol=1e-5, rtol=1e-5)
    outs = []
    for i in ("ref", "triton"):
        o = out0.clone()
        run_expand(i, o, ys[0], w, kw)
        outs.append(o)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    if variant == "prefill":
        for o, y in zip(outs, ys):
            assert torch.equal(o[[0, 1, 7, 8]], out0[[0, 1, 7, 8]])
            assert torch.all(y[[0, 1, 7, 8]] == 0)
    # empty batch
    kw0 = (dict(row_slot=torch.empty(0, dtype=torch.int32, device=DEVICE)) if variant == "decode"
           else dict(seg_start=torch.zeros(1, dtype=torch.int32, device=DEVICE),
                     seg_slot=torch.empty(0, dtype=torch.int32, device=DEVICE)))
    y0 = run_shrink("triton", x[:0], w, MAX_RANK, kw0)
    assert y0.shape == (0, MAX_RANK)
    run_expand("triton", out0[:0], y0, w, kw0)


# ----------------------------------------------------------------------------
# virtual buffer helpers
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_gather_round_trip(dtype):
    P, num_pages = 37, 20
    g = torch.Generator().manual_seed(11)
    pages = torch.tensor([13, 2, 17, 5, 9, 0], dtype=torch.int32)
    pool = torch.zeros(num_pages, P, dtype=dtype)
    expected_pool = pool.clone()
    offset, numel = 30, 150  # starts near the end of the first page, spans 5 pages
    vals = torch.randn(numel, generator=g).to(dtype)
    scatter_virtual(pool, pages, offset, vals.view(10, 15))  # any shape, flattened
    _place(expected_pool, pages.tolist(), offset, vals)
    assert torch.equal(pool, expected_pool)  # only the addressed elements changed
    got = gather_virtual(pool, pages, offset, numel)
    assert got.shape == (numel,) and got.dtype == dtype
    assert torch.equal(got, vals)
    # a sub-range, and an element-by-element definition check
    sub = gather_virtual(pool, pages, offset + 41, 60)
    assert torch.equal(sub, vals[41:101])
    e = offset + 77
    assert pool[pages[e // P], e % P] == vals[77]
    assert gather_virtual(pool, pages, 5, 0).numel() == 0
    with pytest.raises(ValueError, match="pages"):
        gather_virtual(pool, pages, 6 * P - 3, 10)  # runs past the page list
    with pytest.raises(ValueError, match="page ids"):
        gather_virtual(pool, torch.tensor([3, -1], dtype=torch.int32), 30, 20)


# ----------------------------------------------------------------------------
# dispatch / validation
# ----------------------------------------------------------------------------
def test_validation_errors():
    w = make_world(IN_F, OUT_F, RANKS, torch.float32, seed=12, device="cpu")
    x = torch.randn(4, IN_F)
    rs = torch.tensor([0, 1, -1, 2], dtype=torch.int32)
    ss = torch.tensor([0, 2, 4], dtype=torch.int32)
    sl = torch.tensor([0, 1], dtype=torch.int32)
    args = (w.pool, w.adapter_pages, w.a_offset, w.ranks, MAX_RANK)
    for fn in (lora_shrink, lora_shrink_ref):
        with pytest.raises(ValueError, match="not both"):
            fn(x, *args, row_slot=rs, seg_start=ss, seg_slot=sl)
        with pytest.raises(ValueError, match="row_slot"):
            fn(x, *args)
        with pytest.raises(ValueError, match="seg_start"):
            fn(x, *args, seg_start=ss)
        with pytest.raises(ValueError, match="row_slot"):
            fn(x, *args, row_slot=rs[:3])
        with pytest.raises(ValueError, match="seg_start"):
            fn(x, *args, seg_start=ss[:2], seg_slot=sl)
        with pytest.raises(ValueError, match="x must be"):
            fn(x[0], *args, row_slot=rs)
        with pytest.raises(ValueError, match="ranks"):
            fn(x, w.pool, w.adapter_pages, w.a_offset, w.ranks[:2], MAX_RANK, row_slot=rs)
        with pytest.raises(ValueError, match="max_rank"):
            fn(x, w.pool, w.adapter_pages, w.a_offset, w.ranks, 0, row_slot=rs)
    out = torch.zeros(4, OUT_F)
    for fn in (lora_expand, lora_expand_ref):
        with pytest.raises(ValueError, match="y must be"):
            fn(out, torch.zeros(3, MAX_RANK), w.pool, w.adapter_pages, w.b_offset, w.ranks,
               w.scaling, row_slot=rs)
        with pytest.raises(ValueError, match="scaling"):
            fn(out, torch.zeros(4, MAX_RANK), w.pool, w.adapter_pages, w.b_offset, w.ranks,
               w.scaling[:1], row_slot=rs)


def test_dispatch_on_cpu(monkeypatch):
    w = make_world(IN_F, OUT_F, RANKS, torch.float32, seed=13, device="cpu")
    x = torch.randn(3, IN_F)
    rs = torch.tensor([1, -1, 4], dtype=torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # use_triton=None on CPU tensors -> reference op
    y = lora_shrink(x, w.pool, w.adapter_pages, w.a_offset, w.ranks, MAX_RANK, row_slot=rs)
    torch.testing.assert_close(
        y, lora_shrink_ref(x, w.pool, w.adapter_pages, w.a_offset, w.ranks, MAX_RANK,
                           row_slot=rs))
    if lora._HAVE_TRITON:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            lora_shrink(x, w.pool, w.adapter_pages, w.a_offset, w.ranks, MAX_RANK,
                        row_slot=rs, use_triton=True)


@needs_triton
@pytest.mark.parametrize("op", ["shrink", "expand"])
def test_segment_kernels_fp16_dot_branch(monkeypatch, op):
    """The segment kernels' fp16 operand branch (``CAST_MODE`` 1: ``tl.dot`` on fp16 tiles, what
    CUDA runs for fp16 pools) against float64. The interpreter picks the fp32 branch by default;
    here it is forced. (The bf16 branch cannot be checked this way: the interpreter's bf16
    ``tl.dot`` returns garbage even for a plain 16x16 product; ``make gpu-check`` covers it.)"""
    if not HAS_CUDA:
        monkeypatch.setattr(lora, "_cast_mode", lambda dtype: {torch.float16: 1}.get(dtype, 0))
    dtype = torch.float16
    w = make_world(IN_F, OUT_F, RANKS, dtype, seed=11)
    T, rows, kw = routing("prefill")
    g = torch.Generator().manual_seed(12)
    if op == "shrink":
        x = torch.randn(T, IN_F, generator=g).to(dtype)
        y = run_shrink("triton", x.to(DEVICE), w, MAX_RANK, kw)
        # fp16 products are exact in fp32 accumulation; only the operands were rounded (they are fp16)
        torch.testing.assert_close(y.cpu().double(), expected_shrink(w, x.double(), rows, MAX_RANK),
                                   atol=2e-4, rtol=2e-4)
        return
    y = torch.randn(T, MAX_RANK, generator=g)
    out0 = torch.randn(T, OUT_F, generator=g).to(dtype)
    out = out0.clone().to(DEVICE)
    run_expand("triton", out, y.to(DEVICE), w, kw)
    # y is rounded to fp16 for the dot: a relative error of 2**-11 per term, then fp16 output rounding
    expected = expected_expand(w, out0.double(), y.half().double(), rows)
    torch.testing.assert_close(out.cpu().double(), expected, **_tol(dtype))
