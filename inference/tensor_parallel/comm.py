"""The collectives of one tensor-parallel group, each call's bytes counted.

Two process groups over one ``TCPStore``: ``control`` is always gloo on the CPU (the step's
description, pickled, and adapter page-ins, which come from host memory), ``data`` is NCCL on CUDA
and gloo on the CPU (the model's all-reduces and the logits gather). Neither is torch's default
process group, so several groups (an engine restarted in the same process, tests) never collide.

:class:`CollectiveLog` records, for every call on this rank, the collective's name and the bytes
of the tensor this rank contributes (``payload_bytes``): ``B * hidden * element_bytes`` for an
all-reduce of ``[B, hidden]``. The benchmark (``benchmarks/tp_collectives.py``) reads it.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
# The control group's wait: a worker waits there for the driver's next step, which may come after
# any idle time (or a long warm-up), so it has no practical bound; the data group keeps timeout_s.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class CollectiveLog:
    """Per collective name: calls and payload bytes (see the module docstring) since ``reset``."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    enabled: bool = True

    def record(self, name: str, nbytes: int) -> None:
        if self.enabled:
            self.calls[name] += 1
            self.bytes[name] += int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


class Communicator:
    """Rank ``rank`` of ``size``; collectives block until every rank took part (or time out: the
    data group after ``timeout_s``, the control group after :data:`CONTROL_TIMEOUT`)."""

    def __init__(self, host: str, port: int, rank: int, size: int, device: torch.device,
                 timeout_s: float = DEFAULT_TIMEOUT_S, store: dist.Store | None = None):
        self.rank, self.size, self.device = rank, size, device
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, size, rank == 0, timeout=timeout)
        self.store = store
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, CONTROL_TIMEOUT)
        if device.type == "cuda":
            # on a collective's timeout or an abort, NCCL's watchdog aborts the communicator and keeps
            # the process (torch's default, 3, tears the process down: the driver with it)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, options)
        else:
            self.data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, size, timeout)
        self.log = CollectiveLog()
        self.aborted = False

    # ------------------------------------------------------------------ control (gloo, CPU)
    def broadcast_object(self, obj: object | None) -> object:
        """Rank 0 sends ``obj`` (pickled) to every rank; every rank returns it. Only the driver's
        own messages travel this way, never user-supplied bytes."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self.control.broadcast([length], _root(0)).wait()
        if self.rank != 0:
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self.control.broadcast([payload], _root(0)).wait()
        self.log.record("broadcast_step", payload.numel() + length.numel() * 8)
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def scatter(self, shards: list[torch.Tensor] | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Rank 0 hands ``shards[r]`` (CPU, ``shape``) to rank r; every rank returns its own (in
        pinned memory on CUDA, so its copy into the page pool is a plain DMA)."""
        out = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda" and torch.cuda.is_available())
        opts = dist.ScatterOptions()
        opts.rootRank = 0
        inputs = [[s.contiguous() for s in shards]] if self.rank == 0 else []
        self.control.scatter([out], inputs, opts).wait()
        self.log.record("scatter_adapter", out.numel() * out.element_size())
        return out

    # ------------------------------------------------------------------ data (NCCL or gloo)
    def all_reduce(self, tensor: torch.Tensor, name: str = "all_reduce") -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (it must be contiguous)."""
        if not tensor.is_contiguous():
            raise ValueError("all_reduce needs a contiguous tensor")
        self.data.allreduce([tensor]).wait()
        self.log.record(name, tensor.numel() * tensor.element_size())
        return tensor

    def gather_columns(self, tensor: torch.Tensor, name: str = "gather_logits") -> torch.Tensor | None:
        """Every rank's ``[S, k]`` on rank 0 as ``[S, size * k]`` (rank order); None elsewhere."""
        tensor = tensor.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        outputs = [[torch.empty_like(tensor) for _ in range(self.size)]] if self.rank == 0 else []
        self.data.gather(outputs, [tensor], opts).wait()
        self.log.record(name, tensor.numel() * tensor.element_size())
        return torch.cat(outputs[0], dim=1) if self.rank == 0 else None

    def abort_data(self) -> None:
        """Abort the data group from any thread (a peer died): on NCCL a collective the engine
        thread waits on, whose ``wait()`` did not block the host, then ends instead of waiting for
        the timeout. After this the group's results are garbage: the caller treats the step as
        failed (``aborted`` is True). Gloo's collectives already fail when a peer's sockets close,
        so a gloo group is only marked."""
        self.aborted = True
        if self.device.type != "cuda":
            return
        abort = getattr(self.data, "abort", None)
        if abort is None:
            log.warning("this torch has no ProcessGroupNCCL.abort: the step waits for the NCCL timeout")
            return
        try:
            abort()
        except Exception as exc:  # best effort: the timeout still ends the collective
            log.warning("aborting the NCCL data group failed: %s", exc)

    def close(self) -> None:
        """Drop the process groups (best effort: a peer may be gone)."""
        for group in (self.data, self.control):
            try:
                group.abort() if hasattr(group, "abort") else None
            except Exception:
                pass


def _root(rank: int) -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank = rank
    opts.rootTensor = 0
    return opts
