"""FP8 weights at decode batch sizes: Triton kernels that read E4M3 weights and bf16 rows.

A decode step reads every weight once, so at 1-64 rows it is bound by memory bandwidth, and
weights of one byte instead of two halve its floor. ``torch._scaled_mm`` (cuBLAS/CUTLASS)
needs the activations in FP8 too, and at these shapes it is no faster than bf16 even before
the 4 extra kernels that quantize the rows (bench/RESULTS.md, "FP8 weights (H200)"). These
kernels keep the rows in bf16, one kernel per projection, no workspace, capturable in a CUDA
graph, autotuned on the graphs' warm-up step:

- one row: a GEMV, each program streaming a ``BLOCK_N x K`` strip of the FP8 weight and
  reducing it against the row with FMAs (1.74x of bf16's step GEMMs on an H200);
- 2-16 rows: the strip widened to bf16 in registers and multiplied with the rows' tile on the
  tensor cores, fp32 accumulation (1.08-1.16x);
- more rows: the layer's bf16 twin (the engine keeps it), or the widened weight.

Per-output-channel scales (:func:`model.fp8.quantize_weight`, absmax/448) are applied at the
end. On CPU (tests) Triton runs under its interpreter; :class:`Fp8Weight` falls back to
``dequantize`` + matmul where Triton or FP8 support is missing.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

from model import fp8

log = logging.getLogger(__name__)

# Rows of a decode step are padded to the dot's minimum tile (16) by masking, never copied.
MIN_BLOCK_M = 16
MAX_BLOCK_M = 64
# More rows than this (a prefill) widen the weight once and use cuBLAS: compute-bound there,
# where the extra bytes of the widened copy don't matter and cuBLAS's tiles are better.
KERNEL_MAX_ROWS = 128
# With a bf16 twin at hand (the engine keeps one), more rows than this use it: measured on
# an H200 the dot kernel beats bf16 at 2-16 rows (1.08x-1.16x of a step's GEMMs) and loses at
# 32-64 (0.93x / 0.63x), where it has not yet been tuned to reach the card's bandwidth.
FP8_WINS_UP_TO_ROWS = 16


def block_m_for(rows: int) -> int:
    """The row tile for ``rows`` rows: the next power of two from 16 up to 64 (more rows take
    several row tiles)."""
    block = MIN_BLOCK_M
    while block < rows and block < MAX_BLOCK_M:
        block *= 2
    return block


# Tried once per (N, K, row tile) on the first call (the graphs' warm-up step, never inside a
# capture). Narrow strips give the 100+ programs a 132-SM card needs at N = 4096.
_CONFIGS = [
    # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (32, 256, 4, 4),
    (32, 512, 4, 3),
    (32, 256, 8, 4),
    (64, 256, 4, 3),
    (64, 128, 4, 4),
    (16, 1024, 8, 2),
    (16, 2048, 8, 2),
    (32, 1024, 8, 3),
    (64, 512, 8, 3),
    (128, 256, 8, 3),
]
# Under the interpreter (CPU tests) there is nothing to time: one small config, and the dot
# in float32 (the interpreter's bf16 dot is wrong: numpy has no bf16).
_INTERPRETED = {"BLOCK_N": 16, "BLOCK_K": 32, "DOT_F32": True}


@functools.cache
def _kernel(tuned: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_weight_gemm(
        x_ptr,
        w_ptr,
        scale_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr = False,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + cols[:, None] * stride_wn + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if DOT_F32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(x, tl.trans(w.to(tl.bfloat16)))
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        out = (acc * scale[None, :]).to(y_ptr.dtype.element_ty)
        tl.store(
            y_ptr + rows[:, None] * stride_ym + cols[None, :],
            out,
            mask=row_ok[:, None] & col_ok[None, :],
        )

    if not tuned:
        return fp8_weight_gemm
    configs = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for n, k, w, st in _CONFIGS
    ]
    return triton.autotune(configs=configs, key=["N", "K", "BLOCK_M"])(fp8_weight_gemm)


# One row takes a GEMV (no tensor-core dot, so no shuffle of the widened weight into the
# dot's layout): on the H200 it takes a step's GEMMs from 3.61 ms (bf16) to 2.08 (1.74x).
# Run over 4 rows (re-reading the strip per row) it was 0.55x, so 2+ rows take the dot kernel
# (1.08x at 8 rows, the same tile as 2-16).
_GEMV_CONFIGS = [
    # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (8, 512, 4, 3),
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (16, 1024, 8, 2),
    (32, 256, 4, 3),
    (32, 512, 8, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
]
_GEMV_INTERPRETED = {"BLOCK_N": 16, "BLOCK_K": 32}


@functools.cache
def _gemv_kernel(tuned: bool) -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_weight_gemv(
        x_ptr,
        w_ptr,
        scale_ptr,
        y_ptr,
        N,
        K,
        stride_wn,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w = tl.load(
                w_ptr + cols[:, None] * stride_wn + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        tl.store(y_ptr + cols, (acc * scale).to(y_ptr.dtype.element_ty), mask=col_ok)

    if not tuned:
        return fp8_weight_gemv
    configs = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for n, k, w, st in _GEMV_CONFIGS
    ]
    return triton.autotune(configs=configs, key=["N", "K"])(fp8_weight_gemv)


def triton_ready(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: CUDA with FP8 (compute capability 8.9+)
    and Triton importable, or any device under ``TRITON_INTERPRET=1`` (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return fp8.supported(device)
    return os.environ.get("TRITON_INTERPRET") == "1"


def fp8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T`` for rows ``x`` (..., K; bf16, or float32 on CPU), an
    E4M3 ``weight`` (N, K) and its float32 per-row ``scale`` (N,), in ``x``'s dtype, through
    the Triton kernel."""
    import triton

    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, k = rows.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"rows have {k} features, the weight {weight.shape[1]}")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    tuned = x.device.type == "cuda"
    if m == 1:

        def gemv_grid(meta: dict[str, Any]) -> tuple[int]:
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        extra = {} if tuned else _GEMV_INTERPRETED
        _gemv_kernel(tuned)[gemv_grid](rows, weight, scale, out, n, k, weight.stride(0), **extra)
        return out.reshape(*x.shape[:-1], n)
    block_m = block_m_for(m)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))

    args = (rows, weight, scale, out, m, n, k, rows.stride(0), weight.stride(0), out.stride(0))
    if tuned:
        _kernel(True)[grid](*args, BLOCK_M=block_m, DOT_F32=x.dtype == torch.float32)
    else:
        _kernel(False)[grid](*args, BLOCK_M=block_m, **_INTERPRETED)
    return out.reshape(*x.shape[:-1], n)


