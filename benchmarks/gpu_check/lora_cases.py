"""LoRA shrink / expand (Triton, both launch shapes) against float64 references.

Each case draws fresh random inputs: adapters of mixed ranks (rank 0 = module absent) packed at
unaligned offsets into pages taken in random order from a pool filled with random garbage, rows
with no adapter (-1), and for the prefill shape segments of random lengths (some empty, some
without an adapter, rows after the last segment belonging to none). The float64 reference uses
the adapters' matrices as drawn (rounded to the dtype), not the pool, so a page-addressing error
shows up as a mismatch; ``gather_virtual`` must give them back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.gpu_check.compare import compare, eps, tolerance
from benchmarks.gpu_check.sizes import Context
from kernels.lora import gather_virtual, lora_expand, lora_shrink, scatter_virtual


@dataclass
class PagedAdapters:
    pool: torch.Tensor          # [num_pages, P]
    pages: torch.Tensor         # [S, max_pages] int32
    a_offset: torch.Tensor      # [S] int64
    b_offset: torch.Tensor      # [S] int64
    ranks: torch.Tensor         # [S] int32
    scaling: torch.Tensor       # [S] float32
    a: list                     # per slot [r, IN] in dtype (None for rank 0)
    bt: list                    # per slot [r, OUT]
    max_rank: int


def _randn(shape, gen, device, dtype=torch.float32, std=1.0):
    return (torch.randn(shape, generator=gen, device=device) * std).to(dtype)


def _randint(high, shape, gen, device):
    return torch.randint(0, high, shape, generator=gen, device=device)


def make_adapters(ranks: list[int], n_in: int, n_out: int, page: int, dtype, gen, device) -> PagedAdapters:
    """Pack one A [r, IN] and one Bt [r, OUT] per slot into a paged pool (see module docstring)."""
    layouts, total_pages = [], 0
    for r in ranks:
        a_off = int(_randint(page, (1,), gen, device))
        b_off = a_off + r * n_in + int(_randint(page, (1,), gen, device))
        n_pages = max(1, -(-(b_off + r * n_out) // page))
        layouts.append((a_off, b_off, n_pages))
        total_pages += n_pages
    num_pages = total_pages + 3  # spare pages of garbage
    pool = _randn((num_pages, page), gen, device, dtype)
    order = torch.randperm(num_pages, generator=gen, device=device).to(torch.int32)
    max_pages = max(n for _, _, n in layouts)
    pages = torch.zeros((len(ranks), max_pages), dtype=torch.int32, device=device)
    a_list, bt_list, used = [], [], 0
    for s, (r, (a_off, b_off, n_pages)) in enumerate(zip(ranks, layouts)):
        pages[s, :n_pages] = order[used:used + n_pages]
        used += n_pages
        if r == 0:
            a_list.append(None)
            bt_list.append(None)
            continue
        a = _randn((r, n_in), gen, device, dtype, std=n_in**-0.5)
        bt = _randn((r, n_out), gen, device, dtype, std=r**-0.5)
        scatter_virtual(pool, pages[s], a_off, a)
        scatter_virtual(pool, pages[s], b_off, bt)
        if not (torch.equal(gather_virtual(pool, pages[s], a_off, a.numel()), a.reshape(-1))
                and torch.equal(gather_virtual(pool, pages[s], b_off, bt.numel()), bt.reshape(-1))):
            raise AssertionError(f"gather_virtual does not return slot {s}'s matrices")
        a_list.append(a)
        bt_list.append(bt)
    scaling = (torch.rand(len(ranks), generator=gen, device=device) * 2 + 0.25).float()
    return PagedAdapters(
        pool=pool, pages=pages,
        a_offset=torch.tensor([a for a, _, _ in layouts], dtype=torch.int64, device=device),
        b_offset=torch.tensor([b for _, b, _ in layouts], dtype=torch.int64, device=device),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device), scaling=scaling,
        a=a_list, bt=bt_list, max_rank=max(max(ranks), 1),
    )


def decode_slots(rows: int, slots: int, gen, device) -> torch.Tensor:
    """[rows] int32 slot per row in -1..slots-1; row 0 has none, row 1 slot 0 when there is room."""
    rs = _randint(slots + 1, (rows,), gen, device).to(torch.int32) - 1
    rs[0] = -1
    if rows > 1:
        rs[1] = 0
    return rs


def prefill_segments(rows: int, slots: int, gen, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seg_start [G+1], seg_slot [G], per-row slot [rows]): random lengths (one empty), one segment
    without an adapter, and a tail of rows outside every segment."""
    lens, left = [0], rows - max(1, rows // 8)
    while left > 0:
        n = min(left, int(_randint(max(2, rows // 3), (1,), gen, device)) + 1)
        lens.append(n)
        left -= n
    seg_slot = _randint(slots, (len(lens),), gen, device).to(torch.int32)
    seg_slot[min(1, len(lens) - 1)] = -1
    seg_start = torch.zeros(len(lens) + 1, dtype=torch.int32, device=device)
    seg_start[1:] = torch.tensor(lens, device=device).cumsum(0)
    row_slot = torch.full((rows,), -1, dtype=torch.int32, device=device)
    for g, n in enumerate(lens):
        row_slot[int(seg_start[g]):int(seg_start[g]) + n] = seg_slot[g]
    return seg_start, seg_slot, row_slot


def shrink_reference(x: torch.Tensor, ad: PagedAdapters, row_slot: torch.Tensor):
    """float64 y [T, max_rank] and the magnitudes |x| @ |A|.T."""
    x64 = x.double()
    ref = torch.zeros((x.shape[0], ad.max_rank), dtype=torch.float64, device=x.device)
    mag = torch.zeros_like(ref)
    for s, a in enumerate(ad.a):
        rows = (row_slot == s).nonzero().flatten()
        if a is None or rows.numel() == 0:
            continue
        r = a.shape[0]
        ref[rows, :r] = x64[rows] @ a.double().T
        mag[rows, :r] = x64[rows].abs() @ a.double().abs().T
    return ref, mag


def expand_reference(out0: torch.Tensor, y: torch.Tensor, ad: PagedAdapters, row_slot: torch.Tensor):
    """float64 out0 + scaling * y[:, :r] @ Bt and the magnitudes |scaling| * |y| @ |Bt|."""
    ref = out0.double().clone()
    mag = torch.zeros_like(ref)
    y64 = y.double()
    for s, bt in enumerate(ad.bt):
        rows = (row_slot == s).nonzero().flatten()
        if bt is None or rows.numel() == 0:
            continue
        r, scale = bt.shape[0], float(ad.scaling[s])
        ref[rows] += scale * (y64[rows, :r] @ bt.double())
        mag[rows] = abs(scale) * (y64[rows, :r].abs() @ bt.double().abs())
    return ref, mag


def _slot_ranks(ctx: Context, gen) -> list[int]:
    """Ranks per slot from the size's set: every rank once (0 included), the rest random."""
    choices = list(ctx.sizes.lora_ranks)
    extra = [choices[int(i)] for i in _randint(len(choices), (max(0, ctx.sizes.lora_slots - len(choices)),),
                                              gen, ctx.device)]
    return (choices + extra)[: max(ctx.sizes.lora_slots, 1)]


def lora_case(ctx: Context, dtype: torch.dtype, op: str, shape: str, salt: int) -> dict:
    """One case: ``op`` in (shrink, expand), ``shape`` in (decode, prefill)."""
    z, dev = ctx.sizes, ctx.device
    gen = ctx.generator(salt)
    ad = make_adapters(_slot_ranks(ctx, gen), z.lora_in, z.lora_out, z.lora_page, dtype, gen, dev)
    S, T = len(ad.a), z.lora_rows
    if shape == "decode":
        row_slot = decode_slots(T, S, gen, dev)
        launch = dict(row_slot=row_slot)
    else:
        seg_start, seg_slot, row_slot = prefill_segments(T, S, gen, dev)
        launch = dict(seg_start=seg_start, seg_slot=seg_slot)
    if op == "shrink":
        x = _randn((T, z.lora_in), gen, dev, dtype)
        y = lora_shrink(x, ad.pool, ad.pages, ad.a_offset, ad.ranks, ad.max_rank, use_triton=True, **launch)
        ref, mag = shrink_reference(x, ad, row_slot)
        # y is fp32 and the kernels accumulate the exact products of dtype operands in fp32
        tol = tolerance(ref, mag, z.lora_in, eps(torch.float32), eps(torch.float32))
        result, k = compare(y, ref, tol), z.lora_in
    else:
        out = _randn((T, z.lora_out), gen, dev, dtype)
        y = _randn((T, ad.max_rank), gen, dev)  # columns past a slot's rank are garbage to ignore
        ref, mag = expand_reference(out, y, ad, row_slot)
        lora_expand(out, y, ad.pool, ad.pages, ad.b_offset, ad.ranks, ad.scaling, use_triton=True, **launch)
        # the prefill kernel rounds y to the dtype for tl.dot; the decode kernel keeps fp32
        acc = eps(dtype) if shape == "prefill" else eps(torch.float32)
        tol = tolerance(ref, mag, ad.max_rank, eps(dtype), acc)
        result, k = compare(out, ref, tol), ad.max_rank
    return {
        "case": f"lora_{op} {shape}", "dtype": str(dtype).replace("torch.", ""),
        "shape": f"T={T} in={z.lora_in} out={z.lora_out} ranks={ad.ranks.tolist()}",
        "rows_without_adapter": int((row_slot < 0).sum()), "reduction_len": k, **result,
    }
