"""The CPU backend: torch ops shaped for a few CPU cores (the embedded default's engine path).

* LoRA (:mod:`.lora`): adapters grouped by layout and read from staged copies
  (:mod:`.staging`), segments and per-row routes; tested against ``kernels.lora``'s references.
* Attention (:mod:`.attention`): one gather plan per step shared by every layer; tested against
  ``kernels.paged_attention.paged_attention_ref``.
* Dense projections (:mod:`.gemm`): ``(W @ x.T).T`` with the rows padded to MKL's fast counts.

The same ops run on CUDA tensors when Triton is off (``EngineConfig.use_triton=False``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from inference.backends.base import Backend
from inference.backends.cpu.attention import cpu_paged_attention, plan_cpu_attention
from inference.backends.cpu.gemm import cpu_gemm_rows, linear_weight_left
from inference.backends.cpu.lora import CpuLoraBackend
from inference.forward_batch import ForwardBatch
from inference.model_config import ModelConfig
from inference.page_pool import PagePool
from kernels.paged_attention import write_kv


class CpuAttention:
    """:class:`~inference.backends.base.AttentionBackend` with a plan per step."""

    def plan(self, batch: ForwardBatch, n_heads: int, kv_shape: tuple[int, ...]) -> Any:
        return plan_cpu_attention(batch.page_table, batch.seq_lens, batch.query_start_loc,
                                  n_heads=n_heads, kv_shape=kv_shape)

    def write_kv(self, kv: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        write_kv(kv, k, v, slot_mapping)

    def attend(self, q: Tensor, kv: Tensor, batch: ForwardBatch, scale: float, plan: Any) -> Tensor:
        return cpu_paged_attention(q, kv, plan, scale)


def _no_warm_up(config: ModelConfig, pool: PagePool, max_rank: int) -> None:
    """Nothing to compile: torch's CPU kernels are ready."""


def cpu_backend() -> Backend:
    """A fresh CPU backend (its LoRA side keeps staged adapter copies from step to step)."""
    return Backend(name="cpu", lora=CpuLoraBackend(), attention=CpuAttention(), linear=linear_weight_left,
                   batch_rows=cpu_gemm_rows, warm_up=_no_warm_up)
