"""Rank 0's side of a tensor-parallel engine: its shard of the model and the page pool, and the
lifecycle of the worker processes (ranks 1..N-1) the engine delegates to.

The engine runs rank 0 on its own thread (as vLLM's driver worker does); this object starts the
:class:`~inference.tensor_parallel.group.WorkerGroup`, says whether it can run a step, turns a
step that met a dead worker into :class:`WorkerGroupError` (the requests of that step fail with
the worker's message), aborts the data group from another thread (the supervisor's) and replaces
a failed group with a new one of the same geometry.
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

import torch

from inference.engine_config import EngineConfig
from inference.model import LlamaModel, ParallelContext
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry, PagePool
from inference.tensor_parallel.group import WorkerGroup, WorkerGroupError
from inference.tensor_parallel.partition import TensorParallelLayout
from inference.tensor_parallel.worker import rank_weights

FAILURE_WAIT_S = 2.0  # how long a failed collective waits for the dead worker's exit to be seen


class TensorParallelDriver:
    """Rank 0's ``model`` and ``pool`` (the same number of pages on every rank; ``pool_bytes`` is
    per rank), the ``layout`` and the running ``workers``."""

    def __init__(self, checkpoint_dir: Path, model_config: ModelConfig, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, backend, pool_bytes: int):
        self.checkpoint_dir, self.config, self.device, self.dtype = checkpoint_dir, config, device, dtype
        self.layout = TensorParallelLayout(model_config, config.tensor_parallel_size)
        rank_config = self.layout.rank_config()
        weights = rank_weights(checkpoint_dir, model_config, self.layout, 0, device, dtype)
        geometry = PageGeometry.for_model(rank_config, config.page_tokens, dtype)
        self.pool = PagePool.with_bytes(geometry, pool_bytes, device, dtype)
        self.workers = self._new_group()
        context = ParallelContext(self.workers.comm, self.layout.vocab_range(0)[0], model_config.vocab_size)
        self.model = LlamaModel(rank_config, weights, device, dtype, backend, context)

    def _new_group(self) -> WorkerGroup:
        """Start ranks 1..N-1 for this checkpoint and pool geometry (closed with the driver)."""
        workers = WorkerGroup(str(self.checkpoint_dir), self.layout.size, self.device, self.dtype,
                              self.pool.num_pages, self.config.page_tokens, self.config.use_triton,
                              self.config.warm_up_kernels, self.config.max_lora_rank,
                              timeout_s=self.config.tensor_parallel_timeout_s)
        weakref.finalize(self, workers.close)
        return workers

    def failure(self) -> str | None:
        """Why the group cannot run a step (a worker exited), or None."""
        return self.workers.failure()

    def check_ready(self) -> None:
        """Before a step: WorkerGroupError if a worker is known dead."""
        failure = self.failure()
        if failure is not None:
            raise WorkerGroupError(failure)

    def check_step(self, logits: torch.Tensor) -> None:
        """Before the step's logits are used: wait for them (on CUDA an NCCL collective's ``wait()``
        does not block the host, so this is where a step with a dead peer waits, until the
        supervisor aborts the group), and fail the step if the group was aborted meanwhile: its
        logits are garbage."""
        if logits.device.type == "cuda":
            torch.cuda.current_stream(logits.device).synchronize()
        if self.workers.aborted:
            raise WorkerGroupError(self.workers.wait_for_failure(FAILURE_WAIT_S) or
                                   "the tensor-parallel group was aborted")

    def explain(self, exc: Exception) -> None:
        """A step raised ``exc``: if a worker died, raise WorkerGroupError with its failure (a
        collective with a dead peer fails with a transport error that says nothing useful);
        otherwise return, for the caller to re-raise ``exc``."""
        failure = self.workers.wait_for_failure(FAILURE_WAIT_S)
        if failure is not None:
            raise WorkerGroupError(failure) from exc

    def abort(self) -> None:
        """A worker died (any thread): abort the driver's data group so a step waiting on it ends."""
        self.workers.abort()

    def restart(self, page_in_listeners: list, runner, model: LlamaModel) -> None:
        """Replace the group with a new one of the same geometry and rewire ``page_in_listeners``
        (the adapter manager's), ``runner`` and ``model`` to it (engine thread, nothing in flight)."""
        self.workers.close()
        old = self.workers
        self.workers = self._new_group()
        page_in_listeners.remove(old.queue_page_in)
        page_in_listeners.append(self.workers.queue_page_in)
        runner.workers = self.workers
        model.parallel = dataclasses.replace(model.parallel, comm=self.workers.comm)

    def close(self) -> None:
        self.workers.close()
