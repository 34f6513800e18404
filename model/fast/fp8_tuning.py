"""Which split-K configuration runs each FP8 GEMM: chosen once per (mode, N, K, row tile).

The first call of a shape times the candidates (:data:`ENGINE_TILES` x :data:`ENGINE_SPLITS`
at its row tile) and keeps the fastest one whose output agrees with a float32 reference of
the widened weight on a slice of the output (a candidate that fails to compile, or computes
something else, is never chosen). That first call is the decode graphs' warm-up step, which
runs outside the capture (``DecodeGraphs.capture``); a call made inside a capture without one
takes the first candidate and tunes later. ``bench.fp8_gemm``'s sweep prints the winners on
the H200 as a :data:`PRETUNED` table, which skips the timing for the shapes it lists.

On CPU (Triton's interpreter, the tests) nothing is timed: :func:`interpreted_config`.
"""

from __future__ import annotations

import functools
import logging
import statistics
from collections.abc import Callable, Sequence

import torch

from model import fp8
from model.fast.fp8_splitk import (
    SplitKConfig,
    block_m_for,
    capturing,
    splitk_matmul,
    splits_that_fit,
)

log = logging.getLogger(__name__)

# (block_n, block_k, num_warps, num_stages) tried at each row tile, then each split below.
ENGINE_TILES: tuple[tuple[int, int, int, int], ...] = (
    (64, 256, 4, 4),
    (64, 128, 4, 6),
    (128, 128, 4, 4),
    (128, 256, 8, 3),
)
ENGINE_SPLITS: tuple[int, ...] = (1, 2, 4, 8)

# (mode, N, K, block_m) -> the configuration the H200 sweep found fastest (bench.fp8_gemm
# prints this table); shapes not listed are timed on their first call. These are the
# exact ("bf16") mode's winners at CodeLlama-7B's shapes from the sweep at commit a58e1cb
# (bench/RESULTS.md, "FP8 GEMMs after split-K"); other cards still time their own.
PRETUNED: dict[tuple[str, int, int, int], SplitKConfig] = {
    ("bf16", 4096, 4096, 16): SplitKConfig(16, 64, 256, 4, 4, 3),
    ("bf16", 4096, 4096, 32): SplitKConfig(32, 64, 128, 4, 4, 4),
    ("bf16", 4096, 4096, 64): SplitKConfig(64, 64, 128, 2, 4, 4),
    ("bf16", 4096, 11008, 16): SplitKConfig(16, 64, 256, 4, 4, 3),
    ("bf16", 4096, 11008, 32): SplitKConfig(32, 64, 128, 4, 4, 4),
    ("bf16", 4096, 11008, 64): SplitKConfig(64, 64, 128, 4, 4, 4),
    ("bf16", 12288, 4096, 16): SplitKConfig(16, 64, 256, 2, 4, 3),
    ("bf16", 12288, 4096, 32): SplitKConfig(32, 64, 128, 2, 4, 4),
    ("bf16", 12288, 4096, 64): SplitKConfig(64, 64, 128, 1, 4, 4),
    ("bf16", 22016, 4096, 16): SplitKConfig(16, 64, 256, 1, 4, 3),
    ("bf16", 22016, 4096, 32): SplitKConfig(32, 64, 128, 1, 4, 4),
    ("bf16", 22016, 4096, 64): SplitKConfig(64, 128, 128, 3, 8, 4),
}

# The largest difference to the reference, over the reference's largest magnitude, that a
# candidate may show: bf16 output rounding for the exact modes, E4M3 rows for "fp8".
TOLERANCE = {"bf16": 0.02, "f16": 0.02, "fp8": 0.15}
# Output channels checked against the reference (the first and the last ones).
CHECKED_CHANNELS = 256
TIMED_RUNS = 10
# An L2-sized write between timed runs, so each run reads its weight from memory as in a
# decode step (64 MiB covers the H100's and H200's 50 MB).
FLUSH_BYTES = 64 * 2**20


def candidates(block_m: int) -> list[SplitKConfig]:
    """The engine's configurations at one row tile, in the order they are tried."""
    return [
        SplitKConfig(block_m, block_n, block_k, split, warps, stages)
        for block_n, block_k, warps, stages in ENGINE_TILES
        for split in ENGINE_SPLITS
    ]


