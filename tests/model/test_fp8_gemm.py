"""model.fast.fp8_gemm: the Triton FP8-weight GEMV and dot kernel (run by Triton's interpreter on
CPU) against the product of the dequantized weight, and the routes that send each row count to
a path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model import fp8
from model.fast import fp8_gemm
from model.fast.fp8_gemm import (
    UNLIMITED,
    Fp8Weight,
    block_m_for,
    check_routes,
    fp8_weight_matmul,
    route_for,
    triton_ready,
    uses_bf16_twin,
)


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


SPLITK_ROUTES = ((1, "gemv"), (8, "splitk_bf16"), (16, "splitk_f16"), (64, "splitk_fp8"))


def test_routes_send_each_row_count_to_its_path() -> None:
    routes = (*SPLITK_ROUTES, (UNLIMITED, "scaled_mm"))
    check_routes(routes)
    expected = {1: "gemv", 2: "splitk_bf16", 8: "splitk_bf16", 9: "splitk_f16", 16: "splitk_f16"}
    expected |= {17: "splitk_fp8", 64: "splitk_fp8", 65: "scaled_mm", 4096: "scaled_mm"}
    assert {m: route_for(m, routes) for m in expected} == expected
    assert not uses_bf16_twin(routes)
    assert uses_bf16_twin(((1, "gemv"), (UNLIMITED, "bf16")))
    assert uses_bf16_twin()  # the default table (until the sweep) keeps the twin
    for bad, message in [
        (((1, "gemv"), (64, "dot")), "UNLIMITED"),
        (((4, "gemv"), (UNLIMITED, "dot")), "one row"),
        (((8, "dot"), (4, "dot"), (UNLIMITED, "bf16")), "increase"),
        (((UNLIMITED, "cublas"),), "unknown"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_routes(bad)


def spy(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, calls: list[str]) -> None:
    original = getattr(target, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, recording)


@pytest.mark.parametrize(
    ("rows", "path"),
    [
        (1, "fp8_weight_matmul"),
        (3, "splitk_matmul"),
        (17, "splitk_matmul"),
        (65, "dequantize_matmul"),
    ],
)
def test_a_layer_runs_the_kernel_its_route_names(
    monkeypatch: pytest.MonkeyPatch, rows: int, path: str
) -> None:
    calls: list[str] = []
    spy(monkeypatch, fp8_gemm, "fp8_weight_matmul", calls)
    spy(monkeypatch, fp8_gemm.fp8_splitk, "splitk_matmul", calls)
    spy(monkeypatch, fp8_gemm.fp8_prefill, "dequantize_matmul", calls)
    weight = torch.randn(32, 64).to(torch.bfloat16) * 0.1
    routes = (*SPLITK_ROUTES, (UNLIMITED, "bf16"))  # "bf16" without a twin: dequantize
    layer = Fp8Weight.from_weight(weight, backend="triton", routes=routes)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    got = layer(x)
    assert calls == [path]
    expected = F.linear(x.float(), fp8.dequantize(layer.weight, layer.scale, torch.float32))
    tolerance = 0.1 if layer.path_for(rows) == "splitk_fp8" else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


def test_the_bf16_route_uses_the_twin_where_there_is_one() -> None:
    weight = torch.randn(32, 64).to(torch.bfloat16) * 0.1
    calls: list[int] = []

    def twin(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return F.linear(x, weight)

    routes = ((1, "gemv"), (16, "dot"), (UNLIMITED, "bf16"))
    layer = Fp8Weight.from_weight(weight, backend="triton", bf16=twin, routes=routes)
    small, large = torch.randn(16, 64).to(torch.bfloat16), torch.randn(17, 64).to(torch.bfloat16)
    layer(small)
    assert calls == []  # the FP8 kernel
    torch.testing.assert_close(layer(large), F.linear(large, weight))
    assert calls == [17]
    assert [layer.path_for(m) for m in (1, 2, 16, 17)] == ["gemv", "dot", "dot", "bf16"]
    no_twin = Fp8Weight(layer.weight, layer.scale, backend="triton", routes=routes)
    assert no_twin.path_for(17) == fp8_gemm.NO_TWIN_PATH


def test_a_split_k_path_that_cannot_be_tuned_falls_back_to_the_dot_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_config(*args: Any) -> None:
        raise RuntimeError("no split-K configuration runs")

    monkeypatch.setattr(fp8_gemm.TUNER, "config_for", no_config)
    weight = torch.randn(32, 64).to(torch.bfloat16) * 0.1
    layer = Fp8Weight.from_weight(weight, backend="triton", routes=((UNLIMITED, "splitk_f16"),))
    x = torch.randn(4, 64).to(torch.bfloat16)
    expected = F.linear(x.float(), fp8.dequantize(layer.weight, layer.scale, torch.float32))
    torch.testing.assert_close(layer(x).float(), expected, rtol=1e-2, atol=1e-2)
    assert layer.path_for(4) == "dot"  # remembered: no second attempt


def test_the_scaled_mm_route_quantizes_the_rows() -> None:
    weight = torch.randn(32, 64).to(torch.bfloat16) * 0.1
    layer = Fp8Weight.from_weight(weight, backend="triton", routes=((UNLIMITED, "scaled_mm"),))
    x = torch.randn(130, 64).to(torch.bfloat16)
    assert layer.path_for(130) == "scaled_mm"
    x_fp8, x_scale = fp8.quantize_rows(x)
    expected = F.linear(
        x_fp8.float() * x_scale, fp8.dequantize(layer.weight, layer.scale, torch.float32)
    )
    torch.testing.assert_close(layer(x).float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert layer.path_for(130, torch.float32) == "dequantize"  # _scaled_mm takes bf16 only


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
