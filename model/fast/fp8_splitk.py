"""FP8 weights at 2-64 rows: a split-K Triton GEMM with the weight on the MMA's wide side.

Why a second kernel next to :mod:`model.fast.fp8_gemm`'s dot kernel (bench/RESULTS.md, "FP8
weights (H200)": 1.08-1.16x of bf16 at 8-16 rows, 0.63x at 64, 1.3-2.4 TB/s of its one-byte
weights out of ~4.8):

- **swap AB**: it computes ``y.T = W @ x.T``, so the weight's output channels fill the MMA's
  64-row side (Hopper's wgmma takes that operand from registers, where the widened weight
  already is) and the 2-64 rows are the narrow side (16-64). The dot kernel had it the other
  way round: its widened weight went back to shared memory before every MMA;
- **widening without F2F**: Triton widens E4M3 to bf16 through fp16 (one quarter-rate F2F per
  element), about 16 weights a clock per SM, ~4 TB/s on an H200: the kernel's ceiling. Here
  the weight is widened by moving bits (:func:`_e4m3_to_bf16`: byte permutes, shifts and one
  bf16 multiply by 2^120 per pair, exact, E4M3 NaN excepted) or by the hardware's
  E4M3->fp16 conversion (``MODE_F16``: two values an instruction, with the rows taken to fp16
  with a power-of-two scale per row and K block, which is exact unless a value sits 2^28 below
  its block's largest), or not at all (``MODE_FP8``: the rows quantized to E4M3 per row and K
  block and the FP8 x FP8 tensor cores, the one mode that changes the numerics, by the rows'
  E4M3 rounding);
- **split K**: at N = 4096 a 64-channel strip gives 64 programs on a 132-SM card; ``split_k``
  programs share each strip's K range. Each writes its float32 partial to a workspace, and the
  last one to finish a tile (a per-tile counter) adds the partials in split order, scales and
  stores the tile: one kernel, deterministic, and the counter is left at zero for the next
  call. The workspace and counters are allocated once per device and grown outside CUDA graph
  capture (:func:`splitk_matmul` falls back to ``split_k=1`` inside a capture that would need
  more).

Per-output-channel scales (:func:`model.fp8.quantize_weight`) are applied once per tile. On CPU
(tests) Triton's interpreter runs the same kernel with float32 dots (its bf16 dot is wrong and
it has no inline assembly), so everything but the widening instructions is tested there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU installs without Triton: the engine widens the weight instead
    HAVE_TRITON = False

log = logging.getLogger(__name__)

# How the product is formed (the kernel's MODE constant).
MODE_BF16 = 0  # weight widened to bf16 by bit moves, bf16 rows: the dot kernel's numerics
MODE_F16 = 1  # weight widened to fp16 by the hardware, rows to fp16 per power-of-two block
MODE_FP8 = 2  # rows quantized to E4M3 per row and K block, FP8 x FP8 tensor cores
MODES = {"bf16": MODE_BF16, "f16": MODE_F16, "fp8": MODE_FP8}

# The rows' tile is the MMA's narrow side: at least 16 (tl.dot's minimum).
MIN_BLOCK_M = 16
MAX_BLOCK_M = 64
# Counters for this many (row tile, channel tile) pairs are allocated up front.
INITIAL_COUNTERS = 1 << 14


@dataclass(frozen=True)
class SplitKConfig:
    """One launch configuration: tile sizes, how many programs share a strip's K range, and
    Triton's warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        return (
            f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
            f"w{self.num_warps}p{self.num_stages}"
        )


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_m_for(rows: int) -> int:
    """The row tile for ``rows`` rows: the next power of two from 16 up to 64."""
    block = MIN_BLOCK_M
    while block < rows and block < MAX_BLOCK_M:
        block *= 2
    return block


