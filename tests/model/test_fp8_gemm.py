"""model.fast.fp8_gemm: the Triton FP8-weight GEMM (run by Triton's interpreter on CPU) against
the bf16 product of the dequantized weight, for decode row counts and odd shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import fp8
from model.fast.fp8_gemm import Fp8Weight, block_m_for, fp8_weight_matmul, triton_ready


def test_row_tiles_cover_decode_batches() -> None:
    assert [block_m_for(m) for m in (1, 8, 16, 17, 32, 33, 64, 65, 200)] == [
        16, 16, 16, 32, 32, 64, 64, 64, 64,
    ]  # fmt: skip


@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 64), (5, 40, 96), (17, 64, 80), (70, 16, 32)])
def test_the_kernel_matches_the_dequantized_matmul(m: int, n: int, k: int) -> None:
    assert triton_ready(torch.device("cpu"))  # TRITON_INTERPRET=1 (tests/conftest.py)
    generator = torch.Generator().manual_seed(m * n + k)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16) * 0.05
    weight[3] *= 40  # one loud output channel: its own scale, nobody else's precision
    x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
    quantized, scale = fp8.quantize_weight(weight)
    got = fp8_weight_matmul(x, quantized, scale)
    expected = F.linear(x.float(), fp8.dequantize(quantized, scale, torch.float32))
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # bf16 output rounding (2^-8 relative) on fp32 accumulations of the same products.
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
    # And close to the unquantized weight, within E4M3's step (2^-4 relative per weight).
    exact = F.linear(x.float(), weight.float())
    assert (got.float() - exact).norm() / exact.norm() < 0.05


def test_leading_dimensions_and_the_fallback_agree() -> None:
    weight = torch.randn(32, 64).to(torch.bfloat16) * 0.1
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    kernel = Fp8Weight.from_weight(weight, backend="triton")
    fallback = Fp8Weight(kernel.weight, kernel.scale, backend="dequantize")
    assert kernel(x).shape == (2, 3, 32)
    torch.testing.assert_close(kernel(x).float(), fallback(x).float(), rtol=1e-2, atol=1e-2)
    assert kernel.nbytes == 32 * 64 + 32 * 4  # a byte a weight: half of bf16


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Weight(torch.zeros(4, 4), torch.ones(4))
    quantized, scale = fp8.quantize_weight(torch.ones(4, 8))
    with pytest.raises(ValueError, match="features"):
        fp8_weight_matmul(torch.ones(1, 16, dtype=torch.bfloat16), quantized, scale)
    with pytest.raises(ValueError, match="backend"):
        Fp8Weight(quantized, scale, backend="magic")


def test_more_rows_than_the_kernel_wins_at_go_to_the_bf16_twin() -> None:
    weight = torch.randn(32, 64).to(torch.bfloat16) * 0.1
    calls: list[int] = []

    def twin(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return F.linear(x, weight)

    layer = Fp8Weight.from_weight(weight, backend="triton", bf16=twin, max_rows=16)
    small, large = torch.randn(16, 64).to(torch.bfloat16), torch.randn(17, 64).to(torch.bfloat16)
    layer(small)
    assert calls == []  # the FP8 kernel
    torch.testing.assert_close(layer(large), F.linear(large, weight))
    assert calls == [17]


@pytest.mark.parametrize("m", [1, 2, 3])
def test_the_gemv_row_and_the_dot_rows_agree(m: int) -> None:
    # One row takes the GEMV kernel, more the tensor-core one: both equal the widened matmul.
    generator = torch.Generator().manual_seed(m)
    weight = torch.randn(40, 96, generator=generator).to(torch.bfloat16) * 0.05
    x = torch.randn(m, 96, generator=generator).to(torch.bfloat16)
    quantized, scale = fp8.quantize_weight(weight)
    expected = F.linear(x.float(), fp8.dequantize(quantized, scale, torch.float32))
    got = fp8_weight_matmul(x, quantized, scale)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)