class Fp8Weight:
    """A bias-free linear layer held as an E4M3 weight (out, in) with per-output scales.

    Called like the engine's other weight wrappers (``x -> x @ W.T``). ``backend``:
    ``"triton"`` (the kernel above), ``"dequantize"`` (bf16 matmul of the widened weight:
    slower, for devices without FP8), or ``"auto"``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        backend: str = "auto",
        *,
        bf16: Any = None,
        max_rows: int = KERNEL_MAX_ROWS,
    ) -> None:
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ValueError("Fp8Weight takes a 2-D float8_e4m3fn weight")
        self.weight = weight.contiguous()
        self.scale = scale.to(torch.float32).contiguous()
        # The same layer in bf16 (a callable), used above ``max_rows`` rows; None: widen.
        self.bf16 = bf16
        self.max_rows = max_rows
        if backend == "auto":
            backend = "triton" if triton_ready(weight.device) else "dequantize"
        if backend not in {"triton", "dequantize"}:
            raise ValueError(f"unknown FP8 backend {backend!r}")
        self.backend = backend

    @classmethod
    def from_weight(cls, weight: torch.Tensor, backend: str = "auto", **options: Any) -> Fp8Weight:
        """Quantize a bf16 (out, in) weight (see :func:`model.fp8.quantize_weight`)."""
        quantized, scale = fp8.quantize_weight(weight)
        return cls(quantized, scale, backend, **options)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.backend == "triton" and rows <= self.max_rows:
            return fp8_weight_matmul(x, self.weight, self.scale)
        if self.bf16 is not None:
            out: torch.Tensor = self.bf16(x)
            return out
        widened = fp8.dequantize(self.weight, self.scale, dtype=x.dtype)
        return F.linear(x, widened)
