"""Triton kernels for the fast engine's decode step: rotary + KV write, and decode attention.

Two things the generic kernels can't do well inside a CUDA graph:

* **Per-row lengths.** Dense SDPA over the slot cache reads every row's keys up to the
  step's context bucket, however short the row is; with prompts of 64-256 tokens that is a
  quarter of the KV traffic thrown away. :func:`decode_attention` is split-K ("flash
  decoding"): each program takes one (row, head, key chunk) and stops at the row's own length,
  read from the positions tensor at run time, so one captured graph serves any mix of lengths.
* **Fewer launches.** :func:`rope_store` rotates q and k, writes k and v into the cache at each
  row's position, and leaves q for attention: one kernel where there were two (Inductor's
  rope and an ``index_put``).

Both take the fp8 KV cache (``model.fast.kv_cache``: E4M3 values, one float32 scale per
token and KV head): :func:`rope_store` quantizes the new K and V as it stores them (the
arithmetic of ``kv_cache.quantize_kv``), and :func:`decode_attention` loads the E4M3 values and
their scales and widens them in registers, folding the key scale into each score and the value
scale into each softmax weight (two multiplies a key, not two per element).

The kernels are built on first use (:func:`kernels`), so this module imports without Triton
(the engine then keeps SDPA), and the tests run them under Triton's CPU interpreter
(``TRITON_INTERPRET=1``). Arithmetic is float32 inside the kernels and rounds once on store.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from model.fast.kv_cache import MIN_KV_ABSMAX, dequantize_kv, quantize_kv
from model.fp8 import E4M3_MAX

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU installs without Triton: the engine keeps SDPA
    HAVE_TRITON = False

# Keys per split-K program (a multiple of BLOCK_KEYS) and keys per loop iteration. Chosen on an
# H100 (python -m bench.serving --attention-sweep); any values give the same result.
SPLIT_KEYS = 64
BLOCK_KEYS = 64
MAX_SPLITS = 32  # longer contexts use bigger chunks instead of more of them
ATTENTION_WARPS = 2
# The same for an fp8 cache, whose keys are half the bytes, so a program of 64 keys moves half
# as much: `python -m bench.step_profile --attention-sweep` on an H200 (bench/RESULTS.md) had
# 256 keys in blocks of 128 fastest from 8 rows on (one layer at ~420 keys: 12.4 us for 15.5
# at 64 keys, 44 for 48 at 32 rows, 75 for 85 at 64), and 128 keys below 8 rows, where
# bigger programs leave SMs idle (6.5 for 7.1 us at 2 rows, 8.1 for 9.0 at 4).
FP8_SPLIT_KEYS = 256
FP8_SMALL_BATCH_SPLIT_KEYS = 128
FP8_SMALL_BATCH_ROWS = 8  # below this many rows, FP8_SMALL_BATCH_SPLIT_KEYS
FP8_BLOCK_KEYS = 128
FP8_ATTENTION_WARPS = 2


def attention_settings(fp8: bool, rows: int) -> tuple[int, int, int]:
    """(keys per program, keys per block, warps) of the decode kernel for a cache format and
    a step of ``rows`` rows, read at each call (the sweeps set the module's values)."""
    if fp8:
        small = rows < FP8_SMALL_BATCH_ROWS
        split = FP8_SMALL_BATCH_SPLIT_KEYS if small else FP8_SPLIT_KEYS
        return split, FP8_BLOCK_KEYS, FP8_ATTENTION_WARPS
    return SPLIT_KEYS, BLOCK_KEYS, ATTENTION_WARPS


if HAVE_TRITON:
    # At module level: a jit function called from a kernel must be a global of its module.
    @triton.jit
    def _to_e4m3(x, scale, FP8_MAX: tl.constexpr):
        """``x / scale`` clamped to E4M3's range and rounded to nearest even on its grid, in
        float32: the conversion to fp8 that follows is then exact on any backend. (Triton
        3.9's interpreter rounds up a mantissa of all ones without the carry: 31.8 -> 16.)"""
        y = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        # Normal range: keep 3 of float32's 23 mantissa bits, ties to even; a carry out of
        # the mantissa goes into the exponent, as it should.
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
        normal = bits.to(tl.float32, bitcast=True)
        # Below 2^-6 (E4M3's subnormals, steps of 2^-9): adding 1.5 * 2^14, whose float32
        # step is 2^-9, rounds to that grid.
        subnormal = (y + 24576.0) - 24576.0
        return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


def available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of PyTorch)."""
    return HAVE_TRITON


@functools.cache
def kernels() -> Any:
    """Compile-on-first-use kernels; a namespace with ``rope_store``, ``partial``, ``reduce``.

    Defined on first use, so importing the engine compiles nothing. With ``TRITON_INTERPRET=1``
    set before Triton is imported (tests/conftest.py does) they run on CPU; ``tl`` stays a
    module global, which the interpreter patches while it runs a kernel.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the triton attention needs Triton (pip install triton)")

    @triton.jit
    def rope_store_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        positions_ptr,
        slots_ptr,
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        k_scale_ptr,
        v_scale_ptr,
        stride_qkv_row,
        stride_cos,
        stride_q_row,
        stride_q_head,
        stride_cache_row,
        stride_cache_head,
        stride_cache_pos,
        stride_scale_row,
        stride_scale_head,
        max_position,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        FP8: tl.constexpr,
        FP8_MAX: tl.constexpr,
        MIN_ABSMAX: tl.constexpr,
        ROWS_PER_SLOT: tl.constexpr,
        SLOT_TABLE: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)  # 0..HEADS-1: a query head; then the KV heads
        # A prefill's packed tokens take their cache row from the table.
        if SLOT_TABLE:  # noqa: SIM108 - a constexpr branch, compiled out
            slot_row = tl.load(slots_ptr + row)
        else:  # the cache row (a verify step: several rows each)
            slot_row = row // ROWS_PER_SLOT
        position = tl.minimum(tl.load(positions_ptr + row), max_position)
        offs = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + position * stride_cos + offs).to(tl.float32)
        sin = tl.load(sin_ptr + position * stride_cos + offs).to(tl.float32)
        source = qkv_ptr + row * stride_qkv_row + head * (2 * HALF)
        first = tl.load(source + offs).to(tl.float32)
        second = tl.load(source + HALF + offs).to(tl.float32)
        # rotate_half: (x1, x2) -> (-x2, x1); cos/sin repeat across the two halves.
        rotated_first = first * cos - second * sin
        rotated_second = second * cos + first * sin
        if head < HEADS:
            target = q_ptr + row * stride_q_row + head * stride_q_head
            tl.store(target + offs, rotated_first.to(q_ptr.dtype.element_ty))
            tl.store(target + HALF + offs, rotated_second.to(q_ptr.dtype.element_ty))
        else:
            kv_head = head - HEADS
            slot = (
                slot_row * stride_cache_row
                + kv_head * stride_cache_head
                + position * stride_cache_pos
            )
            dtype = k_cache_ptr.dtype.element_ty
            value = qkv_ptr + row * stride_qkv_row + (HEADS + KV_HEADS + kv_head) * (2 * HALF)
            if FP8:
                # kv_cache.quantize_kv's arithmetic: scale absmax / 448, divide, clamp, round.
                value_first = tl.load(value + offs).to(tl.float32)
                value_second = tl.load(value + HALF + offs).to(tl.float32)
                k_absmax = tl.maximum(
                    tl.max(tl.abs(rotated_first), axis=0), tl.max(tl.abs(rotated_second), axis=0)
                )
                v_absmax = tl.maximum(
                    tl.max(tl.abs(value_first), axis=0), tl.max(tl.abs(value_second), axis=0)
                )
                k_scale = tl.maximum(k_absmax, MIN_ABSMAX) / FP8_MAX
                v_scale = tl.maximum(v_absmax, MIN_ABSMAX) / FP8_MAX
                k_first = _to_e4m3(rotated_first, k_scale, FP8_MAX)
                k_second = _to_e4m3(rotated_second, k_scale, FP8_MAX)
                v_first = _to_e4m3(value_first, v_scale, FP8_MAX)
                v_second = _to_e4m3(value_second, v_scale, FP8_MAX)
                tl.store(k_cache_ptr + slot + offs, k_first.to(dtype))
                tl.store(k_cache_ptr + slot + HALF + offs, k_second.to(dtype))
                tl.store(v_cache_ptr + slot + offs, v_first.to(dtype))
                tl.store(v_cache_ptr + slot + HALF + offs, v_second.to(dtype))
                scale_slot = slot_row * stride_scale_row + kv_head * stride_scale_head + position
                tl.store(k_scale_ptr + scale_slot, k_scale)
                tl.store(v_scale_ptr + scale_slot, v_scale)
            else:
                tl.store(k_cache_ptr + slot + offs, rotated_first.to(dtype))
                tl.store(k_cache_ptr + slot + HALF + offs, rotated_second.to(dtype))
                tl.store(v_cache_ptr + slot + offs, tl.load(value + offs))
                tl.store(v_cache_ptr + slot + HALF + offs, tl.load(value + HALF + offs))

    @triton.jit
    def attention_partial_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        k_scale_ptr,
        v_scale_ptr,
        positions_ptr,
        acc_ptr,
        max_ptr,
        sum_ptr,
        stride_q_row,
        stride_q_head,
        stride_cache_row,
        stride_cache_head,
        stride_cache_pos,
        stride_scale_row,
        stride_scale_head,
        context,
        scale,
        GROUP: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK: tl.constexpr,
        DIM: tl.constexpr,
        FP8: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        # Keys [0, position] are live (the current token's was just written); rows padding a
        # batch bucket may hold any position, so the context bucket bounds them too.
        length = tl.minimum(tl.load(positions_ptr + row) + 1, context)
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, length)
        offs_d = tl.arange(0, DIM)
        q = tl.load(q_ptr + row * stride_q_row + head * stride_q_head + offs_d).to(tl.float32)
        q = q * scale
        base = row * stride_cache_row + (head // GROUP) * stride_cache_head
        scale_base = row * stride_scale_row + (head // GROUP) * stride_scale_head
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((DIM,), dtype=tl.float32)
        for block in range(start, end, BLOCK):
            offs_n = block + tl.arange(0, BLOCK)
            live = offs_n < end
            where = base + offs_n[:, None] * stride_cache_pos + offs_d[None, :]
            # Both loads issued before any arithmetic: the block's V is in flight meanwhile.
            keys = tl.load(k_cache_ptr + where, mask=live[:, None], other=0.0).to(tl.float32)
            values = tl.load(v_cache_ptr + where, mask=live[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(keys * q[None, :], axis=1)
            if FP8:
                # One scale per key: q . (s * k) = s * (q . k), and sum_n w_n * s_n * v_n.
                k_scales = tl.load(k_scale_ptr + scale_base + offs_n, mask=live, other=0.0)
                v_scales = tl.load(v_scale_ptr + scale_base + offs_n, mask=live, other=0.0)
                scores = scores * k_scales
            scores = tl.where(live, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            correction = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best)
            if FP8:
                acc = acc * correction + tl.sum((weights * v_scales)[:, None] * values, axis=0)
            else:
                acc = acc * correction + tl.sum(weights[:, None] * values, axis=0)
            total = total * correction + tl.sum(weights, axis=0)
            best = new_best
        index = (row * tl.num_programs(1) + head) * SPLITS + split
        tl.store(acc_ptr + index * DIM + offs_d, acc)
        tl.store(max_ptr + index, best)
        tl.store(sum_ptr + index, total)

    @triton.jit
    def attention_reduce_kernel(
        acc_ptr,
        max_ptr,
        sum_ptr,
        positions_ptr,
        out_ptr,
        stride_out_row,
        context,
        SPLITS: tl.constexpr,
        SPLITS_POW2: tl.constexpr,
        SPLIT: tl.constexpr,
        DIM: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        length = tl.minimum(tl.load(positions_ptr + row) + 1, context)
        used = (length + SPLIT - 1) // SPLIT  # splits past the row's length wrote nothing
        offs_s = tl.arange(0, SPLITS_POW2)
        valid = (offs_s < used) & (offs_s < SPLITS)
        first = (row * tl.num_programs(1) + head) * SPLITS
        maxima = tl.load(max_ptr + first + offs_s, mask=valid, other=float("-inf"))
        sums = tl.load(sum_ptr + first + offs_s, mask=valid, other=0.0)
        best = tl.max(maxima, axis=0)
        weights = tl.where(valid, tl.exp(maxima - best), 0.0)
        offs_d = tl.arange(0, DIM)
        accs = tl.load(
            acc_ptr + (first + offs_s[:, None]) * DIM + offs_d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        out = tl.sum(weights[:, None] * accs, axis=0) / tl.sum(weights * sums, axis=0)
        target = out_ptr + row * stride_out_row + head * DIM + offs_d
        tl.store(target, out.to(out_ptr.dtype.element_ty))

    class Kernels:
        rope_store = rope_store_kernel
        partial = attention_partial_kernel
        reduce = attention_reduce_kernel
        next_power_of_2 = staticmethod(triton.next_power_of_2)

    return Kernels


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    rows_per_slot: int = 1,
    slots: torch.Tensor | None = None,
    num_warps: int = 4,
) -> None:
    """Rotate a decode step's fused ``q|k|v`` and store: q into ``q_out``, k and v in the cache.

    ``qkv`` is (b, (heads + 2 * kv_heads) * dim); ``cos``/``sin`` (max_positions, dim);
    ``k_cache``/``v_cache`` (slots, kv_heads, max_positions, dim), row ``i`` of the batch being
    slot ``i``; ``q_out`` (b, heads, dim). An fp8 cache (float8_e4m3fn) takes its scales,
    ``k_scales``/``v_scales`` (slots, kv_heads, max_positions) float32, and gets each new
    vector quantized with a scale of its own. With ``rows_per_slot`` (a verify step: several
    tokens of one sequence, each at its own position) row ``i`` is slot ``i // rows_per_slot``;
    with ``slots`` (a prefill's packed tokens: an int64 tensor of b cache rows) it is
    ``slots[i]``. A prefill's many rows take fewer warps a program (``num_warps``): each
    program moves one head's vector.
    """
    b, heads, dim = q_out.shape
    kv_heads = k_cache.shape[1]
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("rope_store needs contiguous last dimensions")
    k_scales, v_scales = _scales_of(k_cache, k_scales, v_scales)
    if slots is not None and slots.shape != (b,):
        raise ValueError(f"slots must give one cache row for each of the {b} rows")
    kernels().rope_store[(b, heads + kv_heads)](
        qkv,
        cos,
        sin,
        positions,
        positions if slots is None else slots,
        q_out,
        k_cache,
        v_cache,
        k_scales,
        v_scales,
        qkv.stride(0),
        cos.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_scales.stride(0),
        k_scales.stride(1),
        k_cache.shape[2] - 1,
        HEADS=heads,
        KV_HEADS=kv_heads,
        HALF=dim // 2,
        FP8=k_cache.dtype == torch.float8_e4m3fn,
        FP8_MAX=E4M3_MAX,
        MIN_ABSMAX=MIN_KV_ABSMAX,
        ROWS_PER_SLOT=rows_per_slot,
        SLOT_TABLE=slots is not None,
        num_warps=num_warps,
    )


def _scales_of(
    k_cache: torch.Tensor, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale tensors a kernel gets: an fp8 cache's own (checked), else a stand-in the
    kernel never reads (its FP8 branch is compiled out)."""
    if k_cache.dtype != torch.float8_e4m3fn:
        return k_cache, k_cache
    if k_scales is None or v_scales is None:
        raise ValueError("an fp8 KV cache needs its k_scales and v_scales")
    if k_scales.shape != k_cache.shape[:3] or v_scales.stride() != k_scales.stride():
        raise ValueError("k_scales and v_scales must be (slots, kv_heads, positions), alike")
    if k_scales.stride(-1) != 1 or k_scales.dtype != torch.float32:
        raise ValueError("the scales must be float32 with contiguous positions")
    return k_scales, v_scales


def self_check(
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    dim: int,
    kv_format: str = "bf16",
) -> None:
    """Compile and run the kernels once on ``device`` for a cache in ``kv_format`` (rope +
    KV write, decode attention, prefill attention); raise if they fail or are wrong.

    The engine calls this before choosing the kernels, so a GPU or Triton build that can't run
    them (an old architecture, a broken install, no E4M3 conversions before compute
    capability 8.9) falls back to SDPA at start-up instead of failing every request.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    length, rows = 70, 2
    fp8 = kv_format == "fp8"

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    keys, values = draw(rows, kv_heads, length, dim), draw(rows, kv_heads, length, dim)
    k_scales = v_scales = None
    if fp8:
        (keys, k_scales), (values, v_scales) = quantize_kv(keys), quantize_kv(values)
    positions = torch.tensor([length - 1, 5], device=device)
    zeros = torch.zeros(length, dim, device=device, dtype=dtype)
    queries = torch.empty(rows, heads, dim, device=device, dtype=dtype)
    qkv = draw(rows, (heads + 2 * kv_heads) * dim)
    # cos 1, sin 0: the rotation is the identity, so q comes back as it went in.
    rope_store(qkv, zeros + 1, zeros, positions, keys, values, queries, k_scales, v_scales)
    if not torch.equal(queries.reshape(rows, -1), qkv[:, : heads * dim]):
        raise RuntimeError("rope_store wrote wrong queries")
    stored_keys = _widened(keys, k_scales, dtype)
    stored_values = _widened(values, v_scales, dtype)
    written = stored_keys[torch.arange(rows, device=device), :, positions]
    given = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    if fp8:
        # Within E4M3's rounding of each vector (2^-4 of its largest element), not bitwise:
        # a GPU's float32 division may round a last bit differently from torch's.
        bound = given.float().abs().amax(dim=-1, keepdim=True) / 16 * 1.01
        right = bool(((written.float() - given.float()).abs() <= bound).all())
    else:
        right = torch.equal(written, given)
    if not right:
        raise RuntimeError("rope_store wrote wrong keys")
    out = torch.empty(rows, heads * dim, device=device, dtype=dtype)
    decode_attention(queries, keys, values, positions, length, dim**-0.5, out, k_scales, v_scales)
    group = heads // kv_heads
    for row, position in enumerate(positions.tolist()):
        k = stored_keys[row, :, : position + 1].float().repeat_interleave(group, dim=0)
        v = stored_values[row, :, : position + 1].float().repeat_interleave(group, dim=0)
        q = queries[row].float()[:, None, :]
        expected = torch.softmax(q @ k.transpose(1, 2) * dim**-0.5, dim=-1) @ v
        error = (out[row].float() - expected.reshape(-1)).abs().max().item()
        if not error < 0.05:
            raise RuntimeError(f"decode attention differs from the reference by {error:.3g}")
    # The prefill kernel (imported here: it builds on this module): row 0 as a prompt of
    # three tokens continuing at position 60, causal among them.
    from model.fast.prefill_attention import prefill_attention, query_blocks

    prompt = draw(3, heads, dim)
    attended = torch.empty(3, heads * dim, device=device, dtype=dtype)
    blocks = query_blocks([3], [60], [0]).to(device)
    prefill_attention(prompt, keys, values, blocks, dim**-0.5, attended, k_scales, v_scales)
    for j in range(3):
        k = stored_keys[0, :, : 61 + j].float().repeat_interleave(group, dim=0)
        v = stored_values[0, :, : 61 + j].float().repeat_interleave(group, dim=0)
        q = prompt[j].float()[:, None, :]
        expected = torch.softmax(q @ k.transpose(1, 2) * dim**-0.5, dim=-1) @ v
        error = (attended[j].float() - expected.reshape(-1)).abs().max().item()
        if not error < 0.05:
            raise RuntimeError(f"prefill attention differs from the reference by {error:.3g}")


def _widened(cache: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A cache as values of ``dtype`` (dequantized when it is fp8)."""
    return cache if scales is None else dequantize_kv(cache, scales, dtype)


def split_size(context: int, split_keys: int | None = None) -> int:
    """Keys per split-K program for a context bucket: ``split_keys`` (default
    ``SPLIT_KEYS``), or more for long ones."""
    size = SPLIT_KEYS if split_keys is None else split_keys
    while -(-context // size) > MAX_SPLITS:
        size *= 2
    return size


class SplitPartials:
    """Split-K attention's partial results for ``rows`` query rows over a context bucket:
    each (row, head, key chunk)'s weighted values, running maximum and sum, which
    :meth:`reduce` combines. The decode kernel and the verify kernel
    (``model.fast.verify_attention``) both write this layout."""

    def __init__(
        self,
        rows: int,
        heads: int,
        dim: int,
        context: int,
        device: torch.device,
        split_keys: int | None = None,
        block_keys: int | None = None,
    ):
        self.split = split_size(context, split_keys)
        self.splits = -(-context // self.split)
        self.block = min(BLOCK_KEYS if block_keys is None else block_keys, self.split)
        self.context = context
        shape = (rows, heads, self.splits)
        self.acc = torch.empty((*shape, dim), dtype=torch.float32, device=device)
        self.maxima = torch.empty(shape, dtype=torch.float32, device=device)
        self.sums = torch.empty(shape, dtype=torch.float32, device=device)

    def reduce(self, positions: torch.Tensor, out: torch.Tensor) -> None:
        """Combine the chunks of each row's keys ``[0, min(position + 1, context))`` into
        ``out`` (rows, heads * dim)."""
        rows, heads, _, dim = self.acc.shape
        ops = kernels()
        ops.reduce[(rows, heads)](
            self.acc,
            self.maxima,
            self.sums,
            positions,
            out,
            out.stride(0),
            self.context,
            SPLITS=self.splits,
            SPLITS_POW2=ops.next_power_of_2(self.splits),
            SPLIT=self.split,
            DIM=dim,
        )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    context: int,
    scale: float,
    out: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    """One query per row over its own keys ``[0, min(position + 1, context))``, into ``out``.

    ``q`` (b, heads, dim); caches (slots, kv_heads, T, dim) with rows ``[:b]`` in use;
    ``out`` (b, heads * dim). Query head ``h`` reads KV head ``h // (heads // kv_heads)``.
    An fp8 cache comes with its scales (see :func:`rope_store`).
    """
    b, heads, dim = q.shape
    k_scales, v_scales = _scales_of(k_cache, k_scales, v_scales)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    split_keys, block_keys, warps = attention_settings(fp8, b)
    partials = SplitPartials(b, heads, dim, context, q.device, split_keys, block_keys)
    kernels().partial[(b, heads, partials.splits)](
        q,
        k_cache,
        v_cache,
        k_scales,
        v_scales,
        positions,
        partials.acc,
        partials.maxima,
        partials.sums,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_scales.stride(0),
        k_scales.stride(1),
        context,
        scale,
        GROUP=heads // k_cache.shape[1],
        SPLITS=partials.splits,
        SPLIT=partials.split,
        BLOCK=partials.block,
        DIM=dim,
        FP8=fp8,
        num_warps=warps,
    )
    partials.reduce(positions, out)
