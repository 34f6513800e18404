"""Attention of a verify step: a slot's ``k + 1`` queries over its keys, each key read once.

A verify step (``model.fast.verify``) has ``k + 1`` query tokens per slot at successive
positions ``p..p+k``; token ``i`` sees the slot's keys ``[0, p + i]`` (its own and those before
it were just written). The decode kernel (``model.fast.kernels.decode_attention``), given
each token as a row of its own, would read every key ``k + 1`` times: at 8 slots that made a
verify step 2.5x a decode step on an H200. Here one program takes one
(slot, head, key chunk) and all the slot's queries: a block of keys is loaded once and scored
against every query (a ``(queries, keys)`` tile), each query masked at its own position. The
partial results have the decode kernel's layout (``kernels.SplitPartials``), so its reduce
kernel finishes them.

The two products run on the tensor cores in bf16 (the keys and values are exact there, bf16
or E4M3; the scaled queries and the softmax weights round to bf16) with float32 sums: an
IEEE float32 version ran without tensor cores and was 3-4x slower than the decode kernel's
row-per-token reading on an H200. Built on first use; under ``TRITON_INTERPRET=1`` it runs on
CPU (the tests), in float32 (numpy has no bf16).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from model.fast import kernels

if kernels.HAVE_TRITON:
    import triton
    import triton.language as tl

# Keys per inner block: the (queries, keys) tile of scores is 16 x BLOCK float32 values.
BLOCK_KEYS = 32
ATTENTION_WARPS = 4


@functools.cache
def _kernel() -> Any:
    if not kernels.HAVE_TRITON:
        raise RuntimeError("the verify attention needs Triton (pip install triton)")

    @triton.jit
    def verify_partial_kernel(
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
        HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK: tl.constexpr,
        DIM: tl.constexpr,
        FP8: tl.constexpr,
        QUERIES: tl.constexpr,  # a slot's rows (k + 1)
        QUERIES_POW2: tl.constexpr,  # the tile's side, a power of two (at least 16)
        DOT_F32: tl.constexpr,  # float32 tiles (the interpreter: numpy has no bf16)
    ):
        slot = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        offs_q = tl.arange(0, QUERIES_POW2)
        real = offs_q < QUERIES
        rows = slot * QUERIES + offs_q
        positions = tl.load(positions_ptr + rows, mask=real, other=-1)
        lengths = tl.minimum(positions + 1, context)  # per query; 0 for the tile's padding
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, tl.max(lengths, axis=0))
        offs_d = tl.arange(0, DIM)
        q = tl.load(
            q_ptr + rows[:, None] * stride_q_row + head * stride_q_head + offs_d[None, :],
            mask=real[:, None],
            other=0.0,
        ).to(tl.float32)
        q = q * scale
        base = slot * stride_cache_row + (head // GROUP) * stride_cache_head
        scale_base = slot * stride_scale_row + (head // GROUP) * stride_scale_head
        best = tl.full((QUERIES_POW2,), float("-inf"), tl.float32)
        total = tl.zeros((QUERIES_POW2,), dtype=tl.float32)
        acc = tl.zeros((QUERIES_POW2, DIM), dtype=tl.float32)
        for block in range(start, end, BLOCK):
            offs_n = block + tl.arange(0, BLOCK)
            live = offs_n < end
            where = base + offs_n[:, None] * stride_cache_pos + offs_d[None, :]
            keys = tl.load(k_cache_ptr + where, mask=live[:, None], other=0.0)
            values = tl.load(v_cache_ptr + where, mask=live[:, None], other=0.0)
            if DOT_F32:
                keys = keys.to(tl.float32)
                values = values.to(tl.float32)
            else:  # E4M3 and bf16 are both exact in bf16: the tensor cores take them as bf16
                keys = keys.to(tl.bfloat16)
                values = values.to(tl.bfloat16)
            scores = tl.dot(q.to(keys.dtype), tl.trans(keys))  # (queries, keys), float32
            if FP8:
                k_scales = tl.load(k_scale_ptr + scale_base + offs_n, mask=live, other=0.0)
                v_scales = tl.load(v_scale_ptr + scale_base + offs_n, mask=live, other=0.0)
                scores = scores * k_scales[None, :]
            visible = offs_n[None, :] < lengths[:, None]
            scores = tl.where(visible, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            # A query that sees none of this block (nor any before) keeps -inf: exp of
            # (-inf) - (-inf) would be NaN, so those rows subtract 0 instead.
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            correction = tl.exp(best - safe)
            weights = tl.exp(scores - safe[:, None])
            if FP8:  # noqa: SIM108 - a constexpr branch, compiled out
                weighted = weights * v_scales[None, :]
            else:
                weighted = weights
            acc = acc * correction[:, None] + tl.dot(weighted.to(values.dtype), values)
            total = total * correction + tl.sum(weights, axis=1)
            best = new_best
        index = (rows * HEADS + head) * SPLITS + split
        tl.store(acc_ptr + index[:, None] * DIM + offs_d[None, :], acc, mask=real[:, None])
        tl.store(max_ptr + index, best, mask=real)
        tl.store(sum_ptr + index, total, mask=real)

    return verify_partial_kernel


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    context: int,
    scale: float,
    out: torch.Tensor,
    queries_per_slot: int,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    """What ``kernels.decode_attention`` would give with each query a row of its own on its
    slot, reading each key once per slot: ``q`` (slots * queries_per_slot, heads, dim), the
    rows of a slot together and in position order; ``positions`` one per row; ``out``
    (rows, heads * dim)."""
    rows, heads, dim = q.shape
    if rows % queries_per_slot:
        raise ValueError(f"{rows} rows are not whole slots of {queries_per_slot}")
    k_scales, v_scales = kernels._scales_of(k_cache, k_scales, v_scales)
    partials = kernels.SplitPartials(rows, heads, dim, context, q.device)
    _kernel()[(rows // queries_per_slot, heads, partials.splits)](
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
        HEADS=heads,
        GROUP=heads // k_cache.shape[1],
        SPLITS=partials.splits,
        SPLIT=partials.split,
        BLOCK=min(BLOCK_KEYS, partials.split),
        DIM=dim,
        FP8=k_cache.dtype == torch.float8_e4m3fn,
        QUERIES=queries_per_slot,
        QUERIES_POW2=max(16, triton.next_power_of_2(queries_per_slot)),
        DOT_F32=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=ATTENTION_WARPS,
    )
    partials.reduce(positions, out)
