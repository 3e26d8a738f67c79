"""The CPU projection form (weight on the left, rows padded) against a float64 matmul."""

import pytest
import torch

from inference.backends.cpu.gemm import cpu_gemm_rows, linear_weight_left


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 15, 16, 17, 33, 47, 64, 130])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_linear_weight_left_matches_float64(rows: int, layout: str) -> None:
    gen = torch.Generator().manual_seed(rows)
    in_f, out_f = 96, 72
    x = torch.randn(rows, in_f, generator=gen)
    if layout == "column-major":  # what the previous projection's transposed output looks like
        x = x.t().contiguous().t()
    w = torch.randn(out_f, in_f, generator=gen)
    y = linear_weight_left(x, w)
    assert y.shape == (rows, out_f)
    torch.testing.assert_close(y.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-4)


def test_cpu_gemm_rows_pads_to_multiples_of_eight() -> None:
    assert cpu_gemm_rows(1) == 2
    assert [cpu_gemm_rows(n) for n in range(2, 6)] == [2, 3, 4, 5]
    for n in range(6, 300):
        padded = cpu_gemm_rows(n)
        if n % 8 in (1, 2):
            assert padded == n
        else:
            assert padded % 8 == 0 and n <= padded < n + 8
