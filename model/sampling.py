"""Batched, per-row sampling for both engines: one pure tensor function, graph-capturable.

Every row carries its own temperature, top-p, repetition penalty and seed. The random draw
is a Gumbel-max race whose noise is a counter-based hash of (seed, position, token id), so a
seeded request samples the same tokens whatever else shares its batch, on CPU and GPU alike,
and no ``torch.Generator`` (which can't be per-row or captured in a CUDA graph) is involved.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so the int64
# products never overflow (signed overflow would be undefined behaviour in the kernels).
_MUL_A = 0x45D9F3B
_MUL_B = 0x2C1B3C6D
_GOLDEN = 0x1E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wang/Mueller style) on int64 tensors holding values < 2**32."""
    x = ((x >> 16) ^ x) * _MUL_A & _MASK32
    x = ((x >> 16) ^ x) * _MUL_A & _MASK32
    return (x >> 16) ^ x


def hashed_uniform(seed: torch.Tensor, counter: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1), shape (rows, V), a pure function of (seed, counter, token id).

    ``seed`` and ``counter`` are int64 (rows,), ``vocab`` is ``arange(V)`` as int64.
    """
    row = _mix32((_mix32(seed & _MASK32) ^ (counter * _MUL_B & _MASK32)) & _MASK32)
    x = _mix32((row[:, None] + vocab[None, :] * _GOLDEN) & _MASK32)
    # 24 random bits fit a float32 mantissa exactly; +0.5 keeps u away from 0 and 1.
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def penalize(
    logits: torch.Tensor,
    seen: torch.Tensor,
    temperature: torch.Tensor,
    repetition_penalty: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy token of the penalized logits, and the penalized logits / temperature."""
    penalty = repetition_penalty[:, None]
    penalized = torch.where(
        seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits
    )
    return penalized.argmax(dim=-1), penalized / temperature[:, None]


def race(
    sorted_logits: torch.Tensor,
    order: torch.Tensor,
    probs: torch.Tensor,
    cumulative: torch.Tensor,
    top_p: torch.Tensor,
    greedy: torch.Tensor,
    greedy_token: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    vocab: torch.Tensor,
) -> torch.Tensor:
    """Top-p cut and Gumbel-max draw over logits sorted in descending order."""
    # Keep a token while the mass strictly above it is below top_p: the same set as
    # transformers' TopPLogitsWarper (which always keeps the most likely token).
    keep = (cumulative - probs) < top_p[:, None]
    uniform = hashed_uniform(seed, counter, vocab).gather(1, order)
    gumbel = -torch.log(-torch.log(uniform))
    contest = torch.where(keep, sorted_logits + gumbel, torch.full_like(sorted_logits, -torch.inf))
    choice = contest.argmax(dim=-1, keepdim=True)
    sampled_token = order.gather(1, choice).squeeze(1)
    return torch.where(greedy, greedy_token, sampled_token)


def sample_rows(
    logits: torch.Tensor,
    seen: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    repetition_penalty: torch.Tensor,
    greedy: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    vocab: torch.Tensor,
    *,
    penalize_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = penalize,
    race_fn: Callable[..., torch.Tensor] = race,
) -> torch.Tensor:
    """Next token per row, with transformers' semantics for each setting.

    ``logits`` (rows, V) float32; ``seen`` (rows, V) bool marks prompt and generated tokens
    (the repetition penalty's set, as in transformers: prompt included); ``temperature`` must
    be > 0 on sampled rows (greedy rows ignore it); ``greedy`` (rows,) bool. Order as in
    transformers' processors: repetition penalty, temperature, top-p, then the draw.
    ``penalize_fn`` / ``race_fn`` may be compiled versions of :func:`penalize` / :func:`race`
    (the sort and cumulative sum between them stay eager: Inductor failed on the scan).
    """
    greedy_token, scaled = penalize_fn(logits, seen, temperature, repetition_penalty)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    return race_fn(
        sorted_logits, order, probs, cumulative, top_p, greedy, greedy_token, seed, counter, vocab
    )