def splits_that_fit(k: int, block_k: int, split_k: int) -> int:
    """``split_k`` limited to the number of ``block_k`` blocks of ``k`` (each split gets one at
    least)."""
    return max(1, min(split_k, -(-k // block_k)))


def k_per_split(k: int, block_k: int, split_k: int) -> int:
    """The K range of one split: whole blocks, the last split taking what is left."""
    blocks = -(-k // block_k)
    return -(-blocks // split_k) * block_k


def e4m3_to_bf16_bits(byte: int) -> int:
    """The bf16 bit pattern :func:`_e4m3_to_bf16`'s assembly builds for one E4M3 byte before
    its multiply by 2^120, the same steps on one lane (the tests check it against torch's
    conversion for all 256 bytes)."""
    lane = byte << 8
    return (lane & 0x8000) | ((lane >> 4) & 0x07F0)


if HAVE_TRITON:
    # E4M3 -> bf16 on four values at a time (one register of bytes in, two of bf16 pairs out).
    # prmt puts each byte in the high half of a 16-bit lane (sign at bit 15, the 7 exponent and
    # mantissa bits at 8..14); the shift moves those 7 bits to bf16's bits 4..10, so the lane reads
    # as the E4M3 value times 2^-120 (exponent field and mantissa carried over, subnormals too);
    # the multiply by 2^120 (0x7B80) makes it exact. -0.0 as the addend keeps the sign of zeros.
    @triton.jit
    def _e4m3_to_bf16(w):
        return tl.inline_asm_elementwise(
            """
            {
            .reg .b32 lane, shifted, two120, negzero;
            prmt.b32 lane, $1, 0, 0x1404;
            shr.b32 shifted, lane, 4;
            and.b32 shifted, shifted, 0x07F007F0;
            and.b32 lane, lane, 0x80008000;
            or.b32 lane, lane, shifted;
            mov.b32 two120, 0x7B807B80;
            mov.b32 negzero, 0x80008000;
            fma.rn.bf16x2 $0, lane, two120, negzero;
            }
            """,
            "=r,r",
            [w.to(tl.uint8, bitcast=True)],
            dtype=tl.bfloat16,
            is_pure=True,
            pack=2,
        )

    @triton.jit
    def _round_to_e4m3(v):
        # float32 -> the nearest E4M3 value (ties to even, saturating), still in float32: what
        # the GPU's cvt.rn.satfinite does. Only for the interpreter, whose own float8 cast is
        # wrong where rounding carries into the exponent (127.4 -> 64) and for subnormals.
        magnitude = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        lsb = (magnitude >> 20) & 1  # the last of the 3 mantissa bits kept
        normal = ((magnitude + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
        # Below 2^-6 E4M3 steps by 2^-9: adding 2^14 (whose float32 step is 2^-9) rounds so.
        subnormal = (tl.abs(v) + 16384.0) - 16384.0
        rounded = tl.minimum(tl.where(tl.abs(v) < 0.015625, subnormal, normal), 448.0)
        return tl.where(v < 0, -rounded, rounded)

    @triton.jit
    def _accumulate(acc, w, x, MODE: tl.constexpr, INTERPRET: tl.constexpr):
        # acc (BLOCK_N, BLOCK_M) += w (BLOCK_N, BLOCK_K) @ x.T (BLOCK_K, BLOCK_M)
        if MODE == 0:
            if INTERPRET:
                acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)))
            else:
                acc = tl.dot(_e4m3_to_bf16(w), tl.trans(x), acc)
        elif MODE == 1:
            # Each row's block to fp16 with a power-of-two scale 2^(e-14) from its largest
            # value's exponent e: the block's largest lands in [2^14, 2^15), far from fp16's
            # 65504, and the scaling itself is exact.
            xf = x.to(tl.float32)
            amax = tl.max(tl.abs(xf), axis=1)
            biased = tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 14, 1)
            block_scale = (biased << 23).to(tl.float32, bitcast=True)
            inverse = ((254 - biased) << 23).to(tl.float32, bitcast=True)
            xh = (xf * inverse[:, None]).to(tl.float16)
            if INTERPRET:
                part = tl.dot(w.to(tl.float32), tl.trans(xh.to(tl.float32)))
            else:
                part = tl.dot(w.to(tl.float16), tl.trans(xh))
            acc += part * block_scale[None, :]
        else:
            # Each row's block to E4M3 with its own scale absmax/448, as model.fp8.quantize_rows
            # does per row: a block's outlier costs precision in that block only.
            xf = x.to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-12)
            xs = xf * (448.0 / amax)[:, None]
            if INTERPRET:
                part = tl.dot(w.to(tl.float32), tl.trans(_round_to_e4m3(xs)))
            else:
                part = tl.dot(w, tl.trans(xs.to(tl.float8e4nv)))
            acc += part * (amax / 448.0)[None, :]
        return acc

    @triton.jit(do_not_specialize=["M"])
    def fp8_splitk_gemm(
        x_ptr,
        w_ptr,
        scale_ptr,
        y_ptr,
        ws_ptr,
        counter_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        k_per_split,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        MODE: tl.constexpr,
        SPLIT: tl.constexpr,
        EVEN_K: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        # Row tiles vary fastest: the programs reading one weight tile run side by side.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        # Out-of-range rows and channels load row/channel (i mod M / N): real memory, so the
        # loads need no mask; the stores drop them.
        x_rows = x_ptr + (rows % M)[:, None] * stride_xm
        w_rows = w_ptr + (cols % N)[:, None] * stride_wn
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                w = tl.load(w_rows + ks[None, :])
                x = tl.load(x_rows + ks[None, :])
            else:
                k_ok = (ks < k_end)[None, :]
                w = tl.load(w_rows + ks[None, :], mask=k_ok, other=0.0)
                x = tl.load(x_rows + ks[None, :], mask=k_ok, other=0.0)
            acc = _accumulate(acc, w, x, MODE, INTERPRET)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        out_mask = row_ok[None, :] & col_ok[:, None]
        y_ptrs = y_ptr + rows[None, :] * stride_ym + cols[:, None]
        if SPLIT:
            splits = tl.num_programs(2)
            tile = rows[None, :] * N + cols[:, None]
            tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=out_mask)
            # Every thread's partial is written before one thread's release below (the
            # barrier orders them within the program; the release makes them visible).
            tl.debug_barrier()
            counter = counter_ptr + pid_m * tl.num_programs(1) + pid_n
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == splits - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for s in range(0, splits):
                    # .cg: from L2, never a stale L1 line of an earlier call.
                    total += tl.load(
                        ws_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg"
                    )
                out = (total * scale[:, None]).to(y_ptr.dtype.element_ty)
                tl.store(y_ptrs, out, mask=out_mask)
                tl.atomic_xchg(counter, 0)  # zero again for the next call
        else:
            out = (acc * scale[:, None]).to(y_ptr.dtype.element_ty)
            tl.store(y_ptrs, out, mask=out_mask)


def _kernel() -> Any:
    if not HAVE_TRITON:
        raise RuntimeError("the FP8 split-K kernel needs Triton")
    return fp8_splitk_gemm


class _Scratch:
    """The workspace (float32 partials) and tile counters (int32, kept at zero between
    calls) of one device, shared by every call: the engine's GEMMs run one after another on
    one stream, and each call is done with them when it ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.workspace = torch.empty(0, dtype=torch.float32, device=device)
        self.counters = torch.zeros(INITIAL_COUNTERS, dtype=torch.int32, device=device)

    def fits(self, workspace: int, counters: int) -> bool:
        return self.workspace.numel() >= workspace and self.counters.numel() >= counters

    def grow(self, workspace: int, counters: int) -> None:
        if self.workspace.numel() < workspace:
            self.workspace = torch.empty(workspace, dtype=torch.float32, device=self.device)
        if self.counters.numel() < counters:
            self.counters = torch.zeros(counters, dtype=torch.int32, device=self.device)


_SCRATCH: dict[torch.device, _Scratch] = {}


def scratch(device: torch.device) -> _Scratch:
    """The device's shared split-K workspace and counters."""
    if device not in _SCRATCH:
        _SCRATCH[device] = _Scratch(device)
    return _SCRATCH[device]


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a graph (never on CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def splitk_matmul(
    rows: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    mode: str,
    config: SplitKConfig,
) -> torch.Tensor:
    """``rows @ (weight * scale[:, None]).T`` for ``rows`` (M, K) with unit stride along K, an
    E4M3 ``weight`` (N, K) and its float32 ``scale`` (N,), in ``rows``' dtype, with one launch
    of the split-K kernel in ``mode`` (``"bf16"``, ``"f16"`` or ``"fp8"``)."""
    m, k = rows.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"rows have {k} features, the weight {weight.shape[1]}")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(m, n, device=rows.device, dtype=rows.dtype)
    if m == 0:
        return out
    split = splits_that_fit(k, config.block_k, config.split_k)
    grid_m, grid_n = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
    shared = scratch(rows.device)
    if split > 1 and not shared.fits(split * m * n, grid_m * grid_n):
        if capturing(rows.device):
            # Growing here would hand the graph's pool a buffer that outlives it. The warm-up
            # run before each capture grows it, so this is only a capture without warm-up.
            log.warning("split-K workspace too small inside a CUDA graph capture: split 1")
            split = 1
        else:
            shared.grow(split * m * n, grid_m * grid_n)
    interpret = rows.device.type != "cuda"
    _kernel()[(grid_m, grid_n, split)](
        rows,
        weight,
        scale,
        out,
        shared.workspace,
        shared.counters,
        m,
        n,
        k,
        rows.stride(0),
        weight.stride(0),
        out.stride(0),
        k_per_split(k, config.block_k, split),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        MODE=MODES[mode],
        SPLIT=split > 1,
        EVEN_K=k % config.block_k == 0,
        INTERPRET=interpret,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
