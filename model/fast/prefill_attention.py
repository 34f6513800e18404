"""Attention of a prefill, read straight from the slot cache: a flash-attention forward per
(block of a prompt's queries, head).

A prefill packs its prompts into one sequence of tokens; each prompt sits in a cache row and
may continue keys that row already holds (a shared prefix copied in, or the earlier chunks of
a long prompt). Its K and V are written into the row first (``kernels.rope_store`` with a
slot per token); then query ``j`` of a prompt starting at position ``p`` sees the row's keys
``[0, p + j]``. The path before this one gathered the prompts into a padded batch, copied each
continuing row's keys out of the cache (dequantized, for an FP8 cache) and gave SDPA an
explicit mask: on an H200 those gathers, copies and masks took as long as the prompt's
matmuls (``python -m bench.step_profile --prefill-bursts 64``). Here a program loads a block
of :data:`BLOCK_QUERIES` queries of one prompt and one head, walks the row's keys in blocks of
:data:`BLOCK_KEYS` with an online softmax, and writes its normalized output into the packed
output: no copy of K or V, no mask tensor, every prompt in one launch.

The products run on the tensor cores in bf16 with float32 sums, as in
``model.fast.verify_attention`` (keys and values are exact in bf16, E4M3 too; an FP8 cache's
per-key scales multiply the scores and the softmax weights). Under ``TRITON_INTERPRET=1`` the
kernel runs on CPU in float32 (the tests).
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

# Queries of one prompt a program takes (a block may be short: a prompt's last), and keys per
# inner step: the scores tile is BLOCK_QUERIES x BLOCK_KEYS float32.
BLOCK_QUERIES = 64
BLOCK_KEYS = 64
ATTENTION_WARPS = 4
ATTENTION_STAGES = 2


@functools.cache
def _kernel() -> Any:
    if not kernels.HAVE_TRITON:
        raise RuntimeError("the prefill attention needs Triton (pip install triton)")

    @triton.jit
    def prefill_attention_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        k_scale_ptr,
        v_scale_ptr,
        blocks_ptr,
        out_ptr,
        stride_q_row,
        stride_q_head,
        stride_out_row,
        stride_cache_row,
        stride_cache_head,
        stride_cache_pos,
        stride_scale_row,
        stride_scale_head,
        blocks,
        scale,
        GROUP: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DIM: tl.constexpr,
        FP8: tl.constexpr,
        DOT_F32: tl.constexpr,  # float32 tiles (the interpreter: numpy has no bf16)
    ):
        block = tl.program_id(0)
        head = tl.program_id(1)
        # The block table (see query_blocks): packed index of the block's first query, its
        # query count, its cache row, the position of its first query.
        first_token = tl.load(blocks_ptr + block)
        count = tl.load(blocks_ptr + blocks + block)
        slot = tl.load(blocks_ptr + 2 * blocks + block).to(tl.int64)
        first_position = tl.load(blocks_ptr + 3 * blocks + block)
        offs_q = tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, DIM)
        real = offs_q < count
        tokens = (first_token + offs_q).to(tl.int64)
        q = tl.load(
            q_ptr + tokens[:, None] * stride_q_row + head * stride_q_head + offs_d[None, :],
            mask=real[:, None],
            other=0.0,
        ).to(tl.float32)
        q = q * scale
        query_positions = first_position + offs_q
        end = first_position + count  # the block's last query sees keys [0, end)
        base = slot * stride_cache_row + (head // GROUP) * stride_cache_head
        scale_base = slot * stride_scale_row + (head // GROUP) * stride_scale_head
        best = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_Q, DIM), dtype=tl.float32)
        for start in range(0, end, BLOCK_K):
            offs_n = start + tl.arange(0, BLOCK_K)
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
            visible = (offs_n[None, :] <= query_positions[:, None]) & live[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            # Every real query sees key 0, but a block's padding queries may see nothing yet:
            # exp((-inf) - (-inf)) would be NaN, so those rows subtract 0 instead.
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
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        target = out_ptr + tokens[:, None] * stride_out_row + head * DIM + offs_d[None, :]
        tl.store(target, out.to(out_ptr.dtype.element_ty), mask=real[:, None])

    return prefill_attention_kernel


def query_blocks(lengths: list[int], starts: list[int], rows: list[int]) -> torch.Tensor:
    """The kernel's block table for prompts packed in order: (4, blocks) int32, per block the
    packed index of its first query, how many queries it has (:data:`BLOCK_QUERIES` at most,
    all of one prompt), the prompt's cache row and the position of the block's first query."""
    block = BLOCK_QUERIES
    table: list[list[int]] = [[], [], [], []]
    packed = 0
    for length, start, row in zip(lengths, starts, rows, strict=True):
        for offset in range(0, length, block):
            table[0].append(packed + offset)
            table[1].append(min(block, length - offset))
            table[2].append(row)
            table[3].append(start + offset)
        packed += length
    return torch.tensor(table, dtype=torch.int32)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    """Causal attention of packed prompt tokens over their rows' cached keys, into ``out``.

    ``q`` (tokens, heads, dim) rotated queries in packed order; caches (slots, kv_heads, T,
    dim) already holding every prompt's own K and V; ``blocks`` a :func:`query_blocks` table
    on ``q``'s device; ``out`` (tokens, heads * dim), written at the table's tokens only. An
    fp8 cache comes with its scales (see ``kernels.rope_store``).
    """
    _, heads, dim = q.shape
    if blocks.dtype != torch.int32 or blocks.dim() != 2 or blocks.shape[0] != 4:
        raise ValueError("blocks must be a (4, n) int32 table from query_blocks")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("prefill_attention needs contiguous last dimensions")
    k_scales, v_scales = kernels._scales_of(k_cache, k_scales, v_scales)
    count = blocks.shape[1]
    if count == 0:
        return
    _kernel()[(count, heads)](
        q,
        k_cache,
        v_cache,
        k_scales,
        v_scales,
        blocks.contiguous(),
        out,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        k_scales.stride(0),
        k_scales.stride(1),
        count,
        scale,
        GROUP=heads // k_cache.shape[1],
        BLOCK_Q=BLOCK_QUERIES,
        BLOCK_K=BLOCK_KEYS,
        DIM=dim,
        FP8=k_cache.dtype == torch.float8_e4m3fn,
        DOT_F32=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=ATTENTION_WARPS,
        num_stages=ATTENTION_STAGES,
    )
