"""Device backends behind the S-LoRA core (see :mod:`inference.backends.base`)."""

from __future__ import annotations

import torch

from inference.backends.base import AttentionBackend, Backend, LoraBackend, StepLora
from kernels.triton_support import triton_available

__all__ = ["AttentionBackend", "Backend", "LoraBackend", "StepLora", "select_backend"]


def select_backend(device: torch.device | str, use_triton: bool | None = None) -> Backend:
    """The backend for a device: Triton kernels on CUDA (when triton imports), the CPU path
    otherwise. ``use_triton=True`` forces the Triton backend (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1`` in tests); ``False`` forces the CPU path's torch ops on any device."""
    device = torch.device(device)
    if use_triton is None:
        use_triton = device.type == "cuda" and triton_available()
    if use_triton:
        from inference.backends.triton_backend import triton_backend

        return triton_backend()
    from inference.backends.cpu import cpu_backend

    return cpu_backend()
