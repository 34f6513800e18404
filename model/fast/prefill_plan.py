"""Which prompt tokens the next prefill runs, and counts of what prefills did.

The engine prefills between two decode steps, and every running sequence waits for it, so the
tokens one prefill takes are bounded (``FastEngineOptions.prefill_tokens``). Chunked, the
budget is filled across the waiting prompts in order and the last one taken is cut: a long
prompt (a refine carries a whole page) is prefilled over several loop iterations, with decode
steps in between, instead of stalling everyone for its whole length. Unchunked (the engine
before chunking), whole prompts are taken while they fit, and at least one however long.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def plan_chunks(
    waiting: Iterable[tuple[int, int]], budget: int, chunked: bool
) -> list[tuple[int, int]]:
    """``(start, end)`` of the tokens to prefill now for the first waiting prompts.

    ``waiting`` gives each prompt's ``(start, length)`` in order: ``start`` tokens are in its
    row already (earlier chunks, a shared prefix). It is read lazily, only as far as the
    budget goes. Every prompt in the plan but the last ends at its ``length``.
    """
    plan: list[tuple[int, int]] = []
    for start, length in waiting:
        left = length - start
        if chunked:
            if budget <= 0:
                break
            end = start + min(left, budget)
        else:
            if plan and left > budget:
                break
            end = length
        plan.append((start, end))
        budget -= end - start
        if end < length:
            break
    return plan


@dataclass
class PrefillStats:
    """What the engine's prefills did since it was built (the benchmarks read it)."""

    forwards: int = 0  # prefill forwards run
    prompts: int = 0  # prompts whose prefill completed
    computed_tokens: int = 0  # prompt tokens run through the model
    reused_tokens: int = 0  # prompt tokens whose KV was copied from the prefix cache
    cuts: int = 0  # forwards that ended inside a prompt (it went on at the next one)
    # Host seconds in prefills: the forward's launches and, when prompts completed, the wait
    # for their first tokens (a cut-only chunk's GPU time overlaps the next decode step).
    seconds: float = 0.0
