"""What the Triton kernels share: the optional import, the interpreter switch and the dispatch rule.

Triton is optional: CPU-only installs run the torch reference ops. With ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors under Triton's interpreter (the tests do this without a GPU); the
variable is read each time a kernel is dispatched, so it may be set after triton was imported.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional (CPU-only installs use the reference ops)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install (a broken install raises more than ImportError)
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "interpret_mode", "resolve_use_triton", "tl", "triton", "triton_available"]


def triton_available() -> bool:
    """Whether triton could be imported (the kernels then run on CUDA, or on CPU when interpreted)."""
    return HAVE_TRITON


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` is set: Triton then runs kernels on CPU tensors."""
    return HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_use_triton(op: str, device: torch.device, use_triton: bool | None) -> bool:
    """A dispatcher's choice for tensors on ``device``: ``None`` means Triton for CUDA tensors and
    the reference op otherwise; ``True`` is checked (triton installed; CUDA tensors, or CPU tensors
    with ``TRITON_INTERPRET=1``), raising an error that names ``op``."""
    if use_triton is None:
        return device.type == "cuda" and HAVE_TRITON
    if not use_triton:
        return False
    if not HAVE_TRITON:
        raise RuntimeError(f"{op}: use_triton=True but the 'triton' package cannot be imported")
    if device.type != "cuda" and not interpret_mode():
        raise ValueError(f"{op}: use_triton=True on {device} tensors needs TRITON_INTERPRET=1 (or CUDA tensors)")
    return True
