"""The Triton backend: the S-LoRA kernels on CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``,
which is how the test suite runs it without a GPU).

* LoRA: the adapters' A and Bt are read straight from their pages of the unified pool through a
  per-step page table (``kernels/lora.py``). Decode rows (chunks of one token) take the one-row
  kernels (S-LoRA's MBGMV); prefill chunks the segment kernels (MBGMM), which tile a segment's rows
  so each weight tile is reused. A step that mixes both launches each kernel on its own rows, so
  decode rows are never padded into 16-64-row tiles.
* Attention: one kernel launch per layer over the KV pages (``kernels/paged_attention.py``).
* Dense projections: ``F.linear`` (cuBLAS).
* :func:`warm_up` compiles every kernel variant the engine launches for a model at start-up, so no
  request waits for a compile.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from inference.adapters.manager import DeviceAdapter
from inference.backends.base import Backend
from inference.forward_batch import ForwardBatch
from inference.lora_mapping import LoraMapping
from inference.model_config import ModelConfig
from inference.page_pool import PagePool
from kernels.lora import lora_expand, lora_shrink
from kernels.paged_attention import paged_attention_triton, write_kv


class TritonLoraBackend:
    """:class:`~inference.backends.base.LoraBackend` on the Triton kernels."""

    scratch_bytes = 0  # reads the pool pages in place: no copies of adapters

    def chunk_key(self, adapter: DeviceAdapter | None, rows: int) -> tuple:
        """Rows without an adapter first, then each adapter's rows together (one segment)."""
        return (0,) if adapter is None else (1, adapter.ref.uid)

    def prepare(self, mapping: LoraMapping) -> "TritonLoraBatch":
        return TritonLoraBatch(mapping)


def _row_launches(chunk_slots: list[int], chunk_lengths: list[int], device: torch.device) -> list[dict]:
    """The kernels' row arguments for a step: a decode launch (``row_slot``: one slot per row,
    -1 on prefill rows and rows without an adapter) when some one-token chunk has an adapter, and
    a segment launch (``seg_start``/``seg_slot``: every chunk is a segment, one-token chunks with
    slot -1) when some longer chunk has one."""
    launches = []
    row_slot = [slot if length == 1 else -1 for slot, length in zip(chunk_slots, chunk_lengths) for _ in range(length)]
    if any(s >= 0 for s in row_slot):
        launches.append({"row_slot": torch.tensor(row_slot, dtype=torch.int32).to(device, non_blocking=True)})
    seg_slot = [slot if length > 1 else -1 for slot, length in zip(chunk_slots, chunk_lengths)]
    if any(s >= 0 for s in seg_slot):
        starts = [0]
        for length in chunk_lengths:
            starts.append(starts[-1] + length)
        longest = max(length for slot, length in zip(seg_slot, chunk_lengths) if slot >= 0)
        launches.append({
            "seg_start": torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
            "seg_slot": torch.tensor(seg_slot, dtype=torch.int32).to(device, non_blocking=True),
            # one-token segments without an adapter do not widen the row tiles
            "max_seg_len": longest,
        })
    return launches


class TritonLoraBatch:
    """One step's LoRA on the kernels (a :class:`~inference.backends.base.StepLora`)."""

    def __init__(self, mapping: LoraMapping):
        self.pool = mapping.pool
        device = self.pool.tensor.device
        table = torch.zeros((len(mapping.slots), max(len(s.pages) for s in mapping.slots)), dtype=torch.int32)
        for i, slot in enumerate(mapping.slots):
            table[i, : len(slot.pages)] = torch.tensor(slot.pages, dtype=torch.int32)
        self.adapter_pages = table.to(device, non_blocking=True)
        self.scaling = torch.tensor(mapping.scaling, dtype=torch.float32).to(device, non_blocking=True)
        self.modules: dict[str, tuple[Tensor, Tensor, Tensor, int]] = {}
        for name, m in mapping.modules.items():
            if m.max_rank > 0:
                self.modules[name] = (
                    torch.tensor(m.ranks, dtype=torch.int32).to(device, non_blocking=True),
                    torch.tensor(m.a_offset, dtype=torch.int64).to(device, non_blocking=True),
                    torch.tensor(m.b_offset, dtype=torch.int64).to(device, non_blocking=True),
                    m.max_rank,
                )
        self.launches = _row_launches(mapping.chunk_slots, mapping.chunk_lengths, device)

    def apply(self, layer: int, x: Tensor, outs: dict[str, Tensor]) -> None:
        pool_layer = self.pool.layer(layer)
        for module, out in outs.items():
            if module not in self.modules:
                continue
            ranks, a_offset, b_offset, max_rank = self.modules[module]
            y = None
            for rows in self.launches:  # disjoint rows: each launch leaves the others' rows zero
                part = lora_shrink(x, pool_layer, self.adapter_pages, a_offset, ranks, max_rank, use_triton=True, **rows)
                y = part if y is None else y.add_(part)
            for rows in self.launches:
                lora_expand(out, y, pool_layer, self.adapter_pages, b_offset, ranks, self.scaling, use_triton=True,
                            **rows)


class TritonAttention:
    """:class:`~inference.backends.base.AttentionBackend` on the Triton kernel (needs no plan)."""

    def plan(self, batch: ForwardBatch, n_heads: int, kv_shape: tuple[int, ...]) -> Any:
        return None

    def write_kv(self, kv: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        write_kv(kv, k, v, slot_mapping)

    def attend(self, q: Tensor, kv: Tensor, batch: ForwardBatch, scale: float, plan: Any) -> Tensor:
        return paged_attention_triton(q, kv, batch.page_table, batch.seq_lens, batch.query_start_loc, scale,
                                      max_q_len=batch.max_q_len)


def _identity_rows(rows: int) -> int:
    return rows


def triton_backend() -> Backend:
    from inference.backends.triton_warm_up import warm_up

    return Backend(name="triton", lora=TritonLoraBackend(), attention=TritonAttention(), linear=F.linear,
                   batch_rows=_identity_rows, warm_up=warm_up)
