"""FP8 (E4M3) weights for the decode matmuls, on Hopper-class GPUs (issue 12, item 1).

Why: a decode step is memory-bound; it reads every weight once per step and does little
arithmetic with each byte (shared/PERFORMANCE.md: on an H200 the bf16 floor at batch 1 is
~13.5 GB / ~4.3 TB/s, ~3.1 ms a token). Storing the weights as one-byte E4M3 halves those bytes,
so the floor halves too, as long as the matmul reads the fp8 bytes directly rather than a bf16
copy made from them.

The scheme, the one vLLM and TensorRT-LLM call "fp8 dynamic, per-channel":

- each weight row (output channel) gets its own float32 scale, ``absmax / 448`` (448 is E4M3's
  largest finite value), so an outlier in one row costs precision in that row only;
- each activation row (token) is quantized on the fly to E4M3 with its own scale;
- ``torch._scaled_mm`` multiplies the two fp8 operands on the tensor cores with those row-wise
  scales, accumulating in float32 and writing bf16.

E4M3 keeps 3 mantissa bits: round-to-nearest puts an element within 2^-4 of its value
(relative), down to ``absmax * 2^-6 / 448``; below that (subnormals) the error is at most
``scale * 2^-10`` in absolute terms, and values under ``scale * 2^-10`` become zero.

``torch._scaled_mm`` (read from the installed torch 2.13's ``_VariableFunctions.pyi`` and
``_meta_registrations.py``; ATen's ``_scaled_mm_out_cuda`` checks the same)::

    _scaled_mm(input, mat2, scale_a, scale_b, bias=None, scale_result=None,
               out_dtype=None, use_fast_accum=False, *, out=None) -> Tensor

- ``input`` [M, K] row-major and ``mat2`` [K, N] column-major (hence ``w_fp8.t()`` of the
  row-major [N, K] weight), both float8; ``K % 16 == 0`` and ``N % 16 == 0``;
- row-wise scaling: ``scale_a`` float32 (M, 1) and ``scale_b`` float32 (1, N), both contiguous;
  the scales multiply (they are the dequantization factors, not their inverses);
- recent torch does not constrain M, older releases wanted ``M % 16 == 0``:
  :func:`scaled_mm_row_multiple` finds out once per device, and :class:`Fp8Linear` pads the
  activation rows with zeros when needed.

With bf16 activations (weight-only fp8) ``_scaled_mm`` does not apply: it needs fp8 on both
sides, and torch has no matmul that dequantizes fp8 weight tiles on the fly. ``activation="bf16"``
therefore dequantizes the whole weight and calls an ordinary matmul: the accuracy of fp8 weights
alone, without their speed (it writes and reads a bf16 copy). It is the reference the fp8-
activation path is compared with, and the path on CPUs and GPUs older than compute capability
8.9, which is what makes this module testable on a CPU.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F

from model.errors import first_line

log = logging.getLogger(__name__)

# The largest finite float8_e4m3fn value; a row's absmax maps onto it.
E4M3_MAX = 448.0

# The row count older torch releases required of _scaled_mm's first operand.
ROW_MULTIPLE = 16

# _scaled_mm requires K and N to be multiples of this.
DIMENSION_MULTIPLE = 16

# An all-zero activation row must still get a positive scale (its quantized values are 0).
_MIN_ACTIVATION_ABSMAX = 1e-12

Activation = Literal["fp8", "bf16"]
Backend = Literal["auto", "scaled_mm", "dequantize"]


def _has_fp8() -> bool:
    return hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")


def supported(device: torch.device | str) -> bool:
    """Whether ``device`` can run the fp8 tensor-core path: a CUDA GPU of compute capability
    8.9 (Ada) or higher (Hopper is 9.0) and a torch with ``float8_e4m3fn`` and ``_scaled_mm``.

    ROCm builds are excluded: MI300 uses the ``fnuz`` fp8 variants, which this module does not
    produce. True here does not promise row-wise scales (torch may be built without that
    kernel for 8.9); :func:`scaled_mm_row_multiple` tries it.
    """
    device = torch.device(device)
    if device.type != "cuda" or not _has_fp8() or torch.version.hip is not None:
        return False
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (out, in) weight as float8_e4m3fn with one float32 scale per output row.

    ``scale[n] = absmax(weight[n]) / 448`` (1 for an all-zero row, whose fp8 values are all
    zero), so ``weight[n] ≈ w_fp8[n] * scale[n]``. Raises ``ValueError`` for a weight that
    is not 2-D or holds inf or NaN (its scale would be meaningless).
    """
    w = _checked_weight(weight)
    scale = _row_scales(w)
    return _to_e4m3(w / scale[:, None]), scale


