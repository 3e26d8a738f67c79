"""The CPU backend's dense projections: MKL's fp32 GEMM in its fastest form for few rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpu_gemm_rows(rows: int) -> int:
    """Rows to give MKL's fp32 GEMM on CPU for ``rows`` activation rows (the rest zero padding).

    The GEMM's speed depends on the row count far more than on the work (measured on the CI
    machine for 30 layers of SmolLM2 plus its LM head: ``python -m benchmarks.cpu_gemm_rows``,
    docs/benchmarks.md): 15 rows take 1.8x as long as 16, 47 rows 1.3x as long as 48, one row
    3x as long as two (a single row takes a slow matrix-vector path). So one row becomes two, and
    counts 3-7 past a multiple of 8 are rounded up to the next one; 1 or 2 past one measured
    faster unpadded, as did 2-5 rows.
    """
    if rows == 1:
        return 2
    if rows <= 5 or rows % 8 in (1, 2):
        return rows
    return -(-rows // 8) * 8


def linear_weight_left(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` computed as ``(weight @ x.T).T``; returns a [N, out] *transposed view*.

    MKL's sgemm runs this form 8-40% faster than ``F.linear`` at the engine's batch sizes (the
    large operand is then the left one), and faster still with the rows padded to
    :func:`cpu_gemm_rows` (the model pads its rows once per step through ``Backend.batch_rows``,
    so this pads only when called on its own) and ``x`` row-major (a column-major ``x``, which the
    previous projection's transposed output is, is up to 2x slower below 16 rows). Consumers must
    accept a non-contiguous result. See docs/design.md.
    """
    n = x.shape[0]
    rows = cpu_gemm_rows(n)
    if rows != n:
        x = F.pad(x, (0, 0, 0, rows - n))  # a new row-major tensor
    elif n < 16 and not x.is_contiguous():
        x = x.contiguous()
    return torch.mm(weight, x.t()).t()[:n]
