"""Per-step LoRA metadata and the ``LoraApplier`` the model calls for each projection.

A step's batch may mix rows of many adapters of different ranks and target sets, and rows with no
adapter. Each distinct resident adapter gets a slot ``s``; per target module the tensors
``ranks[s]`` (0 when the adapter does not target that module), ``a_offset[s]`` and ``b_offset[s]``
locate its A and Bt in the adapter's pages, and ``scaling[s]`` is its ``alpha / r`` (or rsLoRA's
``alpha / sqrt(r)``). Decode-only steps use the one-row-per-request kernels; steps with a prefill
chunk use the segment kernels (a decode row is a segment of one).

On CPU (no Triton) decode steps take a vectorised path instead of the per-slot reference loop: the
flat pool positions of every slot's A and Bt are computed once per step (they are the same in every
layer, since all layers share one page layout), so each layer costs two gathers and two batched
matmuls however many distinct adapters the batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.adapters.manager import DeviceAdapter
from inference.page_pool import PagePool
from kernels.lora import lora_expand, lora_shrink


# Above this many gathered elements per module the dense CPU path would cost more memory than the
# per-slot reference loop saves; fall back to it.
_DENSE_MAX_ELEMS = 1 << 23


@dataclass
class _ModuleMeta:
    ranks: torch.Tensor  # [S] int32
    a_offset: torch.Tensor  # [S] int64
    b_offset: torch.Tensor  # [S] int64
    max_rank: int
    dense: "_DenseIndex | None" = None


@dataclass
class _DenseIndex:
    """Flat pool positions of every slot's A [S, R, in] and Bt [S, R, out] (R = max rank of the
    module in this step), and the mask of rows below each slot's rank."""

    a_index: torch.Tensor  # [S, R, in] int64 into pool_layer.view(-1)
    b_index: torch.Tensor  # [S, R, out] int64
    row_mask: torch.Tensor  # [S, R, 1] bool


