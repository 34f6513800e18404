"""FP8 weights in the decode step: which kernel serves how many rows, and the kernels of one row
and of the first multi-row design.

A decode step reads every weight once, so at 1-64 rows it is bound by memory bandwidth, and
weights of one byte instead of two halve its floor. :class:`Fp8Weight` holds one projection as
an E4M3 weight with per-output-channel scales (:func:`model.fp8.quantize_weight`) and sends
each call to a path by its row count (:data:`ROUTES`, set from ``bench.fp8_gemm``'s sweep on
an H200):

- ``"gemv"`` (one row): each program streams a ``BLOCK_N x K`` strip of the weight and reduces
  it against the row with FMAs (1.74x of bf16's step GEMMs on an H200);
- ``"dot"``: the first multi-row kernel here, the strip widened to bf16 in registers and
  multiplied with the rows' tile on the tensor cores (1.08-1.16x at 8-16 rows, 0.63x at 64);
- ``"splitk_bf16"``, ``"splitk_f16"``, ``"splitk_fp8"``: the split-K kernel of
  :mod:`model.fast.fp8_splitk` in its three modes (configuration per shape from
  :mod:`model.fast.fp8_tuning`);
- ``"bf16"``: the layer's bf16 twin, where the engine keeps one (``LlamaWeights(keep_bf16=)``);
- ``"scaled_mm"``, ``"dequantize"``: prefill sizes without a twin (:mod:`model.fast.fp8_prefill`).

Every kernel call is one launch, allocates only its output, and runs inside a CUDA graph. On CPU
(tests) Triton runs under its interpreter; :class:`Fp8Weight` falls back to ``dequantize`` +
matmul where Triton or FP8 support is missing.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

from model import fp8
from model.fast import fp8_prefill, fp8_splitk
from model.fast.fp8_tuning import TUNER

log = logging.getLogger(__name__)

# Rows of a decode step are padded to the dot's minimum tile (16) by masking, never copied.
MIN_BLOCK_M = 16
MAX_BLOCK_M = 64
# Measured on an H200 (bench/RESULTS.md, "FP8 GEMMs after split-K"): over one layer's four
# GEMMs the exact split-K kernel beats bf16 by 1.29-1.34x at 2-16 rows and 1.19-1.21x at
# 24-32, and loses at 48-64 (0.95-0.98x); the dot kernel it replaces gave 1.11-1.13x.
SPLITK_WINS_UP_TO_ROWS = 32

UNLIMITED = sys.maxsize
PATHS = (
    "gemv",
    "dot",
    "splitk_bf16",
    "splitk_f16",
    "splitk_fp8",
    "bf16",
    "scaled_mm",
    "dequantize",
)
SPLITK_MODES = {"splitk_bf16": "bf16", "splitk_f16": "f16", "splitk_fp8": "fp8"}
# (most rows, path), by increasing row count: a call of M rows takes the first path whose
# limit is at least M. The last limit is UNLIMITED. The sweep's "exact, twin allowed" policy
# on the H200: the GEMV, split-K with bf16-widened weights up to 32 rows, then the bf16 twin
# (which LlamaWeights then keeps: see uses_bf16_twin). Without the twin (6.5 GB less at 7B)
# the 48-64-row steps lose 2-5% and prefills 17-37% (dequantize per call).
ROUTES: tuple[tuple[int, str], ...] = (
    (1, "gemv"),
    (SPLITK_WINS_UP_TO_ROWS, "splitk_bf16"),
    (UNLIMITED, "bf16"),
)
# What a "bf16" route runs on a layer without its twin: the widened weight in cuBLAS.
NO_TWIN_PATH = "dequantize"


def check_routes(routes: tuple[tuple[int, str], ...]) -> None:
    """Raise ``ValueError`` unless ``routes`` is a valid routing table (see :data:`ROUTES`)."""
    if not routes or routes[-1][0] != UNLIMITED:
        raise ValueError("the last route must cover any number of rows (UNLIMITED)")
    limits = [limit for limit, _ in routes]
    if limits != sorted(set(limits)) or limits[0] < 1:
        raise ValueError(f"route limits must increase from 1 or more: {limits}")
    for limit, path in routes:
        if path not in PATHS:
            raise ValueError(f"unknown FP8 path {path!r} (one of {PATHS})")
        if path == "gemv" and limit != 1:
            raise ValueError("the GEMV takes one row: its route's limit must be 1")


def route_for(rows: int, routes: tuple[tuple[int, str], ...] | None = None) -> str:
    """The path a call of ``rows`` rows takes under ``routes`` (default :data:`ROUTES`)."""
    for limit, path in routes or ROUTES:
        if rows <= limit:
            return path
    raise ValueError(f"no route covers {rows} rows")


def uses_bf16_twin(routes: tuple[tuple[int, str], ...] | None = None) -> bool:
    """Whether any route runs the bf16 twin (else the engine need not keep it)."""
    return any(path == "bf16" for _, path in routes or ROUTES)


def block_m_for(rows: int) -> int:
    """The row tile for ``rows`` rows: the next power of two from 16 up to 64 (more rows take
    several row tiles)."""
    return fp8_splitk.block_m_for(rows)


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
# (1.08x at 8 rows, the same tile as 2-16). A GEMV holding 2-8 rows' tiles at once was built
# and measured too, 2.5-7x slower than split-K (bench/RESULTS.md, "Issue 12, fourth part").
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
    ``"triton"`` (the paths of ``routes``, default :data:`ROUTES` as it is at call time),
    ``"dequantize"`` (the bf16 twin if there is one, else a matmul of the widened weight: for
    devices without FP8), or ``"auto"``. ``bf16``: the same layer in bf16 (a callable), for
    the ``"bf16"`` route; without it that route runs :data:`NO_TWIN_PATH`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        backend: str = "auto",
        *,
        bf16: Any = None,
        routes: tuple[tuple[int, str], ...] | None = None,
    ) -> None:
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ValueError("Fp8Weight takes a 2-D float8_e4m3fn weight")
        self.weight = weight.contiguous()
        self.scale = scale.to(torch.float32).contiguous()
        self.bf16 = bf16
        if routes is not None:
            check_routes(routes)
        self.routes = routes
        if backend == "auto":
            backend = "triton" if triton_ready(weight.device) else "dequantize"
        if backend not in {"triton", "dequantize"}:
            raise ValueError(f"unknown FP8 backend {backend!r}")
        self.backend = backend
        # Paths that failed here once (no configuration ran): the dot kernel serves them.
        self._broken: set[str] = set()
        self._scaled_mm: fp8.Fp8Linear | bool | None = False  # False: not tried yet

    @classmethod
    def from_weight(cls, weight: torch.Tensor, backend: str = "auto", **options: Any) -> Fp8Weight:
        """Quantize a bf16 (out, in) weight (see :func:`model.fp8.quantize_weight`)."""
        quantized, scale = fp8.quantize_weight(weight)
        return cls(quantized, scale, backend, **options)

    @property
    def nbytes(self) -> int:
        """The FP8 weight and its scales (not the twin)."""
        return self.weight.numel() + self.scale.numel() * 4

    def path_for(self, rows: int, dtype: torch.dtype = torch.bfloat16) -> str:
        """The path a call of ``rows`` rows of ``dtype`` takes on this layer."""
        if self.backend == "dequantize":
            return "bf16" if self.bf16 is not None else "dequantize"
        path = route_for(rows, self.routes)
        if path == "bf16" and self.bf16 is None:
            path = NO_TWIN_PATH
        on_gpu = self.weight.device.type == "cuda"
        if path in SPLITK_MODES and (path in self._broken or (on_gpu and dtype != torch.bfloat16)):
            path = "dot"
        if path == "scaled_mm" and (dtype != torch.bfloat16 or self._scaled_mm_layer() is None):
            path = "dequantize"
        if path == "gemv" and rows != 1:
            path = "dot"
        return path

    def _scaled_mm_layer(self) -> fp8.Fp8Linear | None:
        if self._scaled_mm is False:
            self._scaled_mm = fp8_prefill.scaled_mm_linear(self.weight, self.scale)
        return self._scaled_mm if isinstance(self._scaled_mm, fp8.Fp8Linear) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        path = self.path_for(rows, x.dtype)
        if path == "bf16":
            out: torch.Tensor = self.bf16(x)
            return out
        flat = x.reshape(-1, x.shape[-1])
        if path == "dequantize":
            if self.backend == "dequantize":  # no Triton: the widened weight, as before
                result = F.linear(flat, fp8.dequantize(self.weight, self.scale, dtype=x.dtype))
            else:
                result = fp8_prefill.dequantize_matmul(flat, self.weight, self.scale)
        elif path == "scaled_mm":
            layer = self._scaled_mm_layer()
            assert layer is not None  # path_for checked
            result = layer(flat)
        elif path in SPLITK_MODES:
            result = self._splitk(path, flat)
        else:
            result = fp8_weight_matmul(flat, self.weight, self.scale)
        return result.reshape(*x.shape[:-1], self.weight.shape[0])

    def _splitk(self, path: str, flat: torch.Tensor) -> torch.Tensor:
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        mode = SPLITK_MODES[path]
        try:
            config = TUNER.config_for(mode, flat, self.weight, self.scale)
        except RuntimeError as error:
            log.warning("FP8 %s unavailable (%s); the dot kernel serves it", path, error)
            self._broken.add(path)
            return fp8_weight_matmul(flat, self.weight, self.scale)
        return fp8_splitk.splitk_matmul(flat, self.weight, self.scale, mode, config)
