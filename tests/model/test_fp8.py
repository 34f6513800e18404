"""model.fp8 on CPU: the E4M3 round trip, per-row scaling, the fallback, the _scaled_mm call.

The CPU build of torch 2.13 runs ``torch._scaled_mm`` with row-wise scales too (it checks no
layouts there), so the fp8-activation path is exercised here against a float32 reference, and a
recording wrapper checks the layouts and scale shapes the CUDA kernels require. The pure
helpers of ``bench.fp8_gemm`` are tested at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bench import fp8_choice, fp8_gemm
from bench import fp8_compile as bench_compile
from model import fp8
from model.fast.fp8_gemm import UNLIMITED, check_routes

# Round-to-nearest with E4M3's 3 mantissa bits: within half a step, 2^-4 of the value.
E4M3_RELATIVE = 2.0**-4
# Below E4M3's normal range (2^-6 after scaling) the absolute error is half the subnormal
# step 2^-9, in units of the row's scale.
E4M3_SUBNORMAL_ABSOLUTE = 2.0**-10
# The RMS relative error of E4M3 rounding on smooth random data is ~0.026 (measured); a
# uniform error over the whole +-2^-4 would be 2^-4/sqrt(3) = 0.036. e5m2 gives ~0.05.
RMS_RELATIVE = E4M3_RELATIVE / math.sqrt(3)


@pytest.fixture(autouse=True)
def fresh_probe() -> Iterator[None]:
    """The row-multiple probe is cached per device; tests that fake _scaled_mm need it fresh."""
    fp8.scaled_mm_row_multiple.cache_clear()
    yield
    fp8.scaled_mm_row_multiple.cache_clear()


def random_weight(out_features: int = 64, in_features: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator) * 0.02).bfloat16()


def random_input(rows: int, in_features: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_features, generator=generator).bfloat16()


def error_bound(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise bound of |dequantize(quantize(w)) - w|, with float32 slack."""
    w = weight.float().abs()
    bound = torch.maximum(E4M3_RELATIVE * w, E4M3_SUBNORMAL_ABSOLUTE * scale[:, None])
    return bound * (1 + 1e-5)


def assert_within_e4m3(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w_fp8, scale = fp8.quantize_weight(weight)
    restored = fp8.dequantize(w_fp8, scale, torch.float32)
    error = (restored - weight.float()).abs()
    bound = error_bound(weight, scale)
    worst = float((error - bound).max())
    assert worst <= 0, f"an element is off by {worst} beyond E4M3's rounding bound"
    return w_fp8, scale


# ---------------------------------------------------------------------------- weights


def test_quantize_weight_shapes_and_dtypes() -> None:
    w_fp8, scale = fp8.quantize_weight(random_weight(48, 96))
    assert w_fp8.shape == (48, 96) and w_fp8.dtype == torch.float8_e4m3fn
    assert scale.shape == (48,) and scale.dtype == torch.float32
    assert fp8.dequantize(w_fp8, scale).dtype == torch.bfloat16
    assert fp8.dequantize(w_fp8, scale, torch.float32).shape == (48, 96)


def test_random_weight_round_trip_within_e4m3_step() -> None:
    weight = random_weight(256, 512)
    w_fp8, scale = assert_within_e4m3(weight)
    restored = fp8.dequantize(w_fp8, scale, torch.float32)
    per_row = (restored - weight.float()).norm(dim=1) / weight.float().norm(dim=1)
    assert float(per_row.max()) <= E4M3_RELATIVE
    # It really rounds to 3 mantissa bits: neither lossless nor coarser than E4M3.
    assert 2.0**-7 < float(per_row.mean()) <= RMS_RELATIVE


def test_each_row_absmax_maps_onto_448() -> None:
    weight = random_weight(32, 64)
    w_fp8, scale = fp8.quantize_weight(weight)
    assert torch.equal(w_fp8.float().abs().amax(dim=1), torch.full((32,), fp8.E4M3_MAX))
    assert torch.allclose(scale * fp8.E4M3_MAX, weight.float().abs().amax(dim=1), rtol=1e-6)


def test_rows_of_very_different_magnitudes_each_keep_their_precision() -> None:
    """Per-row scales: a row of 1e-4s is as precise as a row of 1e4s (one scale per tensor
    would flush the small rows to zero)."""
    magnitudes = torch.logspace(-4, 4, 16)[:, None]
    weight = (random_weight(16, 64).float() / 0.02 * magnitudes).bfloat16()
    w_fp8, scale = assert_within_e4m3(weight)
    restored = fp8.dequantize(w_fp8, scale, torch.float32)
    per_row = (restored - weight.float()).norm(dim=1) / weight.float().norm(dim=1)
    assert float(per_row.max()) <= E4M3_RELATIVE


def test_values_on_the_e4m3_grid_round_trip_exactly() -> None:
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]  # 254 finite codes, 448 among them
    weight = torch.stack([grid * 2.0**-5, -grid * 2.0**3]).bfloat16()
    w_fp8, scale = fp8.quantize_weight(weight)
    assert torch.equal(fp8.dequantize(w_fp8, scale, torch.float32), weight.float())