def _dense_index(pages: list[list[int]], offsets: list[int], ranks: list[int], max_rank: int, width: int,
                 page_elems: int) -> torch.Tensor:
    """[S, max_rank, width] flat positions of virtual elements ``offset + j * width + k``."""
    table = torch.zeros((len(pages), max(len(p) for p in pages)), dtype=torch.int64)
    for i, p in enumerate(pages):
        table[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
    rows = torch.arange(max_rank)[:, None] * width + torch.arange(width)[None, :]
    start = torch.tensor(offsets, dtype=torch.int64)[:, None, None]
    virtual = start + rows[None]  # [S, R, W]
    limit = start + torch.tensor([r * width for r in ranks], dtype=torch.int64)[:, None, None]
    virtual = torch.where(virtual < limit, virtual, start)  # rows past the rank read a harmless element
    page_slot = virtual // page_elems
    return table.gather(1, page_slot.view(len(pages), -1)).view_as(virtual) * page_elems + virtual % page_elems


class LoraBatch:
    """Implements ``inference.model.LoraApplier`` for one step."""

    def __init__(
        self,
        pool: PagePool,
        slots: list[DeviceAdapter],
        chunk_slots: list[int],
        chunk_lengths: list[int],
        use_triton: bool | None = None,
    ):
        """``chunk_slots[i]`` is the slot of the i-th chunk of the flattened batch (-1: none) and
        ``chunk_lengths[i]`` its number of rows."""
        device = pool.tensor.device
        self.pool = pool
        self.use_triton = use_triton
        max_pages = max(len(s.pages) for s in slots)
        table = torch.zeros((len(slots), max_pages), dtype=torch.int32)
        for i, slot in enumerate(slots):
            table[i, : len(slot.pages)] = torch.tensor(slot.pages, dtype=torch.int32)
        self.adapter_pages = table.to(device)
        self.scaling = torch.tensor([s.ref.scaling for s in slots], dtype=torch.float32, device=device)
        self.decode = all(n == 1 for n in chunk_lengths)
        dense = self.decode and device.type == "cpu" and not use_triton
        shapes = {name: shape for s in slots for name, shape in s.shapes.items()}
        self.modules: dict[str, _ModuleMeta] = {}
        names = {name for s in slots for name in s.offsets}
        for name in names:
            entries = [s.offsets.get(name, (0, 0, 0)) for s in slots]
            ranks = [e[2] for e in entries]
            meta = _ModuleMeta(
                ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
                a_offset=torch.tensor([e[0] for e in entries], dtype=torch.int64, device=device),
                b_offset=torch.tensor([e[1] for e in entries], dtype=torch.int64, device=device),
                max_rank=max(ranks),
            )
            in_f, out_f = shapes[name]
            if dense and meta.max_rank and len(slots) * meta.max_rank * max(in_f, out_f) <= _DENSE_MAX_ELEMS:
                pages = [s.pages for s in slots]
                page_elems = pool.geometry.page_elems
                meta.dense = _DenseIndex(
                    a_index=_dense_index(pages, [e[0] for e in entries], ranks, meta.max_rank, in_f, page_elems),
                    b_index=_dense_index(pages, [e[1] for e in entries], ranks, meta.max_rank, out_f, page_elems),
                    row_mask=(torch.arange(meta.max_rank)[None, :] < torch.tensor(ranks)[:, None])[:, :, None],
                )
            self.modules[name] = meta
        if dense:
            slots_t = torch.tensor(chunk_slots, dtype=torch.int64)
            self.has_slot = (slots_t >= 0)[:, None]
            self.row_slot_index = slots_t.clamp(min=0)
        if self.decode:
            self.row_slot = torch.tensor(chunk_slots, dtype=torch.int32, device=device)
            self.seg_start = self.seg_slot = None
            self.max_seg_len = None
        else:
            starts = [0]
            for n in chunk_lengths:
                starts.append(starts[-1] + n)
            self.row_slot = None
            self.seg_start = torch.tensor(starts, dtype=torch.int32, device=device)
            self.seg_slot = torch.tensor(chunk_slots, dtype=torch.int32, device=device)
            self.max_seg_len = max(chunk_lengths)

    def apply(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[t] += scaling[s] * (x[t] @ A_s.T) @ Bt_s`` for rows with an adapter targeting ``module``."""
        meta = self.modules.get(module)
        if meta is None or meta.max_rank == 0:
            return
        pool_layer = self.pool.layer(layer)
        if meta.dense is not None:
            self._apply_dense(pool_layer, meta.dense, x, out)
            return
        rows = dict(row_slot=self.row_slot, seg_start=self.seg_start, seg_slot=self.seg_slot,
                    use_triton=self.use_triton, max_seg_len=self.max_seg_len)
        y = lora_shrink(x, pool_layer, self.adapter_pages, meta.a_offset, meta.ranks, meta.max_rank, **rows)
        lora_expand(out, y, pool_layer, self.adapter_pages, meta.b_offset, meta.ranks, self.scaling, **rows)

    def _apply_dense(self, pool_layer: torch.Tensor, index: _DenseIndex, x: torch.Tensor, out: torch.Tensor) -> None:
        """Decode rows on CPU: ``out[t] += scaling[s_t] * (x[t] @ A[s_t].T) @ Bt[s_t]`` as batched
        matmuls over gathered A [T, R, in] and Bt [T, R, out] (fp32)."""
        flat = pool_layer.reshape(-1)
        a = torch.where(index.row_mask, flat[index.a_index].float(), 0.0)  # [S, R, in]
        b_t = torch.where(index.row_mask, flat[index.b_index].float(), 0.0)  # [S, R, out]
        rows = self.row_slot_index
        y = torch.bmm(a[rows], x.float()[:, :, None])  # [T, R, 1]
        delta = torch.bmm(y.transpose(1, 2), b_t[rows]).squeeze(1)  # [T, out]
        delta = delta * (self.scaling[rows][:, None] * self.has_slot)
        out += delta.to(out.dtype)
