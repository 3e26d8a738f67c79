"""Tests for kernels.paged_attention against an independent float64 reference.

The Triton kernel runs on CUDA when available, otherwise on CPU tensors under
the Triton interpreter: TRITON_INTERPRET=1 is set below when this module is the
first to import triton, and per Triton test via monkeypatch.  The kernel uses
no triton @jit library helpers and is jitted lazily per interpreter mode, so it
also works when triton was imported earlier without the variable (the shared
conftest imports transformers, which may import triton).  Shapes are tiny
because the interpreter is slow.
"""

from __future__ import annotations

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:  # before the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import itertools
import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

import inference.backends.cpu.attention as cpu_attention
import kernels.paged_attention as pa
from kernels.paged_attention import (
    paged_attention,
    paged_attention_ref,
    paged_attention_triton,
    write_kv,
)

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not pa.triton_available(), reason="triton is not importable; Triton kernel untested"
)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, H, D]
    kv: torch.Tensor  # [num_pages, 2, T, H_kv, D]
    page_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    scale: float

    def args(self) -> tuple:
        return (self.q, self.kv, self.page_table, self.seq_lens, self.query_start_loc, self.scale)

    def to(self, device: str) -> "Batch":
        return Batch(
            self.q.to(device),
            self.kv.to(device),
            self.page_table.to(device),
            self.seq_lens.to(device),
            self.query_start_loc.to(device),
            self.scale,
        )


