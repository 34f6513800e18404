"""A Llama model run over a slot KV cache: the one object the fast engine drives.

:class:`FastLlama` puts the pieces together: the model's weights (``weights``), the slot cache
with every row's decode state (``cache``), the forward (``forward``) and the decode graphs
(``graphs``). The engine writes rows' state through ``cache`` and runs the model through the
methods here: :meth:`~FastLlama.prefill` and :meth:`~FastLlama.sample` for newcomers,
:meth:`~FastLlama.launch` / :meth:`~FastLlama.collect` for decode steps, and
:meth:`~FastLlama.verify` for a speculative step (``model.fast.verify``: a draft of
``draft_tokens`` per row, with graphs of its own for up to ``verify_rows`` rows).
"""

from __future__ import annotations

from typing import Any

import torch

from model.fast.forward import PREFILL_TOKEN_BUCKET, LlamaForward, choose_attention
from model.fast.graphs import DecodeGraphs
from model.fast.kv_cache import SlotCache
from model.fast.verify import VerifyStep
from model.fast.weights import LlamaWeights


class FastLlama:
    """Weights, slot cache, forward and decode graphs of one Llama model."""

    def __init__(
        self,
        model: Any,
        *,
        max_seq_len: int,
        max_slots: int | None,
        memory_fraction: float,
        use_cuda_graphs: bool,
        compile_kernels: bool | str,
        attention: str,
        weight_format: str = "bf16",
        draft_tokens: int = 0,
        verify_rows: int = 16,
        kv_cache: str = "bf16",
    ) -> None:
        self.weights = weights = LlamaWeights(model, weight_format)
        # Chosen before the cache takes the free memory (on a GPU it runs the kernels once).
        self._attention_asked = attention
        chosen = choose_attention(attention, weights, kv_cache)
        self.max_seq_len = int(max_seq_len)
        cos, sin = weights.rope_tables(self.max_seq_len)
        device = weights.device
        self.cache = SlotCache(
            layers=weights.n_layers,
            kv_heads=weights.n_kv,
            head_dim=weights.head_dim,
            max_seq_len=self.max_seq_len,
            vocab_size=weights.vocab_size,
            dtype=weights.dtype,
            device=device,
            max_slots=max_slots,
            memory_fraction=memory_fraction,
            draft_tokens=draft_tokens,
            kv_format=kv_cache,
        )
        self.forward = LlamaForward(
            weights,
            self.cache,
            cos=cos,
            sin=sin,
            attention=chosen,
            compile_kernels=compile_kernels,
        )
        self.graphs = DecodeGraphs(
            self.forward.decode_body,
            self.cache.step_state,
            device,
            slots=self.cache.slots,
            max_seq_len=self.max_seq_len,
            enabled=use_cuda_graphs and device.type == "cuda",
        )
        self.verifier: VerifyStep | None = None
        self.verify_graphs: DecodeGraphs | None = None
        self.verify_rows = 0
        if draft_tokens > 0:
            self.verifier = VerifyStep(self.forward)
            self.verify_rows = min(verify_rows, self.cache.slots)
            self.verify_graphs = DecodeGraphs(
                self.verifier.body,
                self.cache.step_state,
                device,
                slots=self.verify_rows,
                max_seq_len=self.max_seq_len,
                enabled=use_cuda_graphs and device.type == "cuda",
            )
        # Two host buffers (pinned on CUDA) for the tokens of two steps in flight.
        self._pinned = pinned = device.type == "cuda"
        slots = self.cache.slots
        self._host_tokens = [
            torch.zeros(slots, dtype=torch.int64, pin_memory=pinned) for _ in range(2)
        ]
        self._done = [torch.cuda.Event() for _ in range(2)] if pinned else []
        self._next_buffer = 0
        # The verify step's drafts in, verdicts out (it is collected before the next step).
        width = max(draft_tokens, 1)
        self._host_draft = torch.zeros((slots, width), dtype=torch.int64, pin_memory=pinned)
        self._host_draft_length = torch.zeros(slots, dtype=torch.int64, pin_memory=pinned)
        self._host_verified = torch.zeros((slots, width + 1), dtype=torch.int64, pin_memory=pinned)
        self._host_accepted = torch.zeros(slots, dtype=torch.int64, pin_memory=pinned)
        self._verified = torch.cuda.Event() if pinned else None

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def vocab_size(self) -> int:
        return self.weights.vocab_size

    @property
    def attention(self) -> str:
        """The decode attention in use (``triton``, ``sdpa`` or ``matmul``)."""
        return self.forward.attention

    def set_attention(self, attention: str) -> None:
        """Switch the decode attention (benchmarks compare them); graphs are captured again."""
        self.forward.attention = choose_attention(attention, self.weights, self.cache.kv_format)
        self._attention_asked = attention
        self.clear_graphs()

    def clear_graphs(self) -> None:
        """Drop every captured graph, decode and verify (the step changed: new weights, a
        new attention or cache format); they are captured again on use or at warm-up."""
        self.graphs.clear()
        if self.verify_graphs is not None:
            self.verify_graphs.clear()

    def set_kv_cache(self, kv_cache: str) -> None:
        """Store the KV cache in another format, same slots (benchmarks compare them): the
        cached keys are dropped, so call it with no row live; graphs are captured again."""
        self.clear_graphs()
        self.cache.set_kv_format(kv_cache)
        # The Triton kernels' self-check is per format (fp8 needs E4M3 conversions).
        self.forward.attention = choose_attention(self._attention_asked, self.weights, kv_cache)

    def register_ban_tables(self, tables: list[torch.Tensor]) -> list[int]:
        """:meth:`SlotCache.register_ban_tables`, refused once a graph has been captured
        (the graphs read ``ban_next``)."""
        if self.graphs.captured or (self.verify_graphs and self.verify_graphs.captured):
            raise RuntimeError("register the banned-strings tables before capturing graphs")
        return self.cache.register_ban_tables(tables)

    # ----------------------------------------------------------------- prefill

    def prefill(
        self, rows: list[int], prompts: list[list[int]], starts: list[int] | None = None
    ) -> torch.Tensor:
        """Run the prompts into the cache rows; their last-position logits (n, V) float32.

        ``starts[i]`` (default 0): where ``prompts[i]`` begins in its row, whose positions
        before it already hold that sequence's keys (see :meth:`LlamaForward.prefill`).
        """
        bucket = self.graphs.batch_bucket(len(rows))
        return self.forward.prefill(rows, prompts, bucket, starts)

    def sample(self, rows: list[int], logits: torch.Tensor, counters: list[int]) -> list[int]:
        """Sample one token per row from given logits (used after prefill)."""
        return self.forward.sample(rows, logits, counters)

    def warm_prefill(self, max_tokens: int) -> int:
        """Run one prefill per token bucket up to ``max_tokens`` (first-call costs paid now).

        A size past one row's length is packed over several rows, as a burst of prompts is.
        The rows are used as scratch: call before serving. Returns how many prefills ran.
        """
        row_limit = self.max_seq_len - 1
        limit = min(max_tokens, row_limit * self.slots)
        sizes = range(PREFILL_TOKEN_BUCKET, limit + PREFILL_TOKEN_BUCKET, PREFILL_TOKEN_BUCKET)
        for size in sizes:
            size = min(size, limit)
            pieces = [min(row_limit, size - start) for start in range(0, size, row_limit)]
            self.prefill(list(range(len(pieces))), [[0] * piece for piece in pieces])
        # A few multi-prompt batches: their attention and lm_head shapes differ.
        for count in (2, 4, 8):
            if count <= self.slots and count * 16 <= limit:
                self.prefill(list(range(count)), [[0] * 16] * count)
        # Prompts continuing their rows (chunks, shared prefixes): the masked attention,
        # alone and next to a fresh prompt.
        if self.slots >= 2 and limit >= 48:
            self.prefill([0], [[0] * 16], starts=[16])
            self.prefill([0, 1], [[0] * 16, [0] * 16], starts=[32, 0])
        return len(sizes)

    # ------------------------------------------------------------------ decode

    def capture_all(self, max_batch: int | None = None) -> int:
        """Capture every decode graph up to ``max_batch`` rows, and the verify step's up to
        ``verify_rows``; how many there are."""
        count = self.graphs.capture_all(max_batch)
        if self.verify_graphs is not None:
            rows = self.verify_rows if max_batch is None else min(max_batch, self.verify_rows)
            count += self.verify_graphs.capture_all(rows)
        return count

    def decode(self, b: int, ctx: int) -> list[int]:
        """Run one step for rows ``[:b]`` (context bucket ``ctx``); the new tokens."""
        return self.collect(self.launch(b, ctx))

    def launch(self, b: int, ctx: int) -> tuple[int, int]:
        """Start one decode step for rows ``[:b]``; :meth:`collect` its tokens later.

        On a GPU this only enqueues work, so the caller can do its bookkeeping for the
        previous step while this one runs. Two steps may be in flight's reach at once (the
        host copies alternate between two pinned buffers): collect each before launching
        the one after next.
        """
        self.graphs.run(b, min(ctx, self.max_seq_len))
        slot = self._next_buffer
        self._next_buffer ^= 1
        if self._pinned:
            self._host_tokens[slot][:b].copy_(self.cache.tokens[:b], non_blocking=True)
            self._done[slot].record()
        else:
            self._host_tokens[slot][:b] = self.cache.tokens[:b]
        return slot, b

    def collect(self, ticket: tuple[int, int]) -> list[int]:
        """The tokens of a launched step (waits for it; the wait releases the GIL)."""
        slot, b = ticket
        if self._pinned:
            self._done[slot].synchronize()
        return list(self._host_tokens[slot][:b].tolist())

    # ------------------------------------------------------------- speculative

    def verify(self, drafts: list[list[int]], ctx: int) -> list[list[int]]:
        """One verify step for rows ``[:len(drafts)]`` (``model.fast.verify``), each row with
        its draft (at most ``draft_tokens``; may be empty); context bucket ``ctx`` must cover
        every row's position plus the draft. Returns each row's kept tokens: the drafts the
        model agreed with, then one of its own. Waits for the step."""
        if self.verify_graphs is None:
            raise RuntimeError("this model was built without drafts (draft_tokens=0)")
        b, k = len(drafts), self.cache.draft_tokens
        if not 0 < b <= self.verify_rows:
            raise ValueError(f"a verify step takes 1 to {self.verify_rows} rows, not {b}")
        self._host_draft[:b] = torch.tensor([(d[:k] + [0] * k)[:k] for d in drafts])
        self._host_draft_length[:b] = torch.tensor([min(len(d), k) for d in drafts])
        cache, pinned = self.cache, self._pinned
        cache.draft[:b].copy_(self._host_draft[:b], non_blocking=pinned)
        cache.draft_length[:b].copy_(self._host_draft_length[:b], non_blocking=pinned)
        self.verify_graphs.run(b, min(ctx, self.max_seq_len))
        self._host_verified[:b].copy_(cache.verified[:b], non_blocking=pinned)
        self._host_accepted[:b].copy_(cache.accepted[:b], non_blocking=pinned)
        if self._verified is not None:
            self._verified.record()
            self._verified.synchronize()
        picked = self._host_verified[:b].tolist()
        accepted = self._host_accepted[:b].tolist()
        return [row[: count + 1] for row, count in zip(picked, accepted, strict=True)]