def test_zero_rows_get_scale_one_and_stay_zero() -> None:
    weight = random_weight(8, 32)
    weight[2] = 0
    weight[7] = 0
    w_fp8, scale = assert_within_e4m3(weight)
    assert scale[2] == 1 and scale[7] == 1
    restored = fp8.dequantize(w_fp8, scale)
    assert torch.equal(restored[2], torch.zeros(32, dtype=torch.bfloat16))
    assert torch.isfinite(restored).all()


def test_an_outlier_spoils_only_its_own_row() -> None:
    weight = random_weight(16, 64)
    spiked = weight.clone()
    spiked[5, 3] = 1e4
    plain_fp8, plain_scale = fp8.quantize_weight(weight)
    spiked_fp8, spiked_scale = fp8.quantize_weight(spiked)
    others = [row for row in range(16) if row != 5]
    assert torch.equal(spiked_fp8[others].view(torch.uint8), plain_fp8[others].view(torch.uint8))
    assert torch.equal(spiked_scale[others], plain_scale[others])
    spike = float(spiked[5, 3])  # 1e4 in bf16: 9984
    assert float(spiked_scale[5]) == pytest.approx(spike / fp8.E4M3_MAX, rel=1e-6)
    # The spiked row's small entries fall under its scale's resolution: that row pays.
    restored = fp8.dequantize(spiked_fp8, spiked_scale, torch.float32)
    assert float((restored[5] - spiked[5].float()).abs().max()) > 0.01
    assert_within_e4m3(spiked)  # still within the (absolute, subnormal) bound


def test_quantize_weight_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_weight(torch.ones(16))
    weight = random_weight(4, 16)
    weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        fp8.quantize_weight(weight)


# ---------------------------------------------------------------------------- activations


def test_quantize_rows_scale_per_row_without_nan() -> None:
    x = random_input(40, 256) * torch.logspace(-3, 3, 40)[:, None].bfloat16()
    x[0] = 0  # a padding row
    x_fp8, x_scale = fp8.quantize_rows(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == (40, 256)
    assert x_scale.shape == (40, 1) and x_scale.dtype == torch.float32
    values = x_fp8.float()
    assert torch.isfinite(values).all()
    assert torch.equal(values[0], torch.zeros(256))
    assert torch.equal(values[1:].abs().amax(dim=1), torch.full((39,), fp8.E4M3_MAX))
    restored = values * x_scale
    bound = error_bound(x, x_scale[:, 0])
    assert float(((restored - x.float()).abs() - bound).max()) <= 0


def test_padded_rows() -> None:
    assert [fp8.padded_rows(m, 16) for m in (0, 1, 15, 16, 17, 64)] == [0, 16, 16, 16, 32, 64]
    assert fp8.padded_rows(5, 1) == 5
    with pytest.raises(ValueError):
        fp8.padded_rows(5, 0)


def test_pad_rows_appends_zero_rows_only_when_needed() -> None:
    x = random_input(5, 32)
    padded = fp8.pad_rows(x, 16)
    assert padded.shape == (16, 32) and padded.dtype == x.dtype
    assert torch.equal(padded[:5], x)
    assert torch.equal(padded[5:], torch.zeros(11, 32, dtype=x.dtype))
    aligned = random_input(16, 32)
    assert fp8.pad_rows(aligned, 16) is aligned
    assert fp8.pad_rows(x, 1) is x


# ---------------------------------------------------------------------------- Fp8Linear


def test_cpu_fallback_is_dequantize_and_matmul() -> None:
    weight = random_weight()
    linear = fp8.Fp8Linear.from_weight(weight)
    assert linear.backend == "dequantize"
    assert (linear.out_features, linear.in_features) == (64, 128)
    x = random_input(5)
    out = linear(x)
    assert out.shape == (5, 64) and out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, fp8.dequantize(linear.weight, linear.scale)))