def make_batch(
    seed: int,
    q_lens: Sequence[int],
    ctx_lens: Sequence[int],
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_tokens: int,
    dtype: torch.dtype,
    extra_pages: int = 3,
) -> Batch:
    """Random batch with shuffled, non-contiguous page ids.

    Every pool slot that is not part of some sequence's context is NaN, so any
    read past a context (or of a padding page) poisons the output.
    """
    gen = torch.Generator().manual_seed(seed)
    n_seq = len(q_lens)
    pages_per_seq = [-(-s // page_tokens) for s in ctx_lens]
    num_pages = sum(pages_per_seq) + extra_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()
    max_pages = max(pages_per_seq, default=0) + 1  # always some padding columns
    page_table = torch.zeros(n_seq, max_pages, dtype=torch.int32)
    kv = torch.full((num_pages, 2, page_tokens, n_kv_heads, head_dim), float("nan"), dtype=dtype)
    nxt = 0
    for b, s in enumerate(ctx_lens):
        for p in range(pages_per_seq[b]):
            page_table[b, p] = perm[nxt]
            nxt += 1
        for pos in range(s):
            page = int(page_table[b, pos // page_tokens])
            kv[page, :, pos % page_tokens] = torch.randn(
                2, n_kv_heads, head_dim, generator=gen
            ).to(dtype)
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    return Batch(
        q=q,
        kv=kv,
        page_table=page_table,
        seq_lens=torch.tensor(list(ctx_lens), dtype=torch.int32),
        query_start_loc=qsl,
        scale=1.0 / math.sqrt(head_dim),
    )


def attention_f64(batch: Batch) -> torch.Tensor:
    """Independent reference: per sequence, rebuild contiguous K/V by explicit
    indexing and run plain causal softmax attention in float64."""
    q, kv, pt = batch.q.cpu(), batch.kv.cpu(), batch.page_table.cpu()
    seq_lens = batch.seq_lens.tolist()
    qsl = batch.query_start_loc.tolist()
    page_tokens, n_kv = kv.shape[2], kv.shape[3]
    group = q.shape[1] // n_kv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, s in enumerate(seq_lens):
        q_len = qsl[b + 1] - qsl[b]
        if q_len == 0:
            continue
        k = torch.stack([kv[int(pt[b, p // page_tokens]), 0, p % page_tokens] for p in range(s)])
        v = torch.stack([kv[int(pt[b, p // page_tokens]), 1, p % page_tokens] for p in range(s)])
        k = k.double().repeat_interleave(group, dim=1)  # [s, H, D]
        v = v.double().repeat_interleave(group, dim=1)
        qb = q[qsl[b] : qsl[b + 1]].double()  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * batch.scale
        q_pos = torch.arange(s - q_len, s)
        causal = torch.arange(s)[None, :] <= q_pos[:, None]  # [q_len, s]
        scores = scores.masked_fill(~causal[None], float("-inf"))
        out[qsl[b] : qsl[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float32:
        return {"atol": 3e-5, "rtol": 3e-5}
    if dtype == torch.bfloat16:
        return {"atol": 3e-2, "rtol": 3e-2}
    # fp16 output rounding (~1e-3 relative) plus TF32 P@V on GPU.
    return {"atol": 4e-3, "rtol": 4e-3}


def check(out: torch.Tensor, batch: Batch, what: str) -> None:
    expected = attention_f64(batch)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    got = out.cpu().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    torch.testing.assert_close(
        got, expected, **tolerance(batch.q.dtype), msg=lambda m: f"{what} (max err {err:.3g}): {m}"
    )


@pytest.fixture(autouse=True)
def _interpreter_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA, run every test with TRITON_INTERPRET=1 (restored afterwards)."""
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def cpu_backend_attention(batch: Batch) -> torch.Tensor:
    """The CPU backend's path: a plan for the batch, then the batched attention."""
    plan = cpu_attention.plan_cpu_attention(
        batch.page_table, batch.seq_lens, batch.query_start_loc,
        n_heads=batch.q.shape[1], kv_shape=tuple(batch.kv.shape),
    )
    return cpu_attention.cpu_paged_attention(batch.q, batch.kv, plan, batch.scale)


def run_impl(impl: str, batch: Batch) -> torch.Tensor:
    """Run the reference, the CPU backend's path, or the Triton op (CUDA, else CPU + interpreter)."""
    if impl == "ref":
        return paged_attention_ref(*batch.args())
    if impl == "cpu":
        return cpu_backend_attention(batch)
    out = paged_attention(*batch.to(TRITON_DEVICE).args(), use_triton=True)
    if HAS_CUDA:
        torch.cuda.synchronize()
    return out


IMPLS = ["ref", "cpu", pytest.param("triton", marks=needs_triton)]

# name -> (q_lens, ctx_lens, page_tokens)
CASES: dict[str, tuple[list[int], list[int], int]] = {
    # q_len 1, context lengths incl. 1 and exact page multiples (T=4 < BLOCK_N).
    "decode": ([1] * 6, [1, 4, 8, 3, 13, 16], 4),
    # Prefill with mixed lengths; 25 tokens x group 3 = 75 rows -> 2 M blocks.
    "prefill": ([1, 5, 8, 19, 25], [1, 5, 8, 19, 25], 8),
    # Prefill, decode, chunked prefill (ctx > q_len > 1), an idle sequence (q_len 0).
    "mixed": ([5, 1, 3, 0, 1, 8, 2], [5, 9, 11, 6, 1, 16, 10], 8),
}
HEADS = {"gqa": (6, 2), "mha": (4, 4)}


# ----------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 48])
def test_matches_float64_reference(
    impl: str,
    case: str,
    heads: str,
    dtype: torch.dtype,
    head_dim: int,
) -> None:
    q_lens, ctx_lens, page_tokens = CASES[case]
    n_heads, n_kv = HEADS[heads]
    seed = zlib.crc32(f"{case}/{heads}/{dtype}/{head_dim}".encode())
    batch = make_batch(
        seed,
        q_lens,
        ctx_lens,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        page_tokens=page_tokens,
        dtype=dtype,
    )
    check(run_impl(impl, batch), batch, f"{impl}/{case}/{heads} seed={seed}")


@pytest.mark.parametrize("run", range(3))
@pytest.mark.parametrize("impl", IMPLS)
def test_random_batch(impl: str, run: int) -> None:
    """Fuzz: a fresh random batch each run; the seed is in the failure message."""
    seed = random.getrandbits(31)  # from the seed the random_seed fixture prints (TAILOR_TEST_SEED replays it)
    rng = random.Random(seed)
    n_seq = rng.randint(1, 5)
    q_lens, ctx_lens = [], []
    for _ in range(n_seq):
        ctx = rng.randint(1, 20)
        q_len = rng.choice([0, 1, ctx, rng.randint(0, ctx)])
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    n_heads, n_kv = rng.choice([(6, 2), (4, 4), (4, 1)])
    batch = make_batch(
        seed,
        q_lens,
        ctx_lens,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=rng.choice([16, 32, 40]),
        page_tokens=rng.choice([4, 8, 16]),
        dtype=rng.choice([torch.float32, torch.float16]),
    )
    desc = f"{impl} seed={seed} q_lens={q_lens} ctx={ctx_lens} heads={n_heads}/{n_kv}"
    check(run_impl(impl, batch), batch, desc)


@pytest.mark.parametrize(
    "impl",
    [
        "ref",
        pytest.param(
            "triton",
            marks=[
                needs_triton,
                pytest.mark.skipif(
                    not HAS_CUDA, reason="the Triton interpreter's bf16 arithmetic is unreliable"
                ),
            ],
        ),
    ],
)
def test_bfloat16(impl: str) -> None:
    q_lens, ctx_lens, page_tokens = CASES["mixed"]
    batch = make_batch(
        17, q_lens, ctx_lens, n_heads=6, n_kv_heads=2, head_dim=32,
        page_tokens=page_tokens, dtype=torch.bfloat16,
    )
    check(run_impl(impl, batch), batch, f"{impl}/bf16")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_q(impl: str) -> None:
    """q as a non-contiguous view (e.g. split out of a fused qkv projection)."""
    q_lens, ctx_lens, page_tokens = CASES["mixed"]
    batch = make_batch(
        7, q_lens, ctx_lens, n_heads=6, n_kv_heads=2, head_dim=32,
        page_tokens=page_tokens, dtype=torch.float32,
    )
    qkv = torch.randn(batch.q.shape[0], 10, 32)
    qkv[:, 2:8] = batch.q
    batch.q = qkv[:, 2:8]
    assert not batch.q.is_contiguous()
    check(run_impl(impl, batch), batch, f"{impl}/strided-q")


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_view_of_multi_layer_pool(impl: str) -> None:
    """kv as a non-contiguous per-layer view of a [pages, layers, 2, T, H_kv, D] pool."""
    q_lens, ctx_lens, page_tokens = CASES["mixed"]
    batch = make_batch(
        13, q_lens, ctx_lens, n_heads=6, n_kv_heads=2, head_dim=24,
        page_tokens=page_tokens, dtype=torch.float16,
    )
    pool_shape = (batch.kv.shape[0], 3, *batch.kv.shape[1:])
    pool = torch.full(pool_shape, float("nan"), dtype=torch.float16)
    pool[:, 1] = batch.kv
    batch.kv = pool[:, 1]
    assert not batch.kv.is_contiguous()
    check(run_impl(impl, batch), batch, f"{impl}/layer-view")


@pytest.mark.parametrize("bias_elems", [1 << 20, 0], ids=["additive-mask", "masked-fill"])
def test_cpu_chunking_paths(monkeypatch: pytest.MonkeyPatch, bias_elems: int) -> None:
    """A tiny chunk budget forces row-splitting of prefills and many chunks; the causal mask is
    applied either as a materialised additive term (small chunks) or by masked_fill_."""
    monkeypatch.setattr(cpu_attention, "BIAS_ELEMS", bias_elems)
    q_lens, ctx_lens, page_tokens = CASES["mixed"]
    batch = make_batch(
        11, q_lens + [30], ctx_lens + [40], n_heads=6, n_kv_heads=2, head_dim=16,
        page_tokens=page_tokens, dtype=torch.float32,
    )
    for budget in (1, 300, 5000, 1 << 24):
        monkeypatch.setattr(cpu_attention, "CHUNK_ELEMS", budget)
        check(cpu_backend_attention(batch), batch, f"cpu budget={budget}")


@pytest.mark.parametrize("overhead", [0, 1 << 16, 1 << 40], ids=["one-per-item", "tuned", "one-chunk"])
def test_cpu_planner_costs(monkeypatch: pytest.MonkeyPatch, overhead: int) -> None:
    """Whatever the chunk overhead, every query is covered once and results are exact; a zero
    overhead gives unpadded chunks (each item alone or with equal shapes), a huge one the fewest
    chunks the window allows."""
    monkeypatch.setattr(cpu_attention, "CHUNK_OVERHEAD", overhead)
    q_lens = [7, 1, 1, 1, 1, 3, 1]
    ctx_lens = [9, 30, 5, 17, 30, 12, 2]
    batch = make_batch(
        21, q_lens, ctx_lens, n_heads=4, n_kv_heads=2, head_dim=8, page_tokens=4, dtype=torch.float32,
    )
    check(cpu_backend_attention(batch), batch, f"overhead={overhead}")
    starts = list(itertools.accumulate([0, *q_lens[:-1]]))
    chunks = cpu_attention.plan_chunks(starts, q_lens, ctx_lens, 4, 2 * 2 * 8, 1 << 24)
    assert sorted(tok for chunk in chunks for (_, tok, _, _) in chunk) == starts
    if overhead == 0:
        for chunk in chunks:
            assert len({(n_q, ctx) for (_, _, n_q, ctx) in chunk}) == 1, chunk
    if overhead == 1 << 40:
        assert len(chunks) == 1


def test_cpu_planner_does_not_pad_decodes_to_prefill_length() -> None:
    """One long prefill plus many decodes: decodes go to their own chunk(s)."""
    q_lens = [512] + [1] * 63
    ctx_lens = [512] + [300 + i for i in range(63)]
    starts = list(itertools.accumulate([0, *q_lens[:-1]]))
    chunks = cpu_attention.plan_chunks(starts, q_lens, ctx_lens, 9, 2 * 3 * 64, 1 << 24)
    covered = sorted((tok, n) for chunk in chunks for (_, tok, n, _) in chunk)
    assert sum(n for _, n in covered) == sum(q_lens)  # every query exactly once
    for chunk in chunks:
        assert len({n_q for (_, _, n_q, _) in chunk}) == 1, chunk


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl: str) -> None:
    batch = make_batch(
        3, [0, 0], [3, 5], n_heads=4, n_kv_heads=2, head_dim=16, page_tokens=4,
        dtype=torch.float32,
    )
    out = run_impl(impl, batch)
    assert out.shape == (0, 4, 16)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_past_query_start_loc_are_zero(impl: str) -> None:
    """q may carry padding rows after query_start_loc[-1] (e.g. CUDA-graph buckets)."""
    batch = make_batch(
        4, [2, 1], [5, 7], n_heads=4, n_kv_heads=2, head_dim=16, page_tokens=4,
        dtype=torch.float32,
    )
    expected = attention_f64(batch)
    batch.q = torch.cat([batch.q, torch.randn(3, 4, 16)])
    out = run_impl(impl, batch).cpu()
    torch.testing.assert_close(out[:3].double(), expected, **tolerance(torch.float32))
    assert torch.equal(out[3:], torch.zeros(3, 4, 16))


# ----------------------------------------------------------------------------
# Dispatch and validation
# ----------------------------------------------------------------------------


def _small_batch() -> Batch:
    return make_batch(
        5, [2, 1], [4, 6], n_heads=4, n_kv_heads=2, head_dim=16, page_tokens=4,
        dtype=torch.float32,
    )


def test_dispatch_cpu_defaults_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _small_batch()
    called: list[str] = []
    real_ref = pa.paged_attention_ref

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        called.append("ref")
        return real_ref(*args, **kwargs)

    monkeypatch.setattr(pa, "paged_attention_ref", spy)
    out = paged_attention(*batch.args())
    assert called == ["ref"]
    torch.testing.assert_close(out, real_ref(*batch.args()), rtol=0, atol=0)
    out = paged_attention(*batch.args(), use_triton=False)
    assert called == ["ref", "ref"]


@needs_triton
def test_dispatch_triton_on_cpu_requires_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        paged_attention(*_small_batch().args(), use_triton=True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        paged_attention_triton(*_small_batch().args())


def _mutations() -> dict[str, Callable[[Batch], None]]:
    def set_attr(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Batch], None]:
        return lambda b: setattr(b, name, fn(getattr(b, name)))

    return {
        "q_2d": set_attr("q", lambda t: t[:, 0]),
        "q_int": set_attr("q", lambda t: t.long()),
        "kv_4d": set_attr("kv", lambda t: t[:, 0]),
        "head_dim_mismatch": set_attr("q", lambda t: t[..., :8]),
        "heads_not_multiple": set_attr("q", lambda t: t[:, :3]),
        "qsl_len": set_attr("query_start_loc", lambda t: t[:-1]),
        "seq_lens_float": set_attr("seq_lens", lambda t: t.float()),
        "page_table_rows": set_attr("page_table", lambda t: t[:1]),
        "seq_len_lt_q_len": set_attr("seq_lens", lambda t: torch.tensor([1, 6], dtype=t.dtype)),
        "too_few_page_cols": set_attr("page_table", lambda t: t[:, :1]),
    }


@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("mutation", list(_mutations()))
def test_validation_errors(mutation: str, impl: str) -> None:
    batch = _small_batch()
    _mutations()[mutation](batch)
    with pytest.raises(ValueError):
        run_impl(impl, batch)


# ----------------------------------------------------------------------------
# write_kv
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("layer_view", [False, True], ids=["contiguous", "layer-view"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_write_kv_round_trip(pool_dtype: torch.dtype, layer_view: bool) -> None:
    gen = torch.Generator().manual_seed(1234)
    num_pages, page_tokens, n_kv, head_dim = 6, 4, 2, 8
    shape = (num_pages, 2, page_tokens, n_kv, head_dim)
    if layer_view:  # layer 1 of a [pages, layers, 2, T, H_kv, D] pool
        pool = torch.randn(num_pages, 3, *shape[1:], generator=gen).to(pool_dtype)
        kv = pool[:, 1]
        other_layers = pool[:, [0, 2]].clone()
    else:
        kv = torch.randn(shape, generator=gen).to(pool_dtype)
    before = kv.clone()
    n_tok = 9
    slots = torch.randperm(num_pages * page_tokens, generator=gen)[:n_tok]
    k = torch.randn(n_tok, n_kv, head_dim, generator=gen)
    v = torch.randn(n_tok, n_kv, head_dim, generator=gen)
    write_kv(kv, k, v, slots)

    touched = torch.zeros(num_pages, page_tokens, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        page, off = divmod(s, page_tokens)
        assert torch.equal(kv[page, 0, off], k[i].to(pool_dtype))
        assert torch.equal(kv[page, 1, off], v[i].to(pool_dtype))
        touched[page, off] = True
    untouched = ~touched
    assert torch.equal(kv[:, 0][untouched], before[:, 0][untouched])
    assert torch.equal(kv[:, 1][untouched], before[:, 1][untouched])
    if layer_view:
        assert torch.equal(pool[:, [0, 2]], other_layers)

    write_kv(kv, k[:0], v[:0], slots[:0])  # no-op
    with pytest.raises(ValueError):
        write_kv(kv, k[:, :1], v, slots)
    with pytest.raises(ValueError):
        write_kv(kv, k, v, slots.float())


def test_write_kv_then_attention() -> None:
    """End to end: write a sequence's K/V through write_kv into shuffled pages
    and check attention over the pages equals attention over the originals."""
    gen = torch.Generator().manual_seed(99)
    page_tokens, n_kv, n_heads, head_dim, ctx = 4, 2, 4, 16, 11
    kv = torch.full((8, 2, page_tokens, n_kv, head_dim), float("nan"))
    pages = torch.randperm(8, generator=gen)[:3].to(torch.int32)
    pos = torch.arange(ctx)
    slots = pages.long()[pos // page_tokens] * page_tokens + pos % page_tokens
    k = torch.randn(ctx, n_kv, head_dim, generator=gen)
    v = torch.randn(ctx, n_kv, head_dim, generator=gen)
    write_kv(kv, k, v, slots)
    q = torch.randn(3, n_heads, head_dim, generator=gen)
    batch = Batch(
        q, kv, pages[None, :], torch.tensor([ctx], dtype=torch.int32),
        torch.tensor([0, 3], dtype=torch.int32), 0.25,
    )
    out = paged_attention_ref(*batch.args())
    # Plain attention over the contiguous originals.
    kk = k.double().repeat_interleave(2, 1)
    vv = v.double().repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * 0.25
    causal = pos[None, :] <= torch.arange(ctx - 3, ctx)[:, None]
    expected = torch.einsum("hqk,khd->qhd", s.masked_fill(~causal, float("-inf")).softmax(-1), vv)
    torch.testing.assert_close(out.double(), expected, atol=3e-5, rtol=3e-5)
    check(out, batch, "write_kv+ref")



def test_cpu_with_shared_plan_matches_and_checks_geometry() -> None:
    """A plan built once serves any layer's call of the batch; a plan for another geometry or a
    bad q is refused."""
    batch = _small_batch()
    plan = cpu_attention.plan_cpu_attention(
        batch.page_table, batch.seq_lens, batch.query_start_loc,
        n_heads=batch.q.shape[1], kv_shape=tuple(batch.kv.shape),
    )
    for _layer in range(2):
        check(cpu_attention.cpu_paged_attention(batch.q, batch.kv, plan, batch.scale), batch, "cpu with plan")
    other = cpu_attention.plan_cpu_attention(
        batch.page_table, batch.seq_lens, batch.query_start_loc,
        n_heads=2 * batch.q.shape[1], kv_shape=tuple(batch.kv.shape),
    )
    with pytest.raises(ValueError, match="plan was made for"):
        cpu_attention.cpu_paged_attention(batch.q, batch.kv, other, batch.scale)
    with pytest.raises(ValueError, match="q must be"):
        cpu_attention.cpu_paged_attention(batch.q[:, 0], batch.kv, plan, batch.scale)
