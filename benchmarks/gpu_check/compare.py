"""Accuracy and timing helpers shared by the sections: float64 comparisons with eps-derived
tolerances, device timers (CUDA events on a GPU, the host clock on the CPU) and the copy bandwidth.

Tolerance model (per element, so rows that must not change are held to exactly zero error):

    |out - ref| <= C * (eps_out * |ref| + eps_acc * sqrt(K) * mag)

``ref`` is the float64 result computed from the very values the kernel read (inputs rounded to
their dtype, then widened), ``mag`` the float64 sum of the magnitudes of the K terms that make up
the element (``|x| @ |A|.T`` for a product), ``eps_out`` the machine epsilon of the output dtype
(its final rounding), ``eps_acc`` that of the arithmetic inside the reduction, and ``sqrt(K)`` the
usual probabilistic growth of rounding errors over a K-term sum. C = 4. NaN and inf never pass.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

SAFETY = 4.0
# Triton's default dot precision for fp32 operands on NVIDIA (TF32: 10 explicit mantissa bits).
TF32_EPS = 2.0**-10


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def tolerance(ref: torch.Tensor, mag: torch.Tensor, k: int, eps_out: float, eps_acc: float) -> torch.Tensor:
    """The element-wise bound of the module docstring (float64, ``ref``'s shape)."""
    return SAFETY * (eps_out * ref.abs() + eps_acc * math.sqrt(max(int(k), 1)) * mag)


def compare(actual: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> dict:
    """Compare ``actual`` (any float dtype) with the float64 ``ref`` under the element-wise ``tol``.

    Returns ``max_abs_err``, ``tol_at_worst`` (the bound at the element closest to failing),
    ``max_tol``, ``worst_ratio`` (largest error / bound; <= 1 passes), ``nonfinite`` (count) and
    ``passed``."""
    if tuple(actual.shape) != tuple(ref.shape):
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(ref.shape)}")
    a = actual.detach().to(device=ref.device, dtype=torch.float64)
    err = (a - ref).abs()
    nonfinite = int((~torch.isfinite(a)).sum())
    tol = tol.to(device=ref.device, dtype=torch.float64)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / tol)  # 0/0 -> 0; x/0 -> inf (fails)
    ratio = torch.nan_to_num(ratio, nan=math.inf, posinf=math.inf)
    if err.numel() == 0:
        return {"max_abs_err": 0.0, "tol_at_worst": 0.0, "max_tol": 0.0, "worst_ratio": 0.0,
                "nonfinite": 0, "passed": True}
    worst = int(ratio.reshape(-1).argmax())
    worst_ratio = float(ratio.reshape(-1)[worst])
    max_err = float(torch.nan_to_num(err, nan=math.inf, posinf=math.inf).max())
    return {
        "max_abs_err": max_err,
        "tol_at_worst": float(tol.reshape(-1)[worst]),
        "max_tol": float(tol.max()),
        "worst_ratio": worst_ratio,
        "nonfinite": nonfinite,
        "passed": nonfinite == 0 and worst_ratio <= 1.0,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, iters: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls: CUDA events around
    each call on a GPU, the host clock (after a sync) elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> dict:
    """Bytes/s of ``torch.empty_like(x).copy_(x)`` on a ``nbytes`` tensor of random data, counting
    bytes read plus bytes written; the median of ``iters`` timed copies."""
    x = torch.randn(max(1, nbytes // 2), dtype=torch.float16, device=device)
    dst = torch.empty_like(x)
    ms = median(time_ms(lambda: dst.copy_(x), device, iters=iters, warmup=2))
    moved = 2 * x.numel() * x.element_size()
    del x, dst
    return {"bytes_moved": moved, "ms": ms, "bytes_per_s": moved / (ms * 1e-3)}