def test_cpu_fallback_close_to_the_bf16_product() -> None:
    weight = random_weight(256, 512)
    linear = fp8.Fp8Linear.from_weight(weight)
    x = random_input(9, 512)
    exact = x.float() @ weight.float().t()
    out = linear(x).float()
    # Rigorous: each weight error is within its E4M3 bound; plus bf16 rounding of the
    # dequantized weight (2^-9) and of the output (2^-8), with room for the accumulation.
    bound = x.float().abs() @ error_bound(weight, linear.scale).t()
    bound += 2.0**-8 * (x.float().abs() @ weight.float().abs().t()) + 2.0**-7 * exact.abs()
    assert float(((out - exact).abs() - bound).max()) <= 0
    # Typical: the relative error stays at E4M3's RMS rounding error.
    assert float((out - exact).norm() / exact.norm()) <= RMS_RELATIVE


def test_leading_dimensions_are_kept() -> None:
    linear = fp8.Fp8Linear.from_weight(random_weight(32, 64))
    x = random_input(6, 64).view(2, 3, 64)
    out = linear(x)
    assert out.shape == (2, 3, 32)
    assert torch.equal(out.view(6, 32), linear(x.view(6, 64)))


def test_bf16_activation_is_weight_only_and_never_scaled_mm() -> None:
    linear = fp8.Fp8Linear.from_weight(random_weight(), activation="bf16")
    assert linear.backend == "dequantize"
    with pytest.raises(ValueError, match="fp8 on both sides"):
        fp8.Fp8Linear.from_weight(random_weight(), activation="bf16", backend="scaled_mm")


def reference_fp8_product(x: torch.Tensor, linear: fp8.Fp8Linear) -> torch.Tensor:
    """What _scaled_mm computes, in float32: the dequantized fp8 activations times the
    dequantized fp8 weight."""
    x_fp8, x_scale = fp8.quantize_rows(x)
    restored_x = x_fp8.float() * x_scale
    return restored_x @ fp8.dequantize(linear.weight, linear.scale, torch.float32).t()


def test_scaled_mm_path_matches_its_float32_reference() -> None:
    weight = random_weight(128, 256)
    linear = fp8.Fp8Linear.from_weight(weight, backend="scaled_mm")
    assert linear.backend == "scaled_mm" and linear.row_multiple == 1
    x = random_input(7, 256)
    out = linear(x)
    assert out.shape == (7, 128) and out.dtype == torch.bfloat16
    reference = reference_fp8_product(x, linear)
    # Only the bf16 rounding of the output (2^-8 relative) and accumulation order differ.
    scale = reference.abs().amax(dim=1, keepdim=True)
    assert float(((out.float() - reference).abs() / scale).max()) <= 2.0**-8
    # Both sides quantized: further from the exact product than weight-only, still E4M3-sized.
    exact = x.float() @ weight.float().t()
    relative = float((out.float() - exact).norm() / exact.norm())
    assert relative <= 2 * RMS_RELATIVE


