"""Ranks 1..N-1 of a tensor-parallel group: one process each, a loop of steps the driver sends.

A worker holds its shard of the base model (``partition.TensorParallelLayout.shard_weights``) and
its own unified page pool of the same number of pages as the driver's (rank 0): its KV heads'
pages and its share of every resident adapter. It has no allocator, scheduler or adapter tier:
the driver decides which pages hold what and sends, per step, the adapter page-ins it made (their
pages, then the data through a scatter), the batch and the LoRA mapping. The worker then runs the
same forward pass as every other rank, so the collectives line up.
"""

from __future__ import annotations

import datetime
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from inference.adapters.residency import DeviceAdapter
from inference.backends import select_backend
from inference.device import PageCopier, synchronize
from inference.forward_batch import ForwardBatch
from inference.lora_mapping import LoraMapping
from inference.model import LlamaModel, ParallelContext
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry, PagePool
from inference.tensor_parallel.comm import Communicator
from inference.tensor_parallel.partition import TensorParallelLayout
from inference.weights import load_weights

log = logging.getLogger(__name__)

READY_KEY = "ready/{rank}"
STARTED_KEY = "started/{rank}"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its rank (picklable)."""

    checkpoint_dir: str
    rank: int
    size: int
    host: str
    port: int
    device: str
    dtype: str  # "float32", "float16" or "bfloat16"
    num_pages: int
    page_tokens: int
    use_triton: bool | None
    warm_up_kernels: bool
    max_lora_rank: int
    threads: int
    timeout_s: float


@dataclass(frozen=True)
class StepMessage:
    """One step, from the driver. ``page_ins``: ``(pages, shard shape [layers, elems])`` of each
    adapter paged in since the last step, in order (their data follows, one scatter each);
    ``lora``: the step's adapters (as resident on rank 0: pages and offsets are the same on every
    rank), chunk slots and chunk lengths, or None; ``batch``: host tensors. ``stop``: leave."""

    page_ins: list[tuple[list[int], tuple[int, int]]]
    batch: ForwardBatch | None
    lora: tuple[list[DeviceAdapter], list[int], list[int]] | None
    stop: bool = False


def rank_weights(checkpoint_dir: Path, config: ModelConfig, layout: TensorParallelLayout, rank: int,
                 device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s weights on ``device``: loaded on the host, sliced, then moved (the whole
    model never sits on one device)."""
    full = load_weights(checkpoint_dir, config, torch.device("cpu"), dtype)
    shard = layout.shard_weights(full, rank)
    del full
    return {key: tensor.to(device) for key, tensor in shard.items()}


class Worker:
    """One rank's model, pool and backend, driven by :class:`StepMessage`s."""

    def __init__(self, spec: WorkerSpec, comm: Communicator):
        self.spec, self.comm = spec, comm
        self.device = torch.device(spec.device)
        self.dtype = getattr(torch, spec.dtype)
        config = ModelConfig.from_checkpoint(Path(spec.checkpoint_dir))
        layout = TensorParallelLayout(config, spec.size)
        rank_config = layout.rank_config()
        self.backend = select_backend(self.device, spec.use_triton)
        weights = rank_weights(Path(spec.checkpoint_dir), config, layout, spec.rank, self.device, self.dtype)
        parallel = ParallelContext(comm, layout.vocab_range(spec.rank)[0], config.vocab_size)
        self.model = LlamaModel(rank_config, weights, self.device, self.dtype, self.backend, parallel)
        geometry = PageGeometry.for_model(rank_config, spec.page_tokens, self.dtype)
        self.pool = PagePool(geometry, spec.num_pages, self.device, self.dtype)
        if spec.warm_up_kernels:
            self.backend.warm_up(rank_config, self.pool, spec.max_lora_rank)
        self.copier = PageCopier(self.device)

    def serve(self) -> None:
        """Run steps until the driver says stop."""
        while True:
            message: StepMessage = self.comm.broadcast_object(None)
            if message.stop:
                return
            self.step(message)

    def step(self, message: StepMessage) -> None:
        for pages, shape in message.page_ins:
            shard = self.comm.scatter(None, shape, self.dtype)
            synchronize(self.copier.copy(self.pool.tensor, pages, shard))
        if message.batch is None:
            return
        lora = None
        if message.lora is not None:
            slots, chunk_slots, chunk_lengths = message.lora
            lora = self.backend.lora.prepare(LoraMapping.build(self.pool, slots, chunk_slots, chunk_lengths))
        self.model.forward(message.batch.to(self.device), self.pool, lora)


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (spawned by ``group.WorkerGroup``). Reports start-up
    success or the error through the group's store, then serves until told to stop."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{spec.rank} %(levelname)s %(message)s")
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds this rank to its own GPU
    store = dist.TCPStore(spec.host, spec.port, spec.size, False, timeout=datetime.timedelta(seconds=spec.timeout_s))
    store.set(STARTED_KEY.format(rank=spec.rank), "ok")  # the driver joins the groups only after every rank did
    try:  # a failure here (NCCL's init included) reaches the driver as a WorkerGroupError naming it
        comm = Communicator(spec.host, spec.port, spec.rank, spec.size, device, spec.timeout_s, store=store)
        worker = Worker(spec, comm)
    except Exception:
        store.set(READY_KEY.format(rank=spec.rank), "error: " + traceback.format_exc())
        raise
    store.set(READY_KEY.format(rank=spec.rank), "ok")
    with torch.inference_mode():
        worker.serve()
    comm.close()
