"""FP8 weights at prefill sizes (hundreds to thousands of rows), without a bf16 copy kept.

A prefill is compute-bound, so the decode kernels' one-byte reads don't matter there; what
matters is the tensor cores' rate and not keeping a second, bf16, copy of every weight. Two
ways, chosen by the routes of :mod:`model.fast.fp8_gemm` from ``bench.fp8_gemm``'s sweep:

- ``"scaled_mm"``: the rows quantized per token to E4M3 (:func:`model.fp8.quantize_rows`) and
  ``torch._scaled_mm`` with row-wise scales: Hopper's FP8 tensor cores, twice bf16's rate, at
  the cost of the rows' E4M3 rounding (:class:`model.fp8.Fp8Linear`);
- ``"dequantize"``: the weight widened to bf16 into one scratch buffer per device (reused by
  every layer, the size of the largest weight) and cuBLAS's bf16 GEMM: the numerics of the
  widened weight (:func:`model.fp8.dequantize`), plus one pass over the weight per call.

Prefills run eagerly (never inside a CUDA graph), so the scratch buffer may grow on any call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import fp8

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def _dequantize_kernel(
        w_ptr, scale_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # The product in float32, rounded once: the same values as model.fp8.dequantize.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        offsets = rows[:, None] * K + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
        out = (w.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, out, mask=mask)


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch_bytes() -> int:
    """Bytes held by the widening scratch buffers (all devices)."""
    return sum(buffer.numel() * buffer.element_size() for buffer in _SCRATCH.values())


def widen_into_scratch(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``dequantize(weight, scale, dtype)`` written into the device's shared scratch buffer
    (grown to the largest weight seen); the (N, K) view is valid until the next call."""
    n, k = weight.shape
    key = (weight.device, dtype)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < n * k:
        _SCRATCH.pop(key, None)  # free the smaller one first
        buffer = _SCRATCH[key] = torch.empty(n * k, dtype=dtype, device=weight.device)
    out = buffer[: n * k].view(n, k)
    if weight.device.type == "cuda" and HAVE_TRITON:
        grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
        _dequantize_kernel[grid](weight, scale, out, n, k, BLOCK_N=32, BLOCK_K=256)
    else:
        out.copy_(weight)  # E4M3 -> dtype is exact
        out.mul_(scale.to(torch.float32)[:, None])  # computed in float32, rounded once
    return out


def dequantize_matmul(
    rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``rows @ dequantize(weight, scale).T`` through the scratch buffer, in ``rows``' dtype."""
    return F.linear(rows, widen_into_scratch(weight, scale, rows.dtype))


def scaled_mm_linear(weight: torch.Tensor, scale: torch.Tensor) -> fp8.Fp8Linear | None:
    """The ``torch._scaled_mm`` layer over the same tensors (no copy), or None where it can't
    run (no FP8 tensor cores, no row-wise kernel, dimensions not multiples of 16)."""
    try:
        return fp8.Fp8Linear(weight, scale, backend="scaled_mm")
    except (ValueError, RuntimeError):
        return None