def test_scaled_mm_receives_the_layouts_cuda_requires(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = torch._scaled_mm

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        a, b = args[0], args[1]
        seen.append(
            {
                "a": (tuple(a.shape), a.stride(), a.dtype),
                "b": (tuple(b.shape), b.stride(), b.dtype),
                "scale_a": (tuple(kwargs["scale_a"].shape), kwargs["scale_a"].is_contiguous()),
                "scale_b": (tuple(kwargs["scale_b"].shape), kwargs["scale_b"].is_contiguous()),
                "scale_dtypes": (kwargs["scale_a"].dtype, kwargs["scale_b"].dtype),
                "out_dtype": kwargs["out_dtype"],
            }
        )
        return real(*args, **kwargs)

    linear = fp8.Fp8Linear.from_weight(random_weight(48, 32), backend="scaled_mm")
    monkeypatch.setattr(torch, "_scaled_mm", recording)
    linear(random_input(3, 32))
    e4m3 = torch.float8_e4m3fn
    assert seen == [
        {
            "a": ((3, 32), (32, 1), e4m3),  # row-major
            "b": ((32, 48), (1, 32), e4m3),  # column-major: the weight's transpose view
            "scale_a": ((3, 1), True),
            "scale_b": ((1, 48), True),
            "scale_dtypes": (torch.float32, torch.float32),
            "out_dtype": torch.bfloat16,
        }
    ]


def test_rows_are_padded_when_scaled_mm_needs_multiples_of_16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows_seen: list[int] = []
    real = torch._scaled_mm

    def needs_16_rows(*args: Any, **kwargs: Any) -> torch.Tensor:
        if args[0].shape[0] % 16:
            raise RuntimeError("mat1 rows must be divisible by 16")
        rows_seen.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", needs_16_rows)
    linear = fp8.Fp8Linear.from_weight(random_weight(), backend="scaled_mm")
    assert linear.row_multiple == 16
    x = random_input(5)
    out = linear(x)
    assert out.shape == (5, 64) and out.is_contiguous()
    assert rows_seen[-1] == 16
    monkeypatch.setattr(torch, "_scaled_mm", real)
    fp8.scaled_mm_row_multiple.cache_clear()
    unpadded = fp8.Fp8Linear(linear.weight, linear.scale, backend="scaled_mm")
    assert unpadded.row_multiple == 1
    assert torch.allclose(out.float(), unpadded(x).float(), rtol=0, atol=1e-6)


def test_probe_finds_any_row_count_on_this_torch() -> None:
    assert fp8.scaled_mm_row_multiple(torch.device("cpu")) == 1


def test_probe_raises_when_row_wise_scaling_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("Rowwise scaling is not currently supported on your device")

    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    with pytest.raises(RuntimeError, match="M=1: Rowwise.*M=16: Rowwise"):
        fp8.scaled_mm_row_multiple(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="does not run"):
        fp8.Fp8Linear.from_weight(random_weight(), backend="scaled_mm")
    # "auto" on a device that claims support falls back instead.
    monkeypatch.setattr(fp8, "supported", lambda device: True)
    assert fp8.Fp8Linear.from_weight(random_weight()).backend == "dequantize"


def test_auto_picks_scaled_mm_where_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "supported", lambda device: True)
    assert fp8.Fp8Linear.from_weight(random_weight()).backend == "scaled_mm"
    # Shapes _scaled_mm cannot take fall back under auto, and are refused when asked for.
    assert fp8.Fp8Linear.from_weight(random_weight(64, 120)).backend == "dequantize"
    with pytest.raises(ValueError, match="divisible by 16"):
        fp8.Fp8Linear.from_weight(random_weight(40, 128), backend="scaled_mm")