def _checked_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as float32, after the checks :func:`quantize_weight` documents."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w.abs().amax(dim=1)).all()):
        raise ValueError("the weight holds inf or NaN; it cannot be scaled to fp8")
    return w


def _row_scales(w: torch.Tensor) -> torch.Tensor:
    """``absmax / 448`` per row of a float32 weight, 1 for an all-zero row."""
    absmax = w.abs().amax(dim=1)
    return torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))


def _to_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """Float32 values (already divided by their scale) as the nearest float8_e4m3fn."""
    # A value can exceed 448 by a rounding step (or, under error feedback, by more); not
    # every torch build's cast saturates (out of range can become NaN), so clamp.
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize(
    w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``w_fp8 * scale`` row by row, in ``dtype``: the inverse of :func:`quantize_weight`."""
    return (w_fp8.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def input_hessian(rows: torch.Tensor) -> torch.Tensor:
    """``X^T X`` (in, in) in float64 for a linear layer's input rows ``X`` [..., in]: the
    statistic :func:`quantize_weight_gptq` needs. Sum it over calibration batches (the scale
    of the sum does not matter, only its shape)."""
    x = rows.detach().reshape(-1, rows.shape[-1]).to(torch.float64)
    return x.T @ x


# GPTQ's damping: this fraction of the Hessian's mean diagonal is added to its diagonal. It
# keeps the Cholesky factorization stable and stops the error feedback from fitting the
# calibration tokens too closely (bench/RESULTS.md, "FP8 quality guard": on SmolLM2 with
# ~12k calibration tokens, 0.03-0.1 generalized better to other prompts than GPTQ's usual
# 0.01, which is meant for ~260k tokens).
GPTQ_DAMP = 0.03
# Columns updated together (GPTQ's lazy batch updates); the result does not depend on it
# beyond float32 rounding, only the speed does.
GPTQ_BLOCK = 128


def quantize_weight_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    damp: float = GPTQ_DAMP,
    block_size: int = GPTQ_BLOCK,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (out, in) weight as float8_e4m3fn with one float32 scale per output row, the codes
    chosen by GPTQ (Frantar et al., 2022) on the E4M3 grid instead of round-to-nearest.

    The output is what :func:`quantize_weight` returns, with the same scales
    (``absmax / 448`` per row): the kernels read it unchanged. Only the E4M3 codes differ.
    Columns (input channels) are rounded one at a time, and each column's rounding error is
    fed back into the columns not yet rounded, weighted by the inverse of ``hessian`` =
    ``X^T X`` of calibration inputs (:func:`input_hessian`), so that ``X @ W.T`` (what the
    layer computes on such inputs) rather than ``W`` itself is reproduced. ``act_order``
    rounds the channels with the largest inputs first (they get the least accumulated
    correction). A fed-back value past 448 saturates there. Channels no calibration token
    used (zero diagonal) are rounded to nearest on their own.

    Deterministic on one device. Raises ``ValueError`` for a bad weight (as
    :func:`quantize_weight`) or a Hessian of the wrong shape or with inf or NaN.
    """
    w = _checked_weight(weight)
    in_features = w.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"expected a ({in_features}, {in_features}) Hessian, got {tuple(hessian.shape)}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the Hessian holds inf or NaN")
    if damp <= 0 or block_size < 1:
        raise ValueError(f"damp must be positive and block_size at least 1: {damp}, {block_size}")
    scale = _row_scales(w)
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    unused = torch.diagonal(h) <= 0
    h[unused, unused] = 1.0  # decoupled: no feedback from or into an unused channel
    order = (
        torch.argsort(torch.diagonal(h), descending=True, stable=True)
        if act_order
        else torch.arange(in_features, device=w.device)
    )
    h = h[order][:, order]
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    # The upper Cholesky factor of H^-1: row i holds column i's feedback onto the later ones.
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    feedback = torch.linalg.cholesky(inverse, upper=True).to(torch.float32)

    remaining = (w / scale[:, None])[:, order]  # in units of each row's scale
    codes = torch.empty_like(remaining)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = remaining[:, start:end].clone()
        errors = torch.empty_like(block)
        local = feedback[start:end, start:end]
        for i in range(end - start):
            rounded = _to_e4m3(block[:, i]).to(torch.float32)
            codes[:, start + i] = rounded
            error = (block[:, i] - rounded) / local[i, i]
            block[:, i + 1 :] -= error[:, None] * local[i, i + 1 :][None, :]
            errors[:, i] = error
        remaining[:, end:] -= errors @ feedback[start:end, end:]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored.to(torch.float8_e4m3fn), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] as float8_e4m3fn with one float32 scale per row, shape (M, 1).

    Dynamic (computed from this ``x``, nothing calibrated). No clamp (one kernel fewer per
    matmul): the row's absmax divided by ``absmax / 448`` is 448 within a float32 rounding
    step, which rounds to 448 (E4M3's next step up, 480, does not exist). All-zero rows
    (padding) get a tiny positive scale.
    """
    absmax = x.abs().amax(dim=1, keepdim=True).to(torch.float32)
    scale = absmax.clamp_(min=_MIN_ACTIVATION_ABSMAX) / E4M3_MAX
    # bf16 / float32 promotes to float32 before the cast.
    return (x / scale).to(torch.float8_e4m3fn), scale


def padded_rows(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (0 stays 0)."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    return -(-rows // multiple) * multiple


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` [M, K] with zero rows appended up to a multiple of ``multiple``; ``x`` itself when
    M already is one."""
    target = padded_rows(x.shape[0], multiple)
    if target == x.shape[0]:
        return x
    return F.pad(x, (0, 0, 0, target - x.shape[0]))


def _scaled_mm_rowwise(
    x_fp8: torch.Tensor,
    w_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale_row: torch.Tensor,
    use_fast_accum: bool,
) -> torch.Tensor:
    """``(x_fp8 * x_scale) @ (w_fp8 * w_scale).T`` in bf16, ``w_fp8`` row-major (N, K)."""
    return torch._scaled_mm(
        x_fp8,
        w_fp8.t(),  # (K, N) column-major: the layout cuBLASLt and CUTLASS need on Hopper
        scale_a=x_scale,
        scale_b=w_scale_row,
        out_dtype=torch.bfloat16,
        use_fast_accum=use_fast_accum,
    )


@functools.cache
def scaled_mm_row_multiple(device: torch.device) -> int:
    """What M the installed ``torch._scaled_mm`` accepts with row-wise scales on ``device``:
    1 (any M) or :data:`ROW_MULTIPLE` (M must be a multiple of 16, older torch releases).

    Found by trying M = 1, then M = 16, on a tiny product, once per device (call it outside
    CUDA graph capture). Raises ``RuntimeError`` when neither runs, e.g. a torch built
    without the row-wise kernel for this GPU.
    """
    errors = []
    for rows in (1, ROW_MULTIPLE):
        x = torch.zeros(rows, DIMENSION_MULTIPLE, device=device).to(torch.float8_e4m3fn)
        w = torch.zeros(DIMENSION_MULTIPLE, DIMENSION_MULTIPLE, device=device)
        x_scale = torch.ones(rows, 1, device=device)
        w_scale = torch.ones(1, DIMENSION_MULTIPLE, device=device)
        try:
            _scaled_mm_rowwise(x, w.to(torch.float8_e4m3fn), x_scale, w_scale, False)
        except (RuntimeError, ValueError) as exc:  # TORCH_CHECK / TORCH_CHECK_VALUE
            errors.append(f"M={rows}: {first_line(exc)}")
            continue
        return rows
    raise RuntimeError(
        f"torch._scaled_mm with row-wise scales does not run on {device}: " + "; ".join(errors)
    )


class Fp8Linear:
    """A bias-free linear layer whose (out, in) weight is stored as fp8 E4M3 with per-output-
    row scales: ``y = x @ W.T`` for ``x`` [..., in] bf16, ``y`` [..., out].

    Called like the fast engine's weight wrappers (``model.fast.weights``). Backends:

    - ``"scaled_mm"``: activations quantized per row to E4M3, then ``torch._scaled_mm`` with
      row-wise scales (fp8 tensor cores; half the weight bytes of bf16). Needs
      ``activation="fp8"``, bf16 input, ``in`` and ``out`` multiples of 16.
    - ``"dequantize"``: ``x @ dequantize(W).T`` in ``x``'s dtype. Weight-only fp8 numerics
      without the speed; the path on CPU and older GPUs.
    - ``"auto"``: ``"scaled_mm"`` where :func:`supported` and the row-wise probe succeed and
      ``activation="fp8"``, else ``"dequantize"``.

    ``use_fast_accum`` lets the kernel accumulate in reduced precision (faster on Hopper,
    less accurate); off by default.
    """

    def __init__(
        self,
        w_fp8: torch.Tensor,
        scale: torch.Tensor,
        *,
        activation: Activation = "fp8",
        backend: Backend = "auto",
        use_fast_accum: bool = False,
    ) -> None:
        if activation not in ("fp8", "bf16"):
            raise ValueError(f"activation must be 'fp8' or 'bf16', got {activation!r}")
        if backend not in ("auto", "scaled_mm", "dequantize"):
            raise ValueError(f"backend must be auto, scaled_mm or dequantize, got {backend!r}")
        if w_fp8.dim() != 2 or w_fp8.dtype != torch.float8_e4m3fn:
            raise ValueError(
                f"expected a 2-D float8_e4m3fn weight, got {w_fp8.dtype} {tuple(w_fp8.shape)}"
            )
        if scale.shape != (w_fp8.shape[0],) or scale.dtype != torch.float32:
            raise ValueError(
                f"expected a float32 scale of shape ({w_fp8.shape[0]},), "
                f"got {scale.dtype} {tuple(scale.shape)}"
            )
        self.weight = w_fp8.contiguous()
        self.scale = scale.contiguous()
        self.activation: Activation = activation
        self.use_fast_accum = use_fast_accum
        # The (1, N) contiguous view _scaled_mm wants for row-wise scales, made once.
        self._scale_row = self.scale.view(1, -1)
        self.row_multiple = 1
        self.backend: Backend = self._choose_backend(backend)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        *,
        activation: Activation = "fp8",
        backend: Backend = "auto",
        use_fast_accum: bool = False,
    ) -> Fp8Linear:
        """Quantize a bf16 (out, in) weight (:func:`quantize_weight`) and wrap it."""
        w_fp8, scale = quantize_weight(weight)
        return cls(
            w_fp8, scale, activation=activation, backend=backend, use_fast_accum=use_fast_accum
        )

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def _choose_backend(self, requested: Backend) -> Backend:
        if requested == "dequantize":
            return "dequantize"
        if requested == "auto" and (self.activation != "fp8" or not supported(self.weight.device)):
            return "dequantize"
        if self.activation != "fp8":
            raise ValueError(
                "backend 'scaled_mm' needs activation='fp8': _scaled_mm takes fp8 on both sides"
            )
        if self.in_features % DIMENSION_MULTIPLE or self.out_features % DIMENSION_MULTIPLE:
            if requested == "auto":
                return "dequantize"
            raise ValueError(
                f"_scaled_mm needs in and out features divisible by {DIMENSION_MULTIPLE}, "
                f"got {self.in_features} and {self.out_features}"
            )
        try:
            self.row_multiple = scaled_mm_row_multiple(self.weight.device)
        except RuntimeError as exc:
            if requested == "scaled_mm":
                raise
            log.warning("fp8 matmul falls back to dequantize: %s", first_line(exc))
            return "dequantize"
        return "scaled_mm"

    def scaled_matmul(self, x_fp8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The fp8 product alone, on already quantized (and, if need be, padded) rows:
        ``(x_fp8 * x_scale) @ (W_fp8 * scale).T`` in bf16, shape [rows of x_fp8, out]."""
        return _scaled_mm_rowwise(x_fp8, self.weight, x_scale, self._scale_row, self.use_fast_accum)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        if self.backend == "dequantize":
            out = F.linear(rows, dequantize(self.weight, self.scale, x.dtype))
        else:
            if x.dtype != torch.bfloat16:
                raise ValueError(f"the fp8 path takes bf16 activations, got {x.dtype}")
            x_fp8, x_scale = quantize_rows(pad_rows(rows, self.row_multiple))
            out = self.scaled_matmul(x_fp8, x_scale)
            if out.shape[0] != rows.shape[0]:
                out = out[: rows.shape[0]]  # the leading rows of a row-major result: contiguous
        return out.reshape(*leading, self.out_features)

    def __repr__(self) -> str:
        return (
            f"Fp8Linear(in={self.in_features}, out={self.out_features}, "
            f"activation={self.activation}, backend={self.backend})"
        )
