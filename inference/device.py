"""What the core needs from the device itself, as opposed to its kernels: whether it exists, its
free memory, pinned host memory, and host-to-device page copies that overlap the running steps.

The only module above the kernels that knows CUDA from CPU; the engine, the model runner and the
adapter tiers call these and never branch on the device.
"""

from __future__ import annotations

import torch


def require_available(device: torch.device) -> torch.device:
    """``device`` with its index made explicit (``cuda`` becomes the current ``cuda:N``, so other
    threads bind the same one); ValueError when it is CUDA and this machine has none."""
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def free_memory_bytes(device: torch.device) -> int | None:
    """Free device memory in bytes (CUDA), or None where the device has no memory of its own."""
    if device.type == "cuda":
        # blocks torch's allocator keeps cached (e.g. the unfused weights after the model fused
        # them) count as used until they are returned
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def bind_thread(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device: Triton launches its kernels on
    the current device, not on the tensors' (a no-op for other devices). ``device`` carries its
    index (:func:`require_available` makes it explicit)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def pins_host_memory(device: torch.device) -> bool:
    """Whether host buffers bound for ``device`` should be pinned (asynchronous DMA on CUDA)."""
    return device.type == "cuda"


def wait_until_ready(event: object | None, device: torch.device) -> None:
    """Order the work queued next on ``device``'s current stream after ``event`` (a page-in's
    :class:`PageCopier` event); nothing for None (copies that were synchronous)."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


def synchronize(event: object | None) -> None:
    """Block the host until ``event`` has passed (None: nothing to wait for)."""
    if event is not None:
        event.synchronize()


class PageCopier:
    """Copies packed host rows into pages of a pool tensor: asynchronously on a side stream on
    CUDA (the page-ins overlap the steps queued after them), synchronously elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, pool: torch.Tensor, pages: list[int], packed: torch.Tensor) -> object | None:
        """``pool[:, pages[i]] = packed[:, i]`` for pool [layers, num_pages, page_elems] and
        packed [layers, len(pages) * page_elems] (pinned on CUDA). Returns the event that marks
        the copy done on CUDA (see :func:`wait_until_ready`), else None."""
        layers, page_elems = packed.shape[0], pool.shape[2]
        if self._stream is None:
            index = torch.tensor(pages, dtype=torch.long)
            pool.index_copy_(1, index, packed.view(layers, len(pages), page_elems))
            return None
        # Work already queued on the compute stream may still read these pages (freed KV pages of a
        # finished request, an evicted adapter's pages): the copy must not overtake it.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):  # side stream: overlaps the steps queued after
            # Both device tensors are allocated on the copy stream, the only stream that uses them,
            # so the caching allocator reuses their memory only after these copies. Both sources
            # are pinned: torch records the copy stream's use of a pinned block copied with
            # non_blocking=True, and its caching host allocator keeps the block (the host cache may
            # drop ``packed`` at any time) until the copy has run.
            index = torch.tensor(pages, dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)
            staged = packed.to(self.device, non_blocking=True)  # one DMA: packed is contiguous and pinned
            pool.index_copy_(1, index, staged.view(layers, len(pages), page_elems))
            event = torch.cuda.Event()
            event.record(self._stream)
        return event