def interpreted_config(rows: int, k: int) -> SplitKConfig:
    """The one configuration used under Triton's interpreter: small tiles (the interpreter
    runs a program at a time) and two K splits where K allows, so the tests cover the
    split-K reduction on the engine's path too."""
    return SplitKConfig(block_m_for(rows), 16, 32, splits_that_fit(k, 32, 2))


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got - ref| / max|ref|`` in float32 (0 for an all-zero reference and output)."""
    diff = float((got.float() - ref.float()).abs().max()) if got.numel() else 0.0
    scale = float(ref.float().abs().max()) if ref.numel() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def checked_channels(n: int) -> torch.Tensor:
    """The output channels a candidate is checked on: the first and the last
    :data:`CHECKED_CHANNELS` (all of them for a small N)."""
    if n <= 2 * CHECKED_CHANNELS:
        return torch.arange(n)
    return torch.cat([torch.arange(CHECKED_CHANNELS), torch.arange(n - CHECKED_CHANNELS, n)])


def reference_slice(
    rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, channels: torch.Tensor
) -> torch.Tensor:
    """``rows @ widened(weight[channels]).T`` in float32."""
    picked = channels.to(weight.device)
    widened = fp8.dequantize(weight[picked], scale[picked], torch.float32)
    return rows.float() @ widened.t()


def _median_us(run: Callable[[], object], flush: torch.Tensor | None) -> float:
    times = []
    for _ in range(TIMED_RUNS):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def time_candidates(
    rows: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    mode: str,
    configs: Sequence[SplitKConfig],
) -> list[tuple[SplitKConfig, float | None, str]]:
    """Each config's median microseconds (None when it failed) and why it failed, on CUDA."""
    channels = checked_channels(weight.shape[0])
    ref = reference_slice(rows, weight, scale, channels)
    try:
        flush: torch.Tensor | None = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=rows.device)
    except torch.OutOfMemoryError:
        flush = None  # timed with the weight partly in L2: a rougher choice, still a valid one
    results: list[tuple[SplitKConfig, float | None, str]] = []
    for config in configs:
        try:
            out = splitk_matmul(rows, weight, scale, mode, config)
            error = relative_error(out[:, channels.to(out.device)], ref)
            if not error <= TOLERANCE[mode]:
                results.append((config, None, f"error {error:.3g}"))
                continue
            us = _median_us(
                functools.partial(splitk_matmul, rows, weight, scale, mode, config), flush
            )
        except Exception as exc:  # a config that does not compile or launch is skipped
            results.append((config, None, f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        results.append((config, us, ""))
    return results


class Tuner:
    """The chosen configuration per (mode, N, K, row tile), filled on first calls."""

    def __init__(self) -> None:
        self.chosen: dict[tuple[str, int, int, int], SplitKConfig] = dict(PRETUNED)

    def config_for(
        self, mode: str, rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
    ) -> SplitKConfig:
        m, (n, k) = rows.shape[0], weight.shape
        if rows.device.type != "cuda":
            return interpreted_config(m, k)
        block_m = block_m_for(m)
        key = (mode, n, k, block_m)
        config = self.chosen.get(key)
        if config is not None:
            return config
        tried = candidates(block_m)
        if capturing(rows.device):
            log.warning("FP8 GEMM %s first called inside a CUDA graph capture: untuned", key)
            return tried[0]
        best = pick(key, time_candidates(rows, weight, scale, mode, tried))
        self.chosen[key] = best
        return best


def pick(
    key: tuple[str, int, int, int], timed: Sequence[tuple[SplitKConfig, float | None, str]]
) -> SplitKConfig:
    """The fastest configuration of ``timed`` that ran and agreed with the reference;
    ``RuntimeError`` naming every failure when none did."""
    ok = [(us, config) for config, us, _ in timed if us is not None]
    if not ok:
        reasons = "; ".join(f"{config.label()}: {why}" for config, _, why in timed)
        raise RuntimeError(f"no split-K configuration runs {key}: {reasons}")
    best_us, best = min(ok, key=lambda pair: pair[0])
    log.info("FP8 GEMM %s: %s, %.1f us", key, best.label(), best_us)
    return best


TUNER = Tuner()
