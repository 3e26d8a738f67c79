"""The driver's side of a tensor-parallel group: rank 0 runs in the engine's own process (on the
engine thread, like vLLM's driver worker), ranks 1..N-1 are spawned processes.

The driver keeps the only scheduler, page allocator and adapter tiers. Each step it broadcasts a
:class:`~inference.tensor_parallel.worker.StepMessage` (the adapter page-ins it made since the
last step, the batch, the LoRA mapping), scatters each page-in's shards, and then runs its own
share of the forward pass, whose collectives the workers join. :meth:`WorkerGroup.dead_ranks`
tells a supervisor which worker processes have exited.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import time

import torch
import torch.distributed as dist

from inference.forward_batch import ForwardBatch
from inference.lora_mapping import LoraMapping
from inference.adapters.residency import DeviceAdapter
from inference.tensor_parallel.comm import DEFAULT_TIMEOUT_S, Communicator
from inference.tensor_parallel.worker import READY_KEY, STARTED_KEY, StepMessage, WorkerSpec, worker_main

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class WorkerGroupError(RuntimeError):
    """A worker failed to start, or died."""


def rank_device(device: torch.device, rank: int) -> torch.device:
    """The device of ``rank``: the driver's CUDA index plus the rank; the CPU for every rank on CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    first = device.index if device.index is not None else torch.cuda.current_device()
    if first + rank >= torch.cuda.device_count():
        raise WorkerGroupError(f"tensor parallelism over ranks 0..{rank} from {device} needs "
                               f"{first + rank + 1} GPUs, this machine has {torch.cuda.device_count()}")
    return torch.device("cuda", first + rank)


class WorkerGroup:
    """Ranks 1..size-1 as processes, and rank 0's communicator (``self.comm``) in this one."""

    def __init__(self, checkpoint_dir: str, size: int, device: torch.device, dtype: torch.dtype, num_pages: int,
                 page_tokens: int, use_triton: bool | None, warm_up_kernels: bool, max_lora_rank: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float = 300.0):
        self.size = size
        self.device = device
        self.dtype = dtype
        self._pending: list[tuple[list[int], torch.Tensor]] = []
        self._closed = False
        for rank in range(1, size):
            rank_device(device, rank)  # refuse a missing GPU before starting anything
        store = dist.TCPStore(HOST, 0, size, True, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        threads = max(1, (os.cpu_count() or 1) // size) if device.type == "cpu" else 1
        context = multiprocessing.get_context("spawn")
        self.processes = []
        for rank in range(1, size):
            spec = WorkerSpec(str(checkpoint_dir), rank, size, HOST, store.port, str(rank_device(device, rank)),
                              str(dtype).removeprefix("torch."), num_pages, page_tokens, use_triton,
                              warm_up_kernels, max_lora_rank, threads, timeout_s)
            process = context.Process(target=worker_main, args=(spec,), name=f"tailor-tp-rank{rank}", daemon=True)
            process.start()
            self.processes.append(process)
        try:
            self._wait_for(store, STARTED_KEY, start_timeout_s)  # a rank that dies this early is seen
            self.comm = Communicator(HOST, store.port, 0, size, device, timeout_s, store=store)
            self._wait_for(store, READY_KEY, start_timeout_s)
        except BaseException:
            self._kill()
            if hasattr(self, "comm"):  # the driver's process groups would leak
                self.comm.close()
            raise
        log.info("tensor-parallel group of %d ranks ready (workers: pids %s)", size,
                 [p.pid for p in self.processes])

    def _wait_for(self, store: dist.Store, key_format: str, timeout_s: float) -> None:
        """Until every worker set ``key_format`` to "ok"; WorkerGroupError when one reports an
        error, exits, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        pending = set(range(1, self.size))
        while pending:
            for rank in sorted(pending):
                key = key_format.format(rank=rank)
                if store.check([key]):
                    status = store.get(key).decode()
                    if status != "ok":
                        raise WorkerGroupError(f"tensor-parallel rank {rank} failed to start: {status}")
                    pending.discard(rank)
            dead = self.dead_ranks()
            if dead:
                raise WorkerGroupError(f"tensor-parallel ranks {dead} exited during start-up")
            if time.monotonic() > deadline:
                raise WorkerGroupError(f"tensor-parallel ranks {sorted(pending)} not ready after {timeout_s:g} s")
            time.sleep(0.02)

    # ------------------------------------------------------------------ steps (engine thread)
    def queue_page_in(self, pages: list[int], packed: torch.Tensor) -> None:
        """An adapter's shards ``[ranks, layers, elems]`` went into ``pages`` on rank 0; the other
        ranks get theirs with the next step (an ``AdapterManager.page_in_listeners`` callable)."""
        self._pending.append((list(pages), packed))

    def send_step(self, batch: ForwardBatch, mapping: LoraMapping | None) -> None:
        """Send the workers this step (host ``batch``) and the page-ins since the last one."""
        if self._closed:
            raise WorkerGroupError("the tensor-parallel group is closed")
        lora = None
        if mapping is not None:
            slots = [DeviceAdapter(s.ref, list(s.pages), dict(s.offsets), dict(s.shapes)) for s in mapping.slots]
            lora = (slots, list(mapping.chunk_slots), list(mapping.chunk_lengths))
        pending, self._pending = self._pending, []
        message = StepMessage([(pages, tuple(packed.shape[1:])) for pages, packed in pending], batch, lora)
        self.comm.broadcast_object(message)
        for _, packed in pending:
            self.comm.scatter(list(packed.unbind(0)), tuple(packed.shape[1:]), packed.dtype)

    # ------------------------------------------------------------------ supervision
    def abort(self) -> None:
        """A worker died: abort the driver's data group (any thread; see ``Communicator.abort_data``)
        so the engine thread is not left in a collective that cannot complete."""
        self.comm.abort_data()

    @property
    def aborted(self) -> bool:
        return self.comm.aborted

    def dead_ranks(self) -> list[int]:
        """Ranks whose worker process has exited."""
        return [rank for rank, p in enumerate(self.processes, start=1) if not p.is_alive()]

    def failure(self) -> str | None:
        """A clear account of the first worker that exited, or None while all run."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return (f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code "
                        f"{process.exitcode}")
        return None

    def wait_for_failure(self, timeout_s: float) -> str | None:
        """:meth:`failure`, waiting up to ``timeout_s`` for it (a collective may see a peer's
        sockets close before its exit is reaped)."""
        deadline = time.monotonic() + timeout_s
        while (failure := self.failure()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return failure

    def close(self, timeout_s: float = 10.0) -> None:
        """Tell live workers to stop and wait for them; kill what is left."""
        if self._closed:
            return
        self._closed = True
        if not self.dead_ranks():  # a group with a dead rank cannot take a message: kill it
            try:
                self.comm.broadcast_object(StepMessage([], None, None, stop=True))
                deadline = time.monotonic() + timeout_s
                for process in self.processes:
                    process.join(max(0.0, deadline - time.monotonic()))
            except Exception:
                log.warning("stopping the tensor-parallel workers failed; killing them")
        self._kill()
        self.comm.close()

    def _kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
