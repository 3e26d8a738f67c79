"""Engine settings: a dataclass validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs.

    * ``device``: ``cpu`` or ``cuda[:N]``. ``dtype``: ``auto`` (fp32 on CPU, bf16 on CUDA),
      ``float32``, ``float16`` or ``bfloat16``.
    * Pool size: ``pool_bytes`` if given, else ``pool_fraction`` of the device memory that is free
      after the weights are loaded (CUDA), or ``cpu_pool_bytes`` on CPU.
    * ``page_tokens``: tokens per KV page (also the adapter page granularity, see docs/design.md).
    * ``max_num_seqs`` / ``max_num_batched_tokens``: per-step batch limits.
    * ``step_time_target_s``: the step's token budget is lowered so that a step lasts about this
      long (``inference.step_budget``; a light tenant's first token waits for about two steps);
      None (the default for offline batches: throughput first) keeps every step at
      ``max_num_batched_tokens``; the service sets 0.15 s (``TAILOR_STEP_TIME_TARGET_S``).
    * ``max_model_len``: longest prompt + output; defaults to the model's max_position_embeddings.
    * ``max_waiting``: bound of the waiting queue; beyond it submissions are refused (overload).
    * ``fairness_input_token_weight`` / ``fairness_output_token_weight``: what a prompt token and an
      output token cost a tenant in the fair scheduler's virtual token counters (``inference.fairness``).
    * ``enable_prefix_cache``: keep the KV pages of earlier requests and reuse them for requests
      that start with the same tokens, per tenant and adapter version (``inference.prefix_cache``).
    * ``use_triton``: picks the backend (``inference/backends``): None means the Triton backend on
      CUDA and the CPU backend's torch ops on CPU. ``warm_up_kernels``: compile every kernel
      variant at start-up (Triton backend on CUDA; a no-op elsewhere).
    * Adapters: ``max_lora_rank`` (ranks 1..max accepted), ``host_adapter_bytes`` (host-RAM
      cache budget), ``adapter_store_dir`` (local object-store folder; None = a temporary one),
      ``prefetch_reserve_fraction`` (pool share kept free when paging in queued requests'
      adapters ahead of their turn), ``adapter_fetch_threads``.
    * ``tensor_parallel_size``: ranks the model is split over (``inference.tensor_parallel``):
      1 runs everything in this process; N > 1 adds N-1 worker processes (gloo on CPU, NCCL on
      CUDA, one GPU per rank from ``device`` on). Pool sizes are then per rank.
      ``tensor_parallel_timeout_s``: how long a collective of the model's data (all-reduce,
      logits gather) and the group's start-up store wait for a rank before failing; a worker's
      wait for the next step has no practical bound, so an idle service keeps its group.
    """

    device: str = "cpu"
    dtype: str = "auto"
    pool_bytes: int | None = None
    pool_fraction: float = 0.85
    cpu_pool_bytes: int = 1 << 30
    page_tokens: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    step_time_target_s: float | None = None
    max_model_len: int | None = None
    max_waiting: int = 4096
    enable_prefix_cache: bool = True
    fairness_input_token_weight: float = 1.0
    fairness_output_token_weight: float = 2.0
    use_triton: bool | None = None
    warm_up_kernels: bool = True
    max_lora_rank: int = 128
    host_adapter_bytes: int = 4 << 30
    adapter_store_dir: str | None = None
    prefetch_reserve_fraction: float = 0.1
    adapter_fetch_threads: int = 2
    tensor_parallel_size: int = 1
    tensor_parallel_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        problems = []
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            problems.append(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.pool_bytes is not None and self.pool_bytes < 1:
            problems.append("pool_bytes must be positive")
        if not 0.0 < self.pool_fraction < 1.0:
            problems.append("pool_fraction must be in (0, 1)")
        if self.page_tokens < 1 or self.page_tokens & (self.page_tokens - 1):
            problems.append(f"page_tokens must be a power of two, got {self.page_tokens}")
        if self.max_num_seqs < 1:
            problems.append("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            problems.append("max_num_batched_tokens must be >= 1")
        if self.step_time_target_s is not None and (
                isinstance(self.step_time_target_s, bool) or not isinstance(self.step_time_target_s, (int, float))
                or not 0 < self.step_time_target_s < float("inf")):
            problems.append(f"step_time_target_s must be None or a finite number > 0, got {self.step_time_target_s!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            problems.append("max_model_len must be >= 2")
        if self.max_waiting < 1:
            problems.append("max_waiting must be >= 1")
        if self.max_lora_rank < 1:
            problems.append("max_lora_rank must be >= 1")
        if self.host_adapter_bytes < 1:
            problems.append("host_adapter_bytes must be positive")
        if not 0.0 <= self.prefetch_reserve_fraction < 1.0:
            problems.append("prefetch_reserve_fraction must be in [0, 1)")
        for name in ("fairness_input_token_weight", "fairness_output_token_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            problems.append(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if isinstance(self.tensor_parallel_timeout_s, bool) \
                or not isinstance(self.tensor_parallel_timeout_s, (int, float)) \
                or not 0 < self.tensor_parallel_timeout_s < float("inf"):
            problems.append(f"tensor_parallel_timeout_s must be a finite number > 0, "
                            f"got {self.tensor_parallel_timeout_s!r}")
        if self.adapter_fetch_threads < 1:
            problems.append("adapter_fetch_threads must be >= 1")
        if problems:
            raise ValueError("invalid engine config: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]
