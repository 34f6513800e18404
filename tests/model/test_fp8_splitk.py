"""model.fast.fp8_splitk / fp8_tuning / fp8_prefill: the split-K FP8 GEMM (under Triton's
interpreter on CPU) in its three modes against float references, its workspace and counters,
the tuner's choice, and the prefill paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import fp8
from model.fast import fp8_prefill, fp8_splitk, fp8_tuning
from model.fast.fp8_splitk import SplitKConfig, splitk_matmul


def quantized(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16) * 0.05
    weight[n // 2] *= 40  # one loud channel: its own scale
    w_fp8, scale = fp8.quantize_weight(weight)
    return weight, w_fp8, scale


def rows_of(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def widened_product(x: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), fp8.dequantize(w_fp8, scale, torch.float32))


def blockwise_e4m3(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """What MODE_FP8 multiplies with: each row's ``block_k`` block rounded to E4M3 with the
    scale absmax/448, widened back (float32)."""
    out = torch.empty(x.shape, dtype=torch.float32)
    for start in range(0, x.shape[1], block_k):
        block = x[:, start : start + block_k].float()
        amax = block.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        rounded = (block * (448.0 / amax)).to(torch.float8_e4m3fn).float()
        out[:, start : start + block_k] = rounded * (amax / 448.0)
    return out


# (M, N, K, config): odd M, M not a multiple of 16, several row tiles, N not a multiple of the
# channel tile, K not a multiple of the K block, K blocks that the splits don't divide evenly
# (5 blocks in 2 or 3 splits), more splits than K blocks (clamped), one row.
SHAPES = [
    (5, 48, 96, SplitKConfig(16, 16, 32, 1)),
    (17, 40, 96, SplitKConfig(32, 16, 32, 2)),
    (33, 24, 64, SplitKConfig(16, 16, 32, 1)),
    (3, 64, 80, SplitKConfig(16, 32, 16, 3)),
    (7, 32, 160, SplitKConfig(16, 16, 32, 2)),
    (1, 16, 64, SplitKConfig(16, 16, 16, 8)),
    (2, 16, 48, SplitKConfig(16, 16, 32, 8)),
]


@pytest.mark.parametrize("mode", ["bf16", "f16"])
@pytest.mark.parametrize(("m", "n", "k", "config"), SHAPES)
def test_the_exact_modes_match_the_widened_weight(
    mode: str, m: int, n: int, k: int, config: SplitKConfig
) -> None:
    _, w_fp8, scale = quantized(n, k, seed=m + n + k)
    x = rows_of(m, k, seed=m)
    got = splitk_matmul(x, w_fp8, scale, mode, config)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # fp32 accumulation of the exact products, then one bf16 rounding (2^-8 relative).
    torch.testing.assert_close(got.float(), widened_product(x, w_fp8, scale), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize(("m", "n", "k", "config"), SHAPES)
def test_the_fp8_mode_multiplies_blockwise_e4m3_rows(
    m: int, n: int, k: int, config: SplitKConfig
) -> None:
    weight, w_fp8, scale = quantized(n, k, seed=m * n + k)
    x = rows_of(m, k, seed=m + 1)
    got = splitk_matmul(x, w_fp8, scale, "fp8", config).float()
    emulated = F.linear(
        blockwise_e4m3(x, config.block_k), fp8.dequantize(w_fp8, scale, torch.float32)
    )
    torch.testing.assert_close(got, emulated, rtol=8e-3, atol=1e-2)
    # And near the unquantized product: E4M3 on both sides (2^-4 relative each, few terms).
    exact = F.linear(x.float(), weight.float())
    assert (got - exact).norm() / exact.norm() < 0.15


def test_split_k_adds_the_same_products_as_one_program() -> None:
    _, w_fp8, scale = quantized(32, 256, seed=3)
    x = rows_of(9, 256, seed=4)
    whole = splitk_matmul(x, w_fp8, scale, "bf16", SplitKConfig(16, 16, 32, 1))
    for split in (2, 3, 8):
        parts = splitk_matmul(x, w_fp8, scale, "bf16", SplitKConfig(16, 16, 32, split))
        torch.testing.assert_close(parts, whole, rtol=8e-3, atol=8e-3)


def test_the_counters_are_zero_again_and_the_workspace_is_shared() -> None:
    _, w_fp8, scale = quantized(48, 128, seed=5)
    x = rows_of(20, 128, seed=6)
    splitk_matmul(x, w_fp8, scale, "bf16", SplitKConfig(16, 16, 32, 4))
    shared = fp8_splitk.scratch(torch.device("cpu"))
    assert int(shared.counters.abs().sum()) == 0  # the last program of each tile reset it
    assert shared.workspace.numel() >= 4 * 20 * 48
    # Another shape right after reuses them and is still right.
    _, w2, s2 = quantized(16, 64, seed=7)
    x2 = rows_of(3, 64, seed=8)
    got = splitk_matmul(x2, w2, s2, "f16", SplitKConfig(16, 16, 16, 4))
    torch.testing.assert_close(got.float(), widened_product(x2, w2, s2), rtol=8e-3, atol=1e-2)
    assert int(shared.counters.abs().sum()) == 0


def test_inside_a_capture_a_small_workspace_means_one_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = torch.device("cpu")
    monkeypatch.setitem(fp8_splitk._SCRATCH, device, fp8_splitk._Scratch(device))
    monkeypatch.setattr(fp8_splitk, "capturing", lambda device: True)
    _, w_fp8, scale = quantized(32, 128, seed=9)
    x = rows_of(4, 128, seed=10)
    got = splitk_matmul(x, w_fp8, scale, "bf16", SplitKConfig(16, 16, 32, 4))
    assert fp8_splitk.scratch(device).workspace.numel() == 0  # not grown inside the capture
    torch.testing.assert_close(got.float(), widened_product(x, w_fp8, scale), rtol=8e-3, atol=1e-2)


def test_the_f16_mode_survives_rows_beyond_fp16s_range() -> None:
    # 1e6 overflows fp16 (65504): the power-of-two block scale is what keeps it finite.
    _, w_fp8, scale = quantized(16, 64, seed=11)
    x = rows_of(3, 64, seed=12) * 1e6
    got = splitk_matmul(x, w_fp8, scale, "f16", SplitKConfig(16, 16, 32, 1))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), widened_product(x, w_fp8, scale), rtol=8e-3, atol=1e4)


def test_the_bit_moves_widen_every_e4m3_value_exactly() -> None:
    # The assembly's steps on one lane, then x 2^120: torch's own E4M3 -> float conversion,
    # for every byte but the two NaNs (0x7F, 0xFF), subnormals and signed zeros included.
    codes = [b for b in range(256) if b not in (0x7F, 0xFF)]
    reference = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    bits = torch.tensor([fp8_splitk.e4m3_to_bf16_bits(b) for b in codes], dtype=torch.int32)
    widened = bits.to(torch.int16).view(torch.bfloat16).float() * 2.0**120  # wraps to sign
    assert torch.equal(widened, reference)
    assert torch.equal(torch.signbit(widened), torch.signbit(reference))


def test_k_ranges_cover_k_once() -> None:
    for k, block_k, split in [
        (96, 32, 2),
        (160, 32, 3),
        (11008, 256, 8),
        (4096, 256, 8),
        (80, 16, 3),
    ]:
        split = fp8_splitk.splits_that_fit(k, block_k, split)
        step = fp8_splitk.k_per_split(k, block_k, split)
        assert step % block_k == 0
        covered = [kk for s in range(split) for kk in range(s * step, min(k, (s + 1) * step))]
        assert covered == list(range(k))
    assert fp8_splitk.splits_that_fit(64, 32, 8) == 2


# ------------------------------------------------------------------------------ the tuner


def test_the_tuner_picks_the_fastest_config_that_ran() -> None:
    slow, fast, wrong = (SplitKConfig(16, 64, 256, s) for s in (1, 2, 4))
    timed = [(slow, 12.0, ""), (wrong, None, "error 0.5"), (fast, 7.5, "")]
    assert fp8_tuning.pick(("bf16", 4096, 4096, 16), timed) == fast
    with pytest.raises(RuntimeError, match="error 0.5"):
        fp8_tuning.pick(("bf16", 4096, 4096, 16), [(wrong, None, "error 0.5")])


def test_the_tuner_on_cpu_takes_the_interpreted_config() -> None:
    _, w_fp8, scale = quantized(32, 96, seed=13)
    config = fp8_tuning.TUNER.config_for("bf16", rows_of(17, 96, seed=1), w_fp8, scale)
    assert config == SplitKConfig(32, 16, 32, 2)
    assert fp8_tuning.interpreted_config(1, 16) == SplitKConfig(16, 16, 32, 1)
    assert fp8_tuning.candidates(64)[0].block_m == 64
    assert len(fp8_tuning.candidates(16)) == len(fp8_tuning.ENGINE_TILES) * len(
        fp8_tuning.ENGINE_SPLITS
    )


def test_checked_channels_and_relative_error() -> None:
    assert fp8_tuning.checked_channels(100).tolist() == list(range(100))
    picked = fp8_tuning.checked_channels(4096)
    assert picked[:2].tolist() == [0, 1] and picked[-1] == 4095 and len(picked) == 512
    ref = torch.tensor([[2.0, -4.0]])
    assert fp8_tuning.relative_error(torch.tensor([[2.0, -3.0]]), ref) == 0.25
    assert fp8_tuning.relative_error(torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0


# ------------------------------------------------------------------------- prefill paths


def test_the_scratch_path_is_the_widened_weights_matmul() -> None:
    _, w_fp8, scale = quantized(48, 64, seed=14)
    x = rows_of(130, 64, seed=15)
    got = fp8_prefill.dequantize_matmul(x, w_fp8, scale)
    assert torch.equal(got, F.linear(x, fp8.dequantize(w_fp8, scale, torch.bfloat16)))
    # A smaller weight reuses the buffer; a larger one grows it.
    held = fp8_prefill.scratch_bytes()
    _, small, small_scale = quantized(16, 64, seed=16)
    fp8_prefill.dequantize_matmul(x, small, small_scale)
    assert fp8_prefill.scratch_bytes() == held


def test_the_scaled_mm_path_quantizes_rows_per_token() -> None:
    _, w_fp8, scale = quantized(48, 64, seed=17)
    layer = fp8_prefill.scaled_mm_linear(w_fp8, scale)
    assert layer is not None and layer.weight is w_fp8  # the same tensor, no copy
    x = rows_of(130, 64, seed=18)
    x_fp8, x_scale = fp8.quantize_rows(x)
    emulated = F.linear(x_fp8.float() * x_scale, fp8.dequantize(w_fp8, scale, torch.float32))
    torch.testing.assert_close(layer(x).float(), emulated, rtol=8e-3, atol=1e-2)
    assert fp8_prefill.scaled_mm_linear(w_fp8[:, :40].contiguous(), scale) is None  # K % 16
