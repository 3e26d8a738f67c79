"""The seam between the S-LoRA core and the device: two small protocols and the backend bundle.

The core (engine step, scheduler, page pool, adapter tiers and residency, the step's LoRA mapping,
the model) is written once against these. A backend implements them for one kind of device:
:mod:`inference.backends.triton_backend` (Triton kernels, CUDA) and :mod:`inference.backends.cpu`
(torch ops tuned for a few CPU cores). The engine picks one at start-up
(:func:`inference.backends.select_backend`); nothing above the backends branches on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from torch import Tensor

from inference.adapters.manager import DeviceAdapter
from inference.forward_batch import ForwardBatch
from inference.lora_mapping import LoraMapping
from inference.model_config import ModelConfig
from inference.page_pool import PagePool


class StepLora(Protocol):
    """A step's LoRA computation, prepared once and applied at every layer."""

    def apply(self, layer: int, x: Tensor, outs: dict[str, Tensor]) -> None:
        """``out[t] += scale_t * (x[t] @ A_t.T) @ B_t.T`` for each ``module: out`` of ``outs`` and the
        rows that carry an adapter targeting it. The modules share the input: the model passes
        each ``inference.adapters.peft_checkpoint.SHARED_INPUT`` family (q, k, v; gate, up) in one
        call, in family order.

        x: [N, in_features]; each out: [N, out_features], updated in place (may be a column slice
        of a fused output).
        """


class LoraBackend(Protocol):
    """The LoRA computation of a batch whose rows use different adapters of different ranks."""

    @property
    def scratch_bytes(self) -> int:
        """Device bytes the backend holds outside the pool (copies of adapters), for metrics."""

    def chunk_key(self, adapter: DeviceAdapter | None, rows: int) -> tuple:
        """Sort key for a step's chunks (``rows``: all rows of the chunk's adapter in the step):
        the order of the batch's rows that this backend computes fastest. Rows of one adapter
        must end up adjacent."""

    def prepare(self, mapping: LoraMapping) -> StepLora:
        """Turn the step's mapping into what the kernels read (index tensors on the device)."""


class AttentionBackend(Protocol):
    """Paged attention over the unified pool's KV pages (layout: ``kernels/paged_attention.py``)."""

    def plan(self, batch: ForwardBatch, n_heads: int, kv_shape: tuple[int, ...]) -> Any:
        """Whatever the backend derives from the batch description once per step (or None)."""

    def write_kv(self, kv: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        """Store the step's new keys and values [N, n_kv_heads, head_dim] at their slots."""

    def attend(self, q: Tensor, kv: Tensor, batch: ForwardBatch, scale: float, plan: Any) -> Tensor:
        """Causal attention of the step's queries q [rows, n_heads, head_dim] over one layer's
        pages; rows past the batch's queries come back zero."""


@dataclass(frozen=True)
class Backend:
    """One device's implementations. ``linear(x, weight)`` is ``x @ weight.T`` ([N, in] ->
    [N, out]; may return a non-contiguous view); ``batch_rows(n)`` is how many rows the dense ops
    should run on for ``n`` tokens (the model pads the rest with token 0 at position 0, rows the
    attention leaves zero and that write no KV); ``warm_up(config, pool, max_lora_rank)`` compiles what the
    kernels need for a model before the first request."""

    name: str
    lora: LoraBackend
    attention: AttentionBackend
    linear: Callable[[Tensor, Tensor], Tensor]
    batch_rows: Callable[[int], int]
    warm_up: Callable[[ModelConfig, PagePool, int], None]
