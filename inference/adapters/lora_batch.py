"""Per-step LoRA metadata and the ``LoraApplier`` the model calls for each projection.

A step's batch may mix rows of many adapters of different ranks and target sets, and rows with no
adapter. Each distinct resident adapter gets a slot ``s``; per target module the tensors
``ranks[s]`` (0 when the adapter does not target that module), ``a_offset[s]`` and ``b_offset[s]``
locate its A and Bt in the adapter's pages, and ``scaling[s]`` is its ``alpha / r`` (or rsLoRA's
``alpha / sqrt(r)``). Decode-only steps use the one-row-per-request kernels; steps with a prefill
chunk use the segment kernels (a decode row is a segment of one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference.adapters.manager import DeviceAdapter
from inference.page_pool import PagePool
from kernels.lora import lora_expand, lora_shrink


@dataclass
class _ModuleMeta:
    ranks: torch.Tensor  # [S] int32
    a_offset: torch.Tensor  # [S] int64
    b_offset: torch.Tensor  # [S] int64
    max_rank: int


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
        self.modules: dict[str, _ModuleMeta] = {}
        names = {name for s in slots for name in s.offsets}
        for name in names:
            entries = [s.offsets.get(name, (0, 0, 0)) for s in slots]
            ranks = [e[2] for e in entries]
            self.modules[name] = _ModuleMeta(
                ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
                a_offset=torch.tensor([e[0] for e in entries], dtype=torch.int64, device=device),
                b_offset=torch.tensor([e[1] for e in entries], dtype=torch.int64, device=device),
                max_rank=max(ranks),
            )
        self.decode = all(n == 1 for n in chunk_lengths)
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
        rows = dict(row_slot=self.row_slot, seg_start=self.seg_start, seg_slot=self.seg_slot,
                    use_triton=self.use_triton, max_seg_len=self.max_seg_len)
        y = lora_shrink(x, pool_layer, self.adapter_pages, meta.a_offset, meta.ranks, meta.max_rank, **rows)
        lora_expand(out, y, pool_layer, self.adapter_pages, meta.b_offset, meta.ranks, self.scaling, **rows)