def test_constructor_validates() -> None:
    w_fp8, scale = fp8.quantize_weight(random_weight())
    with pytest.raises(ValueError, match="activation"):
        fp8.Fp8Linear(w_fp8, scale, activation="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        fp8.Fp8Linear(w_fp8, scale, backend="cublas")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.Fp8Linear(random_weight(), scale)
    with pytest.raises(ValueError, match="scale"):
        fp8.Fp8Linear(w_fp8, scale[:10])
    with pytest.raises(ValueError, match="scale"):
        fp8.Fp8Linear(w_fp8, scale.double())
    linear = fp8.Fp8Linear(w_fp8, scale, backend="scaled_mm")
    with pytest.raises(ValueError, match="bf16 activations"):
        linear(random_input(2).float())


def test_supported_is_false_on_cpu() -> None:
    assert fp8.supported("cpu") is False
    assert fp8.supported(torch.device("cpu")) is False


@pytest.mark.parametrize(
    ("capability", "expected"), [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)]
)
def test_supported_follows_compute_capability(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert fp8.supported("cuda") is expected
    assert fp8.supported("cpu") is False
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert fp8.supported("cuda") is False


# ---------------------------------------------------------------------------- bench.fp8_gemm


def test_bench_decode_gemms_are_codellama_7b() -> None:
    shapes = {g.name: (g.in_features, g.out_features) for g in fp8_gemm.decode_gemms()}
    assert shapes == {
        "qkv": (4096, 12288),
        "o": (4096, 4096),
        "gate_up": (4096, 22016),
        "down": (11008, 4096),
    }


def test_bench_weight_copies_cover_the_l2_cache() -> None:
    l2 = 50 * 2**20
    assert fp8_gemm.weight_copies(4096 * 4096, l2) == 13  # o in fp8: 16 MiB
    assert fp8_gemm.weight_copies(32016 * 4096, l2) == 2  # at least two
    assert fp8_gemm.weight_copies(1 << 20, l2) == 16  # capped


def test_bench_max_relative_error() -> None:
    ref = torch.tensor([[1.0, -4.0, 2.0], [0.0, 0.0, 0.0]])
    out = torch.tensor([[1.0, -4.5, 2.0], [0.0, 0.0, 0.0]])
    assert fp8_gemm.max_relative_error(out, ref) == pytest.approx(0.125)
    assert fp8_gemm.max_relative_error(torch.ones(2), torch.zeros(2)) == math.inf
    assert fp8_gemm.max_relative_error(ref.bfloat16(), ref) == 0.0


def test_bench_first_split_fills_the_card() -> None:
    o, gate_up, down = (g for g in fp8_gemm.decode_gemms() if g.name in ("o", "gate_up", "down"))
    assert fp8_gemm.first_split(16, o, (64, 256, 4, 4), sms=132) == 6  # 64 programs x 6 >= 264
    assert fp8_gemm.first_split(16, gate_up, (64, 256, 4, 4), sms=132) == 1  # 344 already
    assert fp8_gemm.first_split(64, down, (128, 512, 4, 3), sms=132) == 8  # 32 x 8 (22 blocks)


def test_bench_compile_tasks_cover_every_variant_once() -> None:
    gemms = fp8_gemm.decode_gemms()
    tiles = ((64, 256, 4, 4), (64, 512, 4, 3))
    tasks = fp8_gemm.compile_tasks(gemms, [1, 2, 24, 64], ["bf16", "fp8"], tiles)
    splitk = [t for t in tasks if t["kind"] == "splitk"]
    # 2 modes x 3 row tiles x (1 + 2 K parities: 11008 is not a multiple of 512) x 2 splits
    assert len(splitk) == 2 * 3 * 3 * 2
    assert {t["k"] % t["config"]["block_k"] == 0 for t in splitk} == {True, False}
    dots = [t for t in tasks if t["kind"] == "dot"]
    assert {tuple(t["ms"]) for t in dots} == {(2,), (24,), (64,)}
    assert [t["kind"] for t in tasks].count("gemv") == 1
    keys = [bench_compile.task_key(t) for t in tasks]
    assert len(set(keys)) == len(keys)


def choice_row(shape: str, m: int, path: str, us: float | None, **extra: Any) -> dict[str, Any]:
    row = {"shape": shape, "n": 64, "k": 64, "m": m, "path": path, "us": us, "err": 0.001}
    row |= {"label": extra.pop("label", path), "config": extra.pop("config", None)}
    return row | extra


def test_bench_choice_picks_per_policy_and_builds_routes() -> None:
    rows = []
    for shape in ("a", "b"):
        rows += [choice_row(shape, 1, "bf16", 10), choice_row(shape, 1, "gemv", 6)]
        rows += [choice_row(shape, 1, "splitk_bf16", 7)]
        for m in (2, 16):
            rows += [choice_row(shape, m, "bf16", 10), choice_row(shape, m, "dot", 8)]
            rows += [choice_row(shape, m, "splitk_f16", 6), choice_row(shape, m, "splitk_fp8", 5)]
        rows += [choice_row(shape, 64, "bf16", 10), choice_row(shape, 64, "splitk_f16", 11)]
        rows += [choice_row(shape, 64, "splitk_fp8", 7)]
        rows += [choice_row(shape, 512, "bf16", 50), choice_row(shape, 512, "dequantize", 60)]
        rows += [choice_row(shape, 512, "scaled_mm", 30)]
    rows.append(choice_row("a", 2, "splitk_f16", 1, err=0.5))  # wrong: never chosen
    rows.append(choice_row("a", 2, "splitk_bf16", None))  # failed
    result = fp8_choice.choose(rows, ["a", "b"], [1, 2, 16, 64, 512])
    assert result["per_m"][2] == {"bf16": 20, "dot": 16, "splitk_f16": 12, "splitk_fp8": 10}
    policies = result["policies"]
    assert policies["exact, no twin"]["routes"] == (
        (1, "gemv"), (64, "splitk_f16"), (UNLIMITED, "dequantize"),
    )  # fmt: skip
    assert policies["exact, twin allowed"]["routes"] == (
        (1, "gemv"), (16, "splitk_f16"), (UNLIMITED, "bf16"),
    )  # fmt: skip
    assert policies["E4M3 rows, no twin"]["routes"] == (
        (1, "gemv"), (64, "splitk_fp8"), (UNLIMITED, "scaled_mm"),
    )  # fmt: skip
    assert policies["exact, no twin"]["vs_bf16"][2] == pytest.approx(20 / 12)
    for policy in policies.values():
        check_routes(policy["routes"])
        namespace = {"UNLIMITED": UNLIMITED}
        exec(fp8_choice.routes_literal(policy["routes"]), namespace)
        assert namespace["ROUTES"] == policy["routes"]
    assert fp8_choice.routes_from([(1, "splitk_bf16"), (2, "gemv"), (4, None)]) == (
        (1, "splitk_bf16"), (UNLIMITED, "dot"),
    )  # fmt: skip


def test_bench_pretuned_takes_the_config_fastest_over_its_row_tile() -> None:
    fast, slow = (
        {"block_m": 16, "block_n": 64, "block_k": 256, "split_k": s, "num_warps": 4,
         "num_stages": 4} for s in (2, 4)
    )  # fmt: skip
    rows = [
        choice_row("a", 2, "splitk_f16", 5, config=fast, label="fast"),
        choice_row("a", 16, "splitk_f16", 9, config=fast, label="fast"),
        choice_row("a", 2, "splitk_f16", 6, config=slow, label="slow"),
        choice_row("a", 16, "splitk_f16", 6, config=slow, label="slow"),  # 12 < 14 in all
        choice_row("a", 2, "splitk_bf16", 1, config=fast, label="fast"),  # only at M=2: out
        choice_row("a", 16, "splitk_bf16", 7, config=slow, label="slow"),
        choice_row("a", 2, "splitk_bf16", 7, config=slow, label="slow"),
    ]
    chosen = fp8_choice.pretuned(rows, lambda m: 16)
    assert {key: row["label"] for key, row in chosen.items()} == {
        ("f16", 64, 64, 16): "slow",
        ("bf16", 64, 64, 16): "slow",
    }
    text = fp8_choice.pretuned_literal(chosen)
    assert "('f16', 64, 64, 16): SplitKConfig(16, 64, 256, 4, 4, 4)," in text


def test_bench_sweeps_and_reports_on_cpu() -> None:
    """The whole measurement path once, tiny shapes under Triton's interpreter, with a timer
    that runs each call once (the real one needs CUDA): a Python slip here would cost the
    GPU run."""
    gemms = [fp8_gemm.Gemm("a", 48, 64), fp8_gemm.Gemm("b", 32, 96)]
    ticks = iter(range(1, 10**6))

    def run_once(calls: Any, samples: int) -> float:
        for call in calls:
            call()
        return 100.0 / next(ticks)

    sweep = fp8_gemm.Sweep(samples=1, sms=4, skip=set(), timer=run_once)
    tiles = ((16, 32, 4, 1), (32, 16, 4, 1))
    for gemm in gemms:
        bank = fp8_gemm.Bank(gemm, copies=2, device=torch.device("cpu"))
        best = fp8_gemm.sweep_decode(sweep, bank, [1, 3, 17], ["bf16", "f16", "fp8"], tiles)
        assert {mode for mode, _ in best} == {"bf16", "f16", "fp8"}
        fp8_gemm.sweep_prefill(sweep, bank, [130], best)
    failed = [r for r in sweep.rows if r["us"] is None]
    assert not failed, failed[0]
    assert all(fp8_choice.valid(r) for r in sweep.rows)
    paths = {r["path"] for r in sweep.rows}
    assert paths == {"bf16", "gemv", "dot", "splitk_bf16", "splitk_f16", "splitk_fp8",
                     "scaled_mm", "dequantize"}  # fmt: skip
    text, summary = fp8_choice.report(
        sweep.rows, [(g.name, g.label) for g in gemms], [1, 3, 17, 130]
    )
    assert "## a 64->48" in text and "ROUTES = ((" in text and "PRETUNED = {" in text
    json.dumps({"rows": sweep.rows, "summary": summary}, default=str)


def test_bench_compile_workers_report_each_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    # One worker process on CPU (Triton's interpreter, inherited from this process): a good
    # variant passes, one whose tile Triton refuses (not a power of two) is reported.
    monkeypatch.setenv(bench_compile.DEVICE_VARIABLE, "cpu")
    good = {"kind": "splitk", "mode": "f16", "k": 64, "ms": [3],
            "config": {"block_m": 16, "block_n": 16, "block_k": 32, "split_k": 2,
                       "num_warps": 4, "num_stages": 1}}  # fmt: skip
    bad = json.loads(json.dumps(good))
    bad["config"]["block_k"] = 24
    results = bench_compile.precompile([good, bad], workers=1, budget_s=240)
    assert results[bench_compile.task_key(good)] == ""
    assert results[bench_compile.task_key(bad)] != ""


def test_bench_exits_with_a_message_without_an_fp8_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fp8_gemm.main([]) == 2
    assert "needs a CUDA GPU with FP8: no CUDA device" in capsys.readouterr().err
