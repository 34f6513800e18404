"""CUDA graphs of the decode step, one per (batch bucket, context bucket).

On CUDA a step over ``b`` rows with keys ``[0, ctx)`` replays the graph captured for the
smallest buckets holding ``b`` and ``ctx``, so a step is one graph launch, and short contexts
don't read the whole cache. The buckets are fine: a step reads K/V up to its context bucket
for every row of its batch bucket, so coarse ones waste bandwidth (at batch 32, 1024 vs 640
keys is ~2 ms). Graphs are captured on first use or all at once (:meth:`DecodeGraphs.capture_all`,
at warm-up), largest first so that their shared memory pool is sized once.

Without graphs (on CPU, when turned off, or once a capture failed) the step runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

BATCH_BUCKETS = [1, 2, 4, 8, *range(12, 33, 4), *range(40, 65, 8), 80, 96, 112, 128, 160, 192, 256]
CONTEXT_BUCKETS = [
    *range(128, 1024, 128),
    *range(1024, 2048, 256),
    *range(2048, 4096, 512),
    *range(4096, 32768 + 1, 1024),
]


def bucket_sizes(candidates: list[int], limit: int) -> list[int]:
    """The candidates below ``limit``, and ``limit`` itself, in order."""
    return sorted({c for c in candidates if c < limit} | {limit})


class DecodeGraphs:
    """Runs decode steps, through captured CUDA graphs when ``enabled``.

    ``step(b, ctx)`` is the decode step (it updates its state in place); ``step_state(b)``
    gives the tensors it changes for rows ``[:b]``, which a capture saves and puts back, so
    capturing in the middle of serving leaves the live rows as they were.
    """

    def __init__(
        self,
        step: Callable[[int, int], None],
        step_state: Callable[[int], tuple[torch.Tensor, ...]],
        device: torch.device,
        *,
        slots: int,
        max_seq_len: int,
        enabled: bool,
    ) -> None:
        self._step = step
        self._step_state = step_state
        self.device = device
        self.enabled = enabled
        self.batch_buckets = bucket_sizes(BATCH_BUCKETS, slots)
        self.context_buckets = bucket_sizes(CONTEXT_BUCKETS, max_seq_len)
        self.captured: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool: Any = None

    def batch_bucket(self, b: int) -> int:
        return next(size for size in self.batch_buckets if size >= b)

    def context_bucket(self, ctx: int) -> int:
        return next(size for size in self.context_buckets if size >= ctx)

    def run(self, b: int, ctx: int) -> None:
        """One step for rows ``[:b]`` with keys ``[0, ctx)``: its graph (captured now if
        new), or the step itself when graphs are off."""
        if self.enabled:
            bb = self.batch_bucket(b)
            cb = self.context_bucket(ctx)
            graph = self.captured.get((bb, cb))
            if graph is None:
                try:
                    graph = self.capture(bb, cb)
                except RuntimeError as error:
                    # Some layers (e.g. a quantization kernel that syncs) can't be captured;
                    # eager decode is slower but correct.
                    log.warning("CUDA graph capture failed (%s); decoding eagerly", error)
                    self.enabled = False
                    self.captured.clear()
            if graph is not None:
                graph.replay()
        if not self.enabled:
            with torch.inference_mode():
                self._step(b, ctx)

    def capture(self, b: int, ctx: int) -> torch.cuda.CUDAGraph:
        """Capture the step for (b, ctx); live rows' state is saved and put back around it."""
        state = self._step_state(b)
        saved = [tensor.clone() for tensor in state]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(stream):
                self._step(b, ctx)  # warm-up: compiles kernels, creates cuBLAS handles
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(b, ctx)
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        self.captured[(b, ctx)] = graph
        log.debug("captured decode graph batch=%d context=%d", b, ctx)
        return graph

    def capture_all(self, max_batch: int | None = None) -> int:
        """Capture every (batch, context) graph up to ``max_batch`` rows; how many."""
        if not self.enabled:
            return 0
        sizes = [s for s in self.batch_buckets if max_batch is None or s <= max_batch]
        if max_batch is not None and max_batch not in sizes:
            sizes.append(self.batch_bucket(max_batch))
        for b in sorted(sizes, reverse=True):  # largest first: the pool is sized once
            for ctx in self.context_buckets:
                if (b, ctx) not in self.captured:
                    self.capture(b, ctx)
        return len(self.captured)

    def clear(self) -> None:
        """Drop every graph (the step changed: they would replay the old one)."""
        self.captured.clear()
        # A fresh pool: the old graphs' memory can't be handed to new captures while any
        # tensor of theirs may still be referenced.
        self._pool = None
